"""An image unpacked, changed through a cowfs mount, exported as a layer, imported and stacked
on top: the new read-only stack shows the tree the first mount showed."""

import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import cowfs_command, mounted_cowfs, unmount_quietly
from oci_tars import add_image, member, tar_bytes
from test_ociimage import build_with_umoci

from cowfs import ociimage, ocilayer
from cowfs.layers import format_lowerdirs

pytestmark = pytest.mark.mounts

BASE = tar_bytes([
    member("etc/", tarfile.DIRTYPE), member("etc/os", data=b"base\n"),
    member("etc/hosts", data=b"127.0.0.1 localhost\n"),
    member("etc/big", data=os.urandom(300_000)),
    member("data/", tarfile.DIRTYPE), member("data/sub/", tarfile.DIRTYPE),
    member("data/sub/a", data=b"a\n"), member("data/os-link", tarfile.SYMTYPE,
                                               linkname="../etc/os"),
    member("cache/", tarfile.DIRTYPE), member("cache/x", data=b"x\n"),
    member("cache/y", data=b"y\n"),
])
TOP = tar_bytes([
    member("etc/.wh.hosts"),
    member("etc/hosts", data=b"replaced\n"),
    member("data/sub/b", data=b"b\n"),
    member("cache/.wh..wh..opq"),
    member("cache/z", data=b"z\n"),
])


def snapshot(root: Path) -> dict[str, tuple]:
    """What a user sees: type, mode, owner, size, mtime, content or target, user xattrs, and
    which names are one file."""
    tree: dict[str, tuple] = {}
    inodes: dict[int, str] = {}
    for directory, subdirectories, files in os.walk(root):
        subdirectories.sort()
        for name in sorted([*subdirectories, *files]):
            path = Path(directory, name)
            st = path.lstat()
            relative = str(path.relative_to(root))
            if stat.S_ISREG(st.st_mode):
                content: object = path.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            else:
                content = None
            xattrs = {attribute: os.getxattr(path, attribute, follow_symlinks=False)
                      for attribute in os.listxattr(path, follow_symlinks=False)}
            mtime = None if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns
            first_name = inodes.setdefault(st.st_ino, relative) \
                if stat.S_ISREG(st.st_mode) else None
            tree[relative] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                              st.st_gid, st.st_size, mtime, content, xattrs, first_name)
    return tree


def change_tree(merged: Path) -> None:
    """Every kind of change an upper records."""
    (merged / "etc/os").write_text("changed\n")                 # modified (copy-up)
    (merged / "etc/hosts").unlink()                              # a lower file deleted
    shutil.rmtree(merged / "cache")                              # a dir replaced: opaque
    (merged / "cache").mkdir()
    (merged / "cache/fresh").write_text("fresh\n")
    (merged / "data").rename(merged / "renamed")                 # a lower dir renamed: redirect
    (merged / "renamed/sub/c").write_text("c\n")
    os.chmod(merged / "etc/big", 0o600)                          # metadata only (metacopy)
    os.chown(merged / "etc/big", 12, 34)
    os.setxattr(merged / "etc/big", "user.note", b"noted")
    (merged / "new").mkdir()
    (merged / "new/file").write_text("new\n")
    os.link(merged / "new/file", merged / "new/hard")            # a hard link
    os.symlink("/etc/os", merged / "new/link")
    os.mkfifo(merged / "new/fifo")


def unpack(tmp_path: Path, image: str) -> list[Path]:
    if image == "umoci":
        layout, ref = build_with_umoci(tmp_path), "latest"
    else:
        layout, ref = tmp_path / "layout", "v1"
        add_image(layout, ref, [BASE, TOP], "gzip")
    result = ociimage.unpack_image(str(layout), str(tmp_path / "images"), ref=ref)
    return [Path(path) for path in reversed(result.layers)]


