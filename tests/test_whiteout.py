"""Recognising every whiteout and opaque dialect, and hiding overlay's xattrs."""

import os
import stat
from pathlib import Path

import pytest

from cowfs import whiteout
from cowfs.whiteout import Opacity


@pytest.fixture
def directory_fd(tmp_path: Path):
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def lstat(directory: Path, name: str) -> os.stat_result:
    return os.lstat(directory / name)


def test_char_device_0_0_is_a_whiteout(tmp_path: Path, directory_fd: int) -> None:
    os.mknod(tmp_path / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.mknod(tmp_path / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    assert whiteout.is_whiteout(directory_fd, "gone", lstat(tmp_path, "gone"), xwhiteouts=False)
    assert not whiteout.is_whiteout(directory_fd, "null", lstat(tmp_path, "null"),
                                    xwhiteouts=True)


@pytest.mark.parametrize("namespace", ["trusted", "user"])
def test_xattr_whiteout_counts_only_in_a_directory_marked_x(
        tmp_path: Path, directory_fd: int, namespace: str) -> None:
    (tmp_path / "gone").write_bytes(b"")
    os.setxattr(tmp_path / "gone", f"{namespace}.overlay.whiteout", b"")
    (tmp_path / "full").write_bytes(b"data")
    os.setxattr(tmp_path / "full", f"{namespace}.overlay.whiteout", b"")
    gone = lstat(tmp_path, "gone")
    assert whiteout.is_whiteout(directory_fd, "gone", gone, xwhiteouts=True)
    assert not whiteout.is_whiteout(directory_fd, "gone", gone, xwhiteouts=False)
    assert not whiteout.is_whiteout(directory_fd, "full", lstat(tmp_path, "full"),
                                    xwhiteouts=True)


def test_oci_whiteout_marker(tmp_path: Path, directory_fd: int) -> None:
    (tmp_path / ".wh.gone").write_bytes(b"")
    assert whiteout.is_oci_whiteout_present(directory_fd, "gone")
    assert not whiteout.is_oci_whiteout_present(directory_fd, "here")
    assert not whiteout.is_oci_whiteout_present(directory_fd, "x" * 255)
    assert whiteout.is_oci_name(".wh.gone") and whiteout.is_oci_name(".wh..wh..opq")
    assert not whiteout.is_oci_name("wh.file")


@pytest.mark.parametrize(("marker", "expected"), [
    (None, Opacity.MERGED),
    (("trusted.overlay.opaque", b"y"), Opacity.OPAQUE),
    (("user.overlay.opaque", b"y"), Opacity.OPAQUE),
    (("trusted.overlay.opaque", b"x"), Opacity.XWHITEOUTS),
    (("trusted.overlay.opaque", b"n"), Opacity.MERGED),
    (("trusted.overlay.opaque", b"yes"), Opacity.MERGED),
    ((".wh..wh..opq", None), Opacity.OPAQUE),
])
def test_directory_opacity(tmp_path: Path, marker, expected: Opacity) -> None:
    if marker and marker[1] is None:
        (tmp_path / marker[0]).write_bytes(b"")
    elif marker:
        os.setxattr(tmp_path, *marker)
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        assert whiteout.directory_opacity(fd) is expected
    finally:
        os.close(fd)


def test_private_xattrs_are_hidden_and_escaped_ones_shown() -> None:
    assert whiteout.visible_xattr_name("user.mime") == "user.mime"
    assert whiteout.visible_xattr_name("security.capability") == "security.capability"
    assert whiteout.visible_xattr_name("trusted.overlay.opaque") is None
    assert whiteout.visible_xattr_name("user.overlay.origin") is None
    assert whiteout.visible_xattr_name("trusted.overlay.overlay.mine") == "trusted.overlay.mine"
    assert whiteout.stored_xattr_name("trusted.overlay.mine") == "trusted.overlay.overlay.mine"
    assert whiteout.stored_xattr_name("user.other") == "user.other"
