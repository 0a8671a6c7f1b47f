"""Syscalls relative to a directory fd that `os` offers only by path.

Python has no getxattr/listxattr relative to a directory fd, and fgetxattr refuses O_PATH fds.
The kernel's /proc/self/fd magic links give the same guarantee: the walk starts at the inode the
fd holds, and with follow_symlinks=False the last component, a single name, is not followed.
"""

import errno
import os
from collections.abc import Callable
from typing import TypeVar

from cowfs import _libc

T = TypeVar("T")

# Flags for a directory fd that only anchors *at() calls: no read permission needed, no atime.
DIR_PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

NAME_MAX = 255


def fd_path(fd: int, name: str | None = None) -> str:
    """A path that reaches *fd* itself, or the single component *name* inside it."""
    return f"/proc/self/fd/{fd}" if name is None else f"/proc/self/fd/{fd}/{name}"


def check_name(name: str) -> None:
    """Reject what cannot be one directory entry's name: a name is data, never a path."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise OSError(errno.EINVAL, f"invalid name {name!r}")
    if len(os.fsencode(name)) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), name)


# Whether the kernel has getxattrat(2) and listxattrat(2) (Linux 6.13): then a name's xattrs
# are read without the walk through /proc/self/fd.
_xattrat = True


def read_xattr(dir_fd: int, name: str | None, attribute: str) -> bytes:
    """The value of *attribute* on (dir_fd, name); OSError (ENODATA) when it is not set."""
    return _xattr_call(_libc.getxattrat, os.getxattr, dir_fd, name, attribute)


def read_xattr_names(dir_fd: int, name: str | None) -> list[str]:
    """The xattr names of (dir_fd, name)."""
    return _xattr_call(_libc.listxattrat, os.listxattr, dir_fd, name)


def _xattr_call(relative: Callable[..., T], by_path: Callable[..., T], dir_fd: int,
                name: str | None, *arguments: str) -> T:
    """*relative* (the *xattrat call) where the kernel has it and there is a name, else
    *by_path* through /proc/self/fd."""
    global _xattrat
    if name is not None and _xattrat:
        try:
            return relative(dir_fd, name, *arguments)
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            _xattrat = False
    return by_path(fd_path(dir_fd, name), *arguments, follow_symlinks=name is None)


def get_xattr(dir_fd: int, name: str | None, attribute: str) -> bytes | None:
    """The value of *attribute* on (dir_fd, name), or None when it is not set or not supported."""
    try:
        return read_xattr(dir_fd, name, attribute)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
            return None
        raise


def list_xattrs(dir_fd: int, name: str | None) -> list[str]:
    """The xattr names of (dir_fd, name); none where the filesystem or file type has none."""
    try:
        return read_xattr_names(dir_fd, name)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise


def exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


# A location is (directory fd, name) for *at() calls, or (fd of the thing itself, None): a
# directory, or a file held open after its last name went. The helpers below take both.


def stat_location(dir_fd: int, name: str | None) -> os.stat_result:
    if name is None:
        return os.stat(dir_fd)
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


def open_location(dir_fd: int, name: str | None, flags: int, mode: int = 0o777) -> int:
    """open(2) of a location; an fd held on the file itself is reopened through /proc (where
    O_NOFOLLOW would refuse the magic link, and there is no name left to follow anyway)."""
    if name is None:
        return os.open(fd_path(dir_fd), flags & ~os.O_NOFOLLOW, mode)
    return os.open(name, flags | os.O_NOFOLLOW, mode, dir_fd=dir_fd)


def readlink_location(dir_fd: int, name: str | None) -> str:
    # readlinkat with an empty name reads the symlink an O_PATH fd holds.
    return os.readlink(name if name is not None else "", dir_fd=dir_fd)


def path_of(dir_fd: int, name: str | None) -> tuple[str, bool]:
    """A /proc path reaching the location, and the follow_symlinks to pass with it: the magic
    link is followed to the inode it holds, which (even for a symlink) is not followed on."""
    return fd_path(dir_fd, name), name is None


def link_location(source_fd: int, source_name: str | None, dir_fd: int, name: str) -> None:
    """link(2) from a location; a held fd links through /proc (linkat's AT_SYMLINK_FOLLOW)."""
    if source_name is None:
        os.link(fd_path(source_fd), name, dst_dir_fd=dir_fd, follow_symlinks=True)
    else:
        os.link(source_name, name, src_dir_fd=source_fd, dst_dir_fd=dir_fd,
                follow_symlinks=False)
