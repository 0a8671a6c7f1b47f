"""The merged tree as a plain synchronous API: what cowfs serves, without FUSE.

Another runtime can open a stack and read the union through this class; mount.py is a thin
FUSE face over it. Every method raises OSError with the errno a filesystem would return.
"""

import errno
import logging
import os

from cowfs import _at, lookup, whiteout
from cowfs.layers import LayerStack
from cowfs.lookup import Directory, DirectoryFds, Entry

log = logging.getLogger(__name__)

_WRITE_ACCESS = os.O_WRONLY | os.O_RDWR
# Flags a caller may pass to open() that must not reach a layer file.
# O_DIRECT: the kernel's page cache sits between the caller and us; our buffers are unaligned.
_DROPPED_OPEN_FLAGS = (os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND | os.O_NOCTTY
                       | os.O_DIRECT)


class Union:
    """A layer stack seen as one tree. Not thread-safe: one caller at a time."""

    def __init__(self, stack: LayerStack, *, fd_budget: int = lookup.DEFAULT_FD_BUDGET) -> None:
        self.stack = stack
        self.fds = DirectoryFds(stack, fd_budget)
        self.root = lookup.make_root(stack)

    def close(self) -> None:
        self.fds.close_all()
        self.stack.close()

    def __enter__(self) -> "Union":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- names ------------------------------------------------------------------------------

    def lookup(self, parent: Entry, name: str) -> Entry | None:
        """The entry *name* in *parent*, or None when the merged view has no such name."""
        return lookup.lookup(self.fds, self._directory(parent), name)

    def resolve(self, path: str) -> Entry | None:
        """The entry at a /-separated path from the root (a convenience for library users)."""
        entry: Entry | None = self.root
        for name in path.strip("/").split("/"):
            if name and entry is not None:
                entry = self.lookup(entry, name)
        return entry

    def list_names(self, directory: Entry) -> list[str]:
        """The visible names in *directory* (without . and ..), each resolved once."""
        directory = self._directory(directory)
        return [name for name in lookup.read_merged_names(self.fds, directory)
                if self.lookup(directory, name) is not None]

    def read_merged_names(self, directory: Entry) -> list[str]:
        """Candidate names of *directory*, some perhaps hidden: resolve each before showing it."""
        return lookup.read_merged_names(self.fds, self._directory(directory))

    def layer_path(self, entry: Entry) -> str:
        """The root path of the layer that supplies *entry*."""
        return self.stack.layers[entry.layer].path

    # -- attributes and data ----------------------------------------------------------------

    def stat(self, entry: Entry) -> os.stat_result:
        return lookup.stat_entry(self.fds, entry)

    def open(self, entry: Entry, flags: int) -> int:
        """An fd on the entry's file for reading; writing needs the write path (EROFS)."""
        if flags & _WRITE_ACCESS or flags & os.O_TRUNC:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), entry.name)
        if entry.is_directory:
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), entry.name)
        directory_fd, name = entry.location(self.fds)
        flags = (flags & ~_DROPPED_OPEN_FLAGS) | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(name, flags, dir_fd=directory_fd)

    def readlink(self, entry: Entry) -> str:
        if entry.is_directory:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), entry.name)
        directory_fd, name = entry.location(self.fds)
        return os.readlink(name, dir_fd=directory_fd)

    def get_xattr(self, entry: Entry, attribute: str) -> bytes:
        """A user-visible xattr: asking for `trusted.overlay.X` reads the user's own, escaped
        copy, so overlay's private xattrs cannot be read through the union."""
        directory_fd, name = self._xattr_target(entry)
        return os.getxattr(_at.fd_path(directory_fd, name), whiteout.stored_xattr_name(attribute),
                           follow_symlinks=name is None)

    def list_xattrs(self, entry: Entry) -> list[str]:
        directory_fd, name = self._xattr_target(entry)
        names = (whiteout.visible_xattr_name(stored)
                 for stored in _at.list_xattrs(directory_fd, name))
        return [visible for visible in names if visible is not None]

    def statfs(self) -> os.statvfs_result:
        """The top layer's filesystem: where new data would go."""
        return os.statvfs(_at.fd_path(self.stack.top.fd))

    # -- helpers ----------------------------------------------------------------------------

    def _directory(self, entry: Entry) -> Directory:
        if not isinstance(entry, Directory):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), entry.name)
        return entry

    def _xattr_target(self, entry: Entry) -> tuple[int, str | None]:
        if isinstance(entry, Directory):
            return self.fds.fd(entry, entry.layer), None
        return entry.location(self.fds)
