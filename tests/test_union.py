"""The merged tree through the library, without FUSE: lookup, listing, attributes, xattrs."""

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cowfs import Directory, Union, open_stack
from cowfs.union import Caller


def union_of(*lowers: Path, fd_budget: int = 4096) -> Union:
    return Union(open_stack([str(path) for path in lowers]), fd_budget=fd_budget)


def names(union: Union, path: str = "/") -> list[str]:
    entry = union.resolve(path)
    assert entry is not None
    return sorted(union.list_names(entry))


def test_top_layer_wins_and_directories_merge(layer_dirs) -> None:
    top, bottom = layer_dirs("top", "bottom")
    (top / "file").write_text("top")
    (bottom / "file").write_text("bottom")
    (top / "dir").mkdir()
    (bottom / "dir").mkdir()
    (top / "dir" / "a").write_text("a")
    (bottom / "dir" / "b").write_text("b")
    with union_of(top, bottom) as union:
        file = union.resolve("file")
        assert file is not None and union.layer_path(file) == str(top)
        fd = union.open(file, os.O_RDONLY)
        assert os.read(fd, 10) == b"top"
        os.close(fd)
        directory = union.resolve("dir")
        assert isinstance(directory, Directory) and directory.layers == (0, 1)
        assert names(union, "dir") == ["a", "b"]


def test_whiteouts_of_every_dialect_hide_lower_names(layer_dirs) -> None:
    top, bottom = layer_dirs("top", "bottom")
    for name in ("device", "xattr", "oci", "kept"):
        (bottom / name).write_text(name)
    os.mknod(top / "device", stat.S_IFCHR, os.makedev(0, 0))
    (top / "xattr").write_bytes(b"")
    os.setxattr(top / "xattr", "trusted.overlay.whiteout", b"")
    os.setxattr(top, "trusted.overlay.opaque", b"x")       # holds xattr whiteouts, not opaque
    (top / ".wh.oci").write_bytes(b"")
    with union_of(top, bottom) as union:
        assert names(union) == ["kept"]
        for name in ("device", "xattr", "oci", ".wh.oci"):
            assert union.resolve(name) is None


def test_opaque_directories_of_every_dialect_end_the_merge(layer_dirs) -> None:
    top, bottom = layer_dirs("top", "bottom")
    for name in ("kernel", "oci", "plain"):
        (top / name).mkdir()
        (top / name / "upper-file").write_text("")
        (bottom / name).mkdir()
        (bottom / name / "lower-file").write_text("")
    os.setxattr(top / "kernel", "trusted.overlay.opaque", b"y")
    (top / "oci" / ".wh..wh..opq").write_bytes(b"")
    with union_of(top, bottom) as union:
        assert names(union, "kernel") == ["upper-file"]
        assert names(union, "oci") == ["upper-file"]
        assert names(union, "plain") == ["lower-file", "upper-file"]


def test_a_file_ends_the_merge_of_a_directory_above_it(layer_dirs) -> None:
    top, middle, bottom = layer_dirs("top", "middle", "bottom")
    (top / "name").mkdir()
    (top / "name" / "a").write_text("")
    (middle / "name").write_text("a file between")
    (bottom / "name").mkdir()
    (bottom / "name" / "b").write_text("")
    with union_of(top, middle, bottom) as union:
        entry = union.resolve("name")
        assert isinstance(entry, Directory) and entry.layers == (0,)
        assert names(union, "name") == ["a"]


def test_symlinks_in_a_layer_are_never_followed(layer_dirs) -> None:
    (lower,) = layer_dirs("lower")
    (lower / "escape").symlink_to("/etc")
    with union_of(lower) as union:
        with pytest.raises(NotADirectoryError):
            union.resolve("escape/passwd")
        entry = union.resolve("escape")
        assert entry is not None and stat.S_ISLNK(union.stat(entry).st_mode)
        assert union.readlink(entry) == "/etc"
        with pytest.raises(OSError) as caught:
            union.open(entry, os.O_RDONLY)
        assert caught.value.errno == errno.ELOOP


