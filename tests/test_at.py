"""Syscalls relative to a directory fd (`cowfs._at`): xattrs through getxattrat and
listxattrat where the kernel has them (6.13), through /proc/self/fd before; a symlink is never
followed either way."""

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfs import _at, _libc


@pytest.fixture
def without_xattrat() -> Iterator[None]:
    """The kernel before 6.13: getxattrat and listxattrat fail with ENOSYS."""
    def missing(*_arguments: object) -> object:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    saved = (_libc.getxattrat, _libc.listxattrat, _at._xattrat)
    _libc.getxattrat = _libc.listxattrat = missing       # type: ignore[assignment]
    try:
        yield
    finally:
        _libc.getxattrat, _libc.listxattrat, _at._xattrat = saved


@pytest.mark.parametrize("kernel", ["getxattrat", "before 6.13"])
def test_xattrs_are_read_relative_to_a_directory_fd(tmp_path: Path, kernel: str,
                                                    request: pytest.FixtureRequest) -> None:
    if kernel != "getxattrat":
        request.getfixturevalue("without_xattrat")
    (tmp_path / "file").write_bytes(b"")
    os.setxattr(tmp_path / "file", "user.name", b"value")
    (tmp_path / "link").symlink_to("file")
    directory = os.open(tmp_path, _at.DIR_PATH_FLAGS)
    try:
        assert _at.read_xattr(directory, "file", "user.name") == b"value"
        assert _at.read_xattr_names(directory, "file") == ["user.name"]
        assert _at.get_xattr(directory, "link", "user.name") is None    # never followed
        assert _at.list_xattrs(directory, "link") == []
        with pytest.raises(OSError) as missing:
            _at.read_xattr(directory, "file", "user.other")
        assert missing.value.errno == errno.ENODATA
        with pytest.raises(FileNotFoundError):
            _at.read_xattr(directory, "gone", "user.name")
    finally:
        os.close(directory)
    if kernel != "getxattrat":
        assert _at._xattrat is False
