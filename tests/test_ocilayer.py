"""Layer tars in and out of layer directories (cowfs.ocilayer), without FUSE."""

import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import cowfs_command
from oci_tars import compress, digest, member, tar_bytes

from cowfs import ocilayer
from cowfs.ocilayer import LayerError

DIR, FILE, LINK, SYMLINK = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE


# VFS_CAP_REVISION_2, effective, permitted cap_net_raw (13)
CAPABILITY = b"\x01\x00\x00\x02" + (1 << 13).to_bytes(4, "little") + bytes(12)


def xattr(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        return None


def write_tar(tmp_path: Path, members, compression: str | None = None,
              name: str = "layer.tar") -> Path:
    path = tmp_path / name
    path.write_bytes(compress(tar_bytes(members), compression))
    return path


def sample_layer() -> list:
    return [
        member("./", DIR, mode=0o751),
        member("etc/", DIR, mode=0o755, mtime=1_000),
        member("etc/passwd", data=b"root:x:0:0\n", uid=5, gid=6, mode=0o640,
               pax_headers={"SCHILY.xattr.user.note": "hi", "mtime": "1234.5"}),
        member("etc/alias", LINK, linkname="etc/passwd"),
        member("etc/shadow-link", SYMLINK, linkname="/etc/shadow"),
        member("bin/ping", data=b"\x7fELF", mode=0o4755,
               pax_headers={"SCHILY.xattr.security.capability": CAPABILITY.decode(),
                            "SCHILY.xattr.user.binary": b"\xff\xfe".decode("utf-8",
                                                                            "surrogateescape")}),
        member("etc/.wh.gone"),
        member("var/cache/.wh..wh..opq"),
        member("var/cache/new", data=b"n"),
        member("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        member("dev/loop0", tarfile.BLKTYPE, devmajor=7, devminor=0, mode=0o660),
        member("run/fifo", tarfile.FIFOTYPE, mode=0o600),
        member("sparse", data=bytes(3 << 20) + b"end"),
        member("trusted", data=b"t", pax_headers={"SCHILY.xattr.trusted.overlay.opaque": "y"}),
    ]


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_import_keeps_everything_a_layer_holds(tmp_path: Path, compression: str | None) -> None:
    source = write_tar(tmp_path, sample_layer(), compression)
    layer = tmp_path / "layer"
    digests = ocilayer.import_layer(str(source), str(layer))
    assert digests.diff_id == digest(tar_bytes(sample_layer()))
    assert digests.blob_digest == digest(source.read_bytes())

    assert stat.S_IMODE(layer.stat().st_mode) == 0o751
    passwd = (layer / "etc/passwd").stat()
    assert (layer / "etc/passwd").read_bytes() == b"root:x:0:0\n"
    assert (passwd.st_uid, passwd.st_gid, stat.S_IMODE(passwd.st_mode)) == (5, 6, 0o640)
    assert passwd.st_mtime_ns == 1234_500_000_000
    assert passwd.st_nlink == 2 and (layer / "etc/alias").stat().st_ino == passwd.st_ino
    assert xattr(layer / "etc/passwd", "user.note") == b"hi"
    assert os.readlink(layer / "etc/shadow-link") == "/etc/shadow"
    assert (layer / "etc").stat().st_mtime == 1_000       # set after its children were made
    ping = layer / "bin/ping"
    assert stat.S_IMODE(ping.stat().st_mode) == 0o4755    # chmod after chown kept setuid
    assert xattr(ping, "security.capability") == CAPABILITY
    assert xattr(ping, "user.binary") == b"\xff\xfe"
    # OCI whiteouts in the kernel's format
    gone = (layer / "etc/gone").lstat()
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert not (layer / "etc/.wh.gone").exists()
    assert xattr(layer / "var/cache", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(layer / "var/cache")) == ["new"]
    assert (layer / "dev/null").lstat().st_rdev == os.makedev(1, 3)
    assert stat.S_ISBLK((layer / "dev/loop0").lstat().st_mode)
    assert stat.S_ISFIFO((layer / "run/fifo").lstat().st_mode)
    sparse = (layer / "sparse").stat()
    assert sparse.st_size == (3 << 20) + 3 and sparse.st_blocks * 512 < (1 << 20)
    # A tar cannot plant overlay's markers: the xattr is the user's own, stored escaped.
    assert xattr(layer / "trusted", "trusted.overlay.opaque") is None
    assert xattr(layer / "trusted", "trusted.overlay.overlay.opaque") == b"y"
    assert not [name for name in os.listdir(tmp_path) if "import" in name]


def test_import_keeps_oci_whiteouts_when_asked(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    ocilayer.import_layer(str(write_tar(tmp_path, sample_layer())), str(layer), whiteouts="oci")
    assert (layer / "etc/.wh.gone").is_file() and not (layer / "etc/gone").exists()
    assert (layer / "var/cache/.wh..wh..opq").is_file()
    assert xattr(layer / "var/cache", "trusted.overlay.opaque") is None


def test_import_userxattr_marks_opaque_under_user(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    ocilayer.import_layer(str(write_tar(tmp_path, sample_layer())), str(layer),
                          xattr_prefix="user.overlay.")
    assert xattr(layer / "var/cache", "user.overlay.opaque") == b"y"


def test_later_member_of_a_name_wins(tmp_path: Path) -> None:
    members = [member("a/", DIR), member("a/x", data=b"1"), member("a", data=b"file now"),
               member("b", data=b"old"), member("b", data=b"new"), member("c", SYMLINK,
                                                                          linkname="b")]
    layer = tmp_path / "layer"
    ocilayer.import_layer(str(write_tar(tmp_path, members)), str(layer))
    assert (layer / "a").read_bytes() == b"file now"
    assert (layer / "b").read_bytes() == b"new"


def test_import_into_an_empty_directory(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    layer.mkdir()
    ocilayer.import_layer(str(write_tar(tmp_path, [member("f", data=b"x")])), str(layer))
    assert (layer / "f").read_bytes() == b"x"


def test_import_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "old").write_text("x")
    with pytest.raises(LayerError, match="not empty"):
        ocilayer.import_layer(str(write_tar(tmp_path, [member("f")])), str(layer))


HOSTILE = {
    "absolute": [member("/etc/evil", data=b"x")],
    "dotdot": [member("../evil", data=b"x")],
    "dotdot inside": [member("a/../../evil", data=b"x")],
    "through symlink": [member("link", SYMLINK, linkname="/tmp"), member("link/evil")],
    "through relative symlink": [member("d/", DIR), member("d/up", SYMLINK, linkname="../.."),
                                 member("d/up/evil")],
    "hard link outside": [member("evil", LINK, linkname="../../etc/passwd")],
    "hard link absolute": [member("evil", LINK, linkname="/etc/passwd")],
    "hard link not yet extracted": [member("evil", LINK, linkname="later"),
                                    member("later", data=b"x")],
    "hard link through symlink": [member("link", SYMLINK, linkname="/etc"),
                                  member("evil", LINK, linkname="link/passwd")],
    "through a file": [member("f", data=b"x"), member("f/evil")],
    "not a tar": None,
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tar_is_refused_and_leaves_nothing(tmp_path: Path, case: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    source = tmp_path / "layer.tar"
    if HOSTILE[case] is None:
        source.write_bytes(b"garbage" * 1000)
    else:
        # Something good first, so a partial extraction would show.
        source.write_bytes(tar_bytes([member("good", data=b"g"), *HOSTILE[case]]))
    before = sorted(os.listdir("/tmp")), sorted(os.listdir(tmp_path))
    with pytest.raises(LayerError) as raised:
        ocilayer.import_layer(str(source), str(work / "layer"))
    assert "\n" not in str(raised.value)
    assert os.listdir(work) == []
    assert (sorted(os.listdir("/tmp")), sorted(os.listdir(tmp_path))) == before
    assert not os.path.exists("/tmp/evil")


def test_import_cli_errors_are_one_line(tmp_path: Path) -> None:
    source = tmp_path / "layer.tar"
    source.write_bytes(tar_bytes([member("../evil", data=b"x")]))
    result = subprocess.run(cowfs_command("layer", "import", str(source), str(tmp_path / "l")),
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "'..' leaves the layer" in result.stderr
    assert not (tmp_path / "l").exists()


def test_truncated_layer_is_refused(tmp_path: Path) -> None:
    data = compress(tar_bytes([member("big", data=os.urandom(100_000))]), "gzip")
    source = tmp_path / "layer.tar.gz"
    source.write_bytes(data[: len(data) // 2])
    with pytest.raises(LayerError):
        ocilayer.import_layer(str(source), str(tmp_path / "layer"))
    assert not (tmp_path / "layer").exists()


# -- export ---------------------------------------------------------------------------------


def make_upper(root: Path) -> Path:
    """An upper as cowfs or the kernel writes it, made by hand."""
    upper = root / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc/config").write_text("changed\n")
    os.chown(upper / "etc/config", 7, 8)
    os.setxattr(upper / "etc/config", "user.kept", b"k")
    os.setxattr(upper / "etc/config", "trusted.overlay.cowfs.ino", b"1234")   # private
    os.setxattr(upper / "etc/config", "trusted.overlay.overlay.mine", b"m")   # escaped
    os.link(upper / "etc/config", upper / "etc/config-link")
    os.mknod(upper / "etc/deleted", stat.S_IFCHR | 0o000, 0)
    (upper / "opaque").mkdir()
    os.setxattr(upper / "opaque", "trusted.overlay.opaque", b"y")
    os.setxattr(upper / "opaque", "trusted.overlay.origin", b"\x00\xfb")
    (upper / "opaque/-first").write_text("sorts before the marker\n")
    os.symlink("/nowhere", upper / "opaque/link")
    os.mkfifo(upper / "fifo")
    os.utime(upper / "etc/config", ns=(1, 1_600_000_000_123_456_789))
    return upper


def members_of(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as archive:
        return archive.getmembers()


def test_export_writes_oci_changes(tmp_path: Path) -> None:
    upper = make_upper(tmp_path)
    output = tmp_path / "layer.tar"
    ocilayer.export_layer(str(upper), str(output))
    members = {info.name: info for info in members_of(output)}
    assert list(members) == ["etc", "etc/.wh.deleted", "etc/config", "etc/config-link", "fifo",
                             "opaque", "opaque/.wh..wh..opq", "opaque/-first", "opaque/link"]
    config = members["etc/config"]
    assert (config.uid, config.gid, config.size) == (7, 8, 8)
    assert config.pax_headers["mtime"] == "1600000000.123456789"
    assert {key: value for key, value in config.pax_headers.items() if "xattr" in key} == {
        "SCHILY.xattr.trusted.overlay.mine": "m", "SCHILY.xattr.user.kept": "k"}
    assert not [key for key in members["opaque"].pax_headers if "overlay" in key]
    assert members["etc/config-link"].islnk()
    assert members["etc/config-link"].linkname == "etc/config"
    assert members["opaque/link"].linkname == "/nowhere" and members["fifo"].isfifo()
    # The same upper gives the same bytes.
    again = tmp_path / "again.tar"
    ocilayer.export_layer(str(upper), str(again))
    assert again.read_bytes() == output.read_bytes()


@pytest.mark.parametrize("name", ["layer.tar.gz", "layer.tar.zst"])
def test_export_compressed_imports_back(tmp_path: Path, name: str) -> None:
    upper = make_upper(tmp_path)
    output = tmp_path / name
    ocilayer.export_layer(str(upper), str(output),
                          compression=ocilayer.compression_for(name))
    layer = tmp_path / "layer"
    ocilayer.import_layer(str(output), str(layer))
    assert (layer / "etc/config").read_text() == "changed\n"
    assert (layer / "etc/config").stat().st_mtime_ns == 1_600_000_000_123_456_789
    assert (layer / "etc/config").stat().st_ino == (layer / "etc/config-link").stat().st_ino
    assert xattr(layer / "etc/config", "trusted.overlay.overlay.mine") == b"m"
    assert xattr(layer / "etc/config", "trusted.overlay.cowfs.ino") is None
    assert stat.S_ISCHR((layer / "etc/deleted").lstat().st_mode)
    assert xattr(layer / "opaque", "trusted.overlay.opaque") == b"y"


def test_export_userxattr_reads_user_markers(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "dir").mkdir(parents=True)
    os.setxattr(upper / "dir", "user.overlay.opaque", b"y")
    output = tmp_path / "layer.tar"
    ocilayer.export_layer(str(upper), str(output), userxattr=True)
    assert [info.name for info in members_of(output)] == ["dir", "dir/.wh..wh..opq"]


@pytest.mark.parametrize("marker", ["redirect", "metacopy"])
def test_export_needs_lowers_for_redirects_and_metacopies(tmp_path: Path, marker: str) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    if marker == "redirect":
        (upper / "renamed").mkdir()
        os.setxattr(upper / "renamed", "trusted.overlay.redirect", b"original")
    else:
        (upper / "file").write_bytes(b"")
        os.truncate(upper / "file", 10)
        os.setxattr(upper / "file", "trusted.overlay.metacopy", b"")
    output = tmp_path / "layer.tar"
    with pytest.raises(LayerError, match="--lowers"):
        ocilayer.export_layer(str(upper), str(output))
    assert os.listdir(tmp_path) == ["upper"]
    lower = tmp_path / "lower"
    (lower / "original").mkdir(parents=True)
    (lower / "original/inside").write_text("in\n")
    (lower / "file").write_text("0123456789")
    ocilayer.export_layer(str(upper), str(output), lowers=[str(lower)])
    with tarfile.open(output) as archive:
        if marker == "redirect":
            assert archive.getnames() == ["renamed", "renamed/.wh..wh..opq", "renamed/inside"]
        else:
            assert archive.extractfile("file").read() == b"0123456789"


@pytest.mark.parametrize("case", ["file", "opaque-marker", "whiteout", "directory",
                                  "in-a-renamed-directory"])
def test_export_refuses_a_marker_name_and_writes_nothing(tmp_path: Path, case: str) -> None:
    """A `.wh.` name in an upper (a kernel mount lets a user make one) would be a deletion in
    the tar: refused, naming the path, and no output is left."""
    upper, lower = tmp_path / "upper", tmp_path / "lower"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "kept").write_text("kept\n")
    (lower / "original").mkdir(parents=True)
    shown = {"file": "etc/.wh.passwd", "opaque-marker": "etc/.wh..wh..opq",
             "whiteout": "etc/.wh.gone", "directory": "etc/.wh.box",
             "in-a-renamed-directory": "renamed/.wh.passwd"}[case]
    if case == "whiteout":
        os.mknod(upper / shown, stat.S_IFCHR | 0o000, 0)
    elif case == "directory":
        (upper / shown).mkdir()
    else:
        if case == "in-a-renamed-directory":
            (upper / "renamed").mkdir()
            os.setxattr(upper / "renamed", "trusted.overlay.redirect", b"original")
        (upper / shown).write_text("a user's file\n")
    output = tmp_path / "layer.tar"
    with pytest.raises(LayerError, match=f"cannot export {shown}:"):
        ocilayer.export_layer(str(upper), str(output), lowers=[str(lower)])
    assert sorted(os.listdir(tmp_path)) == ["lower", "upper"]
    result = subprocess.run(cowfs_command("layer", "export", str(upper), "-o", str(output),
                                          "--lowers", str(lower)),
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and shown in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["lower", "upper"]


def test_oci_modules_import_neither_pyfuse3_nor_trio() -> None:
    code = ("import sys, cowfs.ocilayer, cowfs.ociimage;"
            "assert not {'pyfuse3', 'trio'} & set(sys.modules), sys.modules.keys()")
    subprocess.run([sys.executable, "-c", code], check=True)