def test_names_that_cannot_exist(layer_dirs) -> None:
    (lower,) = layer_dirs("lower")
    with union_of(lower) as union:
        for bad, code in (("x" * 256, errno.ENAMETOOLONG), ("..", errno.EINVAL),
                          ("a/b", errno.EINVAL)):
            with pytest.raises(OSError) as caught:
                union.lookup(union.root, bad)
            assert caught.value.errno == code
        assert union.lookup(union.root, "x" * 255) is None


def test_marker_names_are_refused_before_anything_is_made(layer_dirs, tmp_path: Path) -> None:
    """A `.wh.` name made through the union would be a marker once the upper is a lower layer
    or a layer tar: each way of making one is refused, and the upper stays empty."""
    lower, upper = layer_dirs("lower", "upper")
    (lower / "etc").mkdir()
    (lower / "etc" / "passwd").write_text("root:x:0:0\n")
    (lower / "etc" / "a").write_text("a\n")
    stack = open_stack([str(lower)], str(upper), str(tmp_path / "work"))
    with Union(stack) as union:
        etc, source = union.resolve("etc"), union.resolve("etc/a")
        assert etc is not None and source is not None
        attempts = {
            "create": lambda name: union.create(etc, name, 0o644, os.O_WRONLY),
            "mkdir": lambda name: union.mkdir(etc, name, 0o755),
            "mknod": lambda name: union.mknod(etc, name, stat.S_IFIFO | 0o644),
            "symlink": lambda name: union.symlink(etc, name, "passwd"),
            "link": lambda name: union.link(source, etc, name),
            "rename": lambda name: union.rename(etc, "a", etc, name),
        }
        for what, attempt in attempts.items():
            for name in (".wh.passwd", ".wh..wh..opq", ".wh."):
                with pytest.raises(OSError) as caught:
                    attempt(name)
                assert caught.value.errno == errno.EINVAL, (what, name)
        assert names(union, "etc") == ["a", "passwd"]
    assert os.listdir(upper) == []


def test_the_upper_is_not_read_in_the_oci_dialect(layer_dirs, tmp_path: Path) -> None:
    """`.wh.` names the kernel let a user make in an upper are files there, as the kernel
    shows them; in a lower layer they stay markers."""
    top, bottom, upper = layer_dirs("top", "bottom", "upper")
    for name in ("kept", "gone"):
        (bottom / name).write_text(name)
    (top / ".wh.gone").write_bytes(b"")                 # a lower layer's marker: gone is gone
    (bottom / "dir").mkdir()
    (bottom / "dir" / "inner").write_text("inner")
    (upper / ".wh.kept").write_text("a user's file")
    (upper / ".wh.gone").write_text("another")
    (upper / "dir").mkdir()
    (upper / "dir" / ".wh..wh..opq").write_bytes(b"")
    (upper / ".wh.box").mkdir()
    stack = open_stack([str(top), str(bottom)], str(upper), str(tmp_path / "work"))
    with Union(stack) as union:
        assert names(union) == [".wh.box", ".wh.gone", ".wh.kept", "dir", "kept"]
        assert names(union, "dir") == [".wh..wh..opq", "inner"]
        file = union.resolve(".wh.gone")
        assert file is not None and not file.names[0].has_lower, "no lower layer shows a marker"
        box = union.resolve(".wh.box")
        assert isinstance(box, Directory) and box.layers == (0,)
        union.unlink(union.root, ".wh.gone")
        assert names(union) == [".wh.box", ".wh.kept", "dir", "kept"]
    assert not os.path.lexists(upper / ".wh.gone"), "removed without a whiteout"


def test_writes_are_refused_on_a_read_only_stack(layer_dirs) -> None:
    (lower,) = layer_dirs("lower")
    (lower / "file").write_text("data")
    with union_of(lower) as union:
        entry = union.resolve("file")
        assert entry is not None
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            with pytest.raises(OSError) as caught:
                union.open(entry, flags)
            assert caught.value.errno == errno.EROFS


def test_a_whiteout_device_cannot_be_made_through_the_library(layer_dirs) -> None:
    lower, upper = layer_dirs("lower", "upper")
    (lower / "dir").mkdir()
    with Union(open_stack([str(lower)], str(upper))) as union:
        directory = union.resolve("dir")
        assert directory is not None
        with pytest.raises(OSError) as caught:
            union.mknod(directory, "c", stat.S_IFCHR | 0o644, os.makedev(0, 0))
        assert caught.value.errno == errno.EPERM
        assert names(union, "dir") == []
    assert os.listdir(upper) == []