@pytest.mark.parametrize("image", ["tarfile", "umoci"])
def test_change_export_import_restack(tmp_path: Path, image: str) -> None:
    lowers = unpack(tmp_path, image)
    upper, first, second = tmp_path / "upper", tmp_path / "first", tmp_path / "second"
    for path in (upper, first, second):
        path.mkdir()
    with mounted_cowfs(lowers, first, upper) as mount:
        if image == "tarfile":
            assert (first / "etc/hosts").read_text() == "replaced\n"
            assert sorted(os.listdir(first / "cache")) == ["z"]
            change_tree(first)
        else:
            (first / "etc/os").write_text("changed\n")
            (first / "etc/new").unlink()
            (first / "data").rename(first / "moved")
        expected = snapshot(first)
        mount.unmount()
    if image == "tarfile":   # the upper holds what export must reach into the lowers for
        assert os.getxattr(upper / "renamed", "trusted.overlay.redirect") in (b"data", b"/data")
        assert os.getxattr(upper / "etc/big", "trusted.overlay.metacopy") == b""
        assert os.getxattr(upper / "cache", "trusted.overlay.opaque") == b"y"

    layer_tar = tmp_path / "changes.tar.zst"
    lowerdir = format_lowerdirs([str(path) for path in lowers])
    exported = subprocess.run(cowfs_command("layer", "export", str(upper), "-o", str(layer_tar),
                                            "--lowers", lowerdir),
                              capture_output=True, text=True, check=False)
    assert exported.returncode == 0, exported.stderr
    changes = tmp_path / "changes"
    imported = subprocess.run(cowfs_command("layer", "import", str(layer_tar), str(changes)),
                              capture_output=True, text=True, check=False)
    assert imported.returncode == 0, imported.stderr

    with mounted_cowfs([changes, *lowers], second) as mount:
        assert snapshot(second) == expected
        mount.unmount()


def test_kernel_written_upper_round_trips(tmp_path: Path) -> None:
    """The kernel's overlayfs writes the upper (redirect_dir, metacopy); cowfs stacks the
    exported and imported changes and shows the kernel's tree."""
    lowers = unpack(tmp_path, "tarfile")
    upper, work, first, second = (tmp_path / name for name in ("upper", "work", "first",
                                                                "second"))
    for path in (upper, work, first, second):
        path.mkdir()
    options = (f"lowerdir={':'.join(str(path) for path in lowers)},upperdir={upper},"
               f"workdir={work},redirect_dir=on,metacopy=on")
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(first)],
                   check=True, capture_output=True)
    try:
        change_tree(first)
        expected = snapshot(first)
    finally:
        unmount_quietly(first)
    assert os.getxattr(upper / "etc/big", "trusted.overlay.metacopy") is not None
    layer_tar = tmp_path / "changes.tar"
    ocilayer.export_layer(str(upper), str(layer_tar), lowers=[str(path) for path in lowers])
    ocilayer.import_layer(str(layer_tar), str(tmp_path / "changes"))
    with mounted_cowfs([tmp_path / "changes", *lowers], second) as mount:
        assert snapshot(second) == expected
        mount.unmount()


def test_export_without_lowers_refuses_a_renamed_directory(tmp_path: Path) -> None:
    lowers = unpack(tmp_path, "tarfile")
    upper, merged = tmp_path / "upper", tmp_path / "merged"
    upper.mkdir()
    merged.mkdir()
    with mounted_cowfs(lowers, merged, upper) as mount:
        (merged / "data").rename(merged / "renamed")
        mount.unmount()
    result = subprocess.run(cowfs_command("layer", "export", str(upper), "-o",
                                          str(tmp_path / "out.tar")),
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "renamed is a renamed directory" in result.stderr and "--lowers" in result.stderr
    assert not (tmp_path / "out.tar").exists()
    with pytest.raises(ocilayer.LayerError):
        ocilayer.export_layer(str(upper), str(tmp_path / "out.tar"))