def test_overlay_xattrs_are_private_and_user_xattrs_pass(layer_dirs) -> None:
    (lower,) = layer_dirs("lower")
    (lower / "file").write_text("")
    os.setxattr(lower / "file", "user.color", b"blue")
    os.setxattr(lower / "file", "trusted.overlay.origin", b"\x00")
    os.setxattr(lower / "file", "trusted.overlay.overlay.mine", b"escaped")
    with union_of(lower) as union:
        entry = union.resolve("file")
        assert entry is not None
        assert sorted(union.list_xattrs(entry)) == ["trusted.overlay.mine", "user.color"]
        assert union.get_xattr(entry, "user.color") == b"blue"
        assert union.get_xattr(entry, "trusted.overlay.mine") == b"escaped"
        with pytest.raises(OSError) as caught:
            union.get_xattr(entry, "trusted.overlay.origin")
        assert caught.value.errno == errno.ENODATA


def test_deep_trees_work_with_few_directory_fds(layer_dirs) -> None:
    """Directory fds are a cache: a budget of 4 still walks 50 levels in 2 layers."""
    top, bottom = layer_dirs("top", "bottom")
    path = "/".join(f"level{depth}" for depth in range(50))
    (top / path).mkdir(parents=True)
    (bottom / path).mkdir(parents=True)
    (bottom / path / "leaf").write_text("deep")
    with union_of(top, bottom, fd_budget=4) as union:
        entry = union.resolve(path + "/leaf")
        assert entry is not None
        assert union.fds.open_count <= 4
        fd = union.open(entry, os.O_RDONLY)
        assert os.read(fd, 10) == b"deep"
        os.close(fd)
        assert names(union, path) == ["leaf"]


def test_the_core_imports_neither_pyfuse3_nor_trio() -> None:
    code = ("import sys, cowfs, cowfs.union, cowfs.lookup, cowfs.layers, cowfs.whiteout;"
            "assert not {'pyfuse3', 'trio'} & set(sys.modules), sys.modules.keys()")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_layer_root_is_never_opaque(layer_dirs) -> None:
    """As in the kernel: opaque markers on a layer's root do not hide the layers below."""
    top, bottom = layer_dirs("top", "bottom")
    os.setxattr(top, "trusted.overlay.opaque", b"y")
    (top / ".wh..wh..opq").write_bytes(b"")
    (bottom / "below").write_text("")
    with union_of(top, bottom) as union:
        assert names(union) == ["below"]


def test_an_unnamed_file_is_one_entry_before_and_after_its_link(layer_dirs,
                                                                tmp_path: Path) -> None:
    """Union.tmpfile (O_TMPFILE): in the parent's upper copy, in no listing; its first link
    names that same entry (what a FUSE node holds), a second name is an ordinary link, and one
    never linked leaves nothing in the upper. (tests/test_tmpfile.py mounts it.)"""
    lower, upper = layer_dirs("lower", "upper")
    (lower / "dir").mkdir()
    (lower / "dir" / "old").write_text("old\n")
    stack = open_stack([str(lower)], str(upper), str(tmp_path / "work"))
    with Union(stack) as union:
        directory = union.resolve("dir")
        assert directory is not None
        entry, fd = union.tmpfile(directory, 0o640, os.O_RDWR, Caller(1000, 1000))
        try:
            os.write(fd, b"unnamed\n")
            assert entry.removed and union.stat(entry).st_nlink == 0
            assert (union.stat(entry).st_uid, union.stat(entry).st_gid) == (1000, 1000)
            assert names(union, "dir") == ["old"] and os.listdir(upper / "dir") == []
            assert union.link(entry, directory, "named") is entry
            assert union.resolve("dir/named") is entry and not entry.removed
            assert union.link(entry, union.root, "second") is entry
            assert union.stat(entry).st_nlink == 2
        finally:
            os.close(fd)
        forgotten, fd = union.tmpfile(union.root, 0o600, os.O_WRONLY)
        os.close(fd)
        del forgotten
        assert (upper / "dir" / "named").read_bytes() == b"unnamed\n"
        assert sorted(os.listdir(upper)) == ["dir", "second"]
