"""Copy an entry, and its missing parent directories, from a lower layer into the upper.

Everything is made in the workdir's staging area and renamed into place, so the upper never
shows a half-made copy: a crash leaves the old view and debris in staging, swept at next mount.
Order matters: data first (writing data drops security.capability), then owner (chown clears
setuid bits and capabilities), then xattrs, then mode, then times (every step above touches them).
"""

import dataclasses
import errno
import fcntl
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Generator

from cowfs import _at, _libc, lookup, whiteout
from cowfs.durability import Durability
from cowfs.lookup import Directory, DirectoryFds, Entry

log = logging.getLogger(__name__)

UPPER = 0     # the upper layer's index in LayerStack.layers, when there is one
_CHUNK_BYTES = 1 << 20
# copy_file_range cannot serve these (old kernels, cross-filesystem, special files).
_NO_COPY_RANGE = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}
_CAPABILITY = "security.capability"
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_NO_CLONE = {errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EBADF}


class Staging:
    """Unique names in the workdir's staging directory, which this mount alone uses."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._counter = 0

    def new_name(self) -> str:
        self._counter += 1
        return f"#{self._counter:x}"

    def remove(self, name: str) -> None:
        """Remove whatever *name* in staging is, directory trees included; never raises."""
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(name, dir_fd=self.fd)
            else:
                os.unlink(name, dir_fd=self.fd)
        except OSError as exc:
            log.warning("cannot remove %s from staging: %s", name, exc)


def copy_data(source_fd: int, target_fd: int, size: int) -> tuple[bool, int]:
    """Copy a file's data: reflink if the filesystem can, else only its data extents.

    Returns whether it was a reflink, and the bytes copied (fewer than *size* over holes).
    """
    try:
        fcntl.ioctl(target_fd, _libc.FICLONE, source_fd)
        return True, size
    except OSError as exc:
        if exc.errno not in _NO_CLONE:
            raise
    offset = copied = 0
    while offset < size:
        try:
            data = os.lseek(source_fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:     # only a hole remains
                break
            raise
        hole = os.lseek(source_fd, data, os.SEEK_HOLE)
        _copy_range(source_fd, target_fd, data, hole - data)
        copied += hole - data
        offset = hole
    os.ftruncate(target_fd, size)
    return False, copied


def _copy_range(source_fd: int, target_fd: int, offset: int, length: int) -> None:
    end = offset + length
    try:
        while offset < end:
            copied = os.copy_file_range(source_fd, target_fd, end - offset, offset, offset)
            if copied == 0:
                return
            offset += copied
    except OSError as exc:
        if exc.errno not in _NO_COPY_RANGE:
            raise
        while offset < end:
            chunk = os.pread(source_fd, min(_CHUNK_BYTES, end - offset), offset)
            if not chunk:
                return
            offset += os.pwrite(target_fd, chunk, offset)


def copy_xattrs(source_dir_fd: int, source_name: str | None, target_dir_fd: int,
                target_name: str | None) -> None:
    """Every xattr but overlay's own private ones (a user's escaped ones are data)."""
    source = _at.fd_path(source_dir_fd, source_name)
    target = _at.fd_path(target_dir_fd, target_name)
    for attribute in _at.list_xattrs(source_dir_fd, source_name):
        if whiteout.visible_xattr_name(attribute) is None:
            continue
        value = os.getxattr(source, attribute, follow_symlinks=source_name is None)
        os.setxattr(target, attribute, value, follow_symlinks=target_name is None)


def copy_metadata(source_dir_fd: int, source_name: str | None, st: os.stat_result,
                  target_dir_fd: int, target_name: str) -> None:
    """Owner, xattrs, mode and times of *st* onto a staged copy, in the order that keeps them."""
    os.chown(target_name, st.st_uid, st.st_gid, dir_fd=target_dir_fd, follow_symlinks=False)
    copy_xattrs(source_dir_fd, source_name, target_dir_fd, target_name)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(target_name, stat.S_IMODE(st.st_mode), dir_fd=target_dir_fd)
    os.utime(target_name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=target_dir_fd,
             follow_symlinks=False)


@dataclasses.dataclass
class DataCopy:
    """The slow part of a copy-up, filling a file with data: it touches only its own two fds,
    so a caller may run it in another thread while it serves other requests."""

    source_fd: int
    target_fd: int
    size: int
    sync: bool = False          # fsync the copy before it is placed (`fsync=strict`)
    reflinked: bool = False
    copied_bytes: int = 0

    def run(self) -> None:
        self.reflinked, self.copied_bytes = copy_data(self.source_fd, self.target_fd, self.size)
        if self.sync:
            os.fsync(self.target_fd)


@dataclasses.dataclass
class CopyUpStats:
    """What copy-up did on a mount so far; a mount shows it as a virtual xattr on its root."""

    copy_ups: int = 0           # entries given an upper copy (files, directories, links)
    directories: int = 0
    metadata_only: int = 0      # files copied without their data (the kernel's metacopy)
    data_copies: int = 0        # files whose data was copied, at copy-up or later
    data_bytes: int = 0         # bytes of data copied; holes and reflinks copy none
    reflinks: int = 0
    sparse: int = 0             # data copies that skipped holes
    seconds: float = 0.0        # wall time spent in copy-ups, data copies included

    def count_data(self, copy: DataCopy) -> None:
        self.data_copies += 1
        if copy.reflinked:
            self.reflinks += 1
        else:
            self.data_bytes += copy.copied_bytes
            self.sparse += copy.copied_bytes < copy.size


# A copy-up in steps: the generator yields each data copy for its caller to run, then goes on.
CopyUpSteps = Generator[DataCopy, None, None]


class CopyUp:
    """Copies entries up through *staging*; *inode_number* gives the number to keep."""

    def __init__(self, fds: DirectoryFds, staging: Staging, index_fd: int, marks: whiteout.Marks,
                 inode_number: Callable[[Entry], int], durability: Durability) -> None:
        self.fds = fds
        self.durability = durability
        self.stats = CopyUpStats()
        self.marks = marks
        self.staging = staging
        self.index_fd = index_fd
        self.inode_number = inode_number

    def upper_directory(self, directory: Directory) -> int:
        """The fd of *directory*'s upper copy, copying it (and its parents) up if missing."""
        if directory.layers[0] == UPPER:
            return self.fds.fd(directory, UPPER)
        assert directory.parent is not None, "the root always has an upper copy"
        parent_fd = self.upper_directory(directory.parent)
        existing = _lstat_or_none(parent_fd, directory.name)
        if existing is None or not stat.S_ISDIR(existing.st_mode):
            for _ in self._stage_and_place(directory, self._stage_directory):
                raise AssertionError("a directory has no data to copy")
            parent_fd = self.upper_directory(directory.parent)
        fd = os.open(directory.name, _at.DIR_PATH_FLAGS, dir_fd=parent_fd)
        directory.stat = os.fstat(fd)
        directory.has_lower = True
        self.fds.add_layer_on_top(directory, UPPER, fd)
        if directory.places:           # its lower copies are elsewhere: say where
            self.redirect(directory)
        return self.fds.fd(directory, UPPER)

    def redirect(self, directory: Directory) -> None:
        """Point the upper copy at its lower copies by path, so it may move anywhere.

        The kernel's `redirect_dir` format: `overlay.redirect` = the topmost lower copy's path
        from the layer root. From then on each lower copy is found by its own path.
        """
        lower_layers = [layer for layer in directory.layers if layer != UPPER]
        if not lower_layers:
            return
        places = {layer: self.layer_path(directory, layer) for layer in lower_layers}
        value = "/" + "/".join(places[lower_layers[0]])
        self.marks.set_redirect(self.fds.fd(directory, UPPER), None, value)
        directory.places.update(places)
        log.debug("redirect %r -> %s", directory.name, value)

    def layer_path(self, directory: Directory, layer: int) -> tuple[str, ...]:
        """The path from the root of *layer* to *directory*'s copy there."""
        if directory.parent is None:
            return ()
        place = directory.places.get(layer, directory.name)
        if isinstance(place, tuple):
            return place
        return (*self.layer_path(directory.parent, layer), place)

    def needs_copy_up(self, entry: Entry, *, data: bool = True) -> bool:
        if isinstance(entry, Directory):
            return entry.layers[0] != UPPER
        return entry.layer != UPPER or (data and entry.metacopy)

    def copy_up_steps(self, entry: Entry, *, data: bool = True) -> CopyUpSteps:
        """Give an entry an upper copy; without *data*, a metadata-only one where it can.

        A metadata-only copy (the kernel's metacopy) of a regular file is a sparse file of the
        same size marked `overlay.metacopy`, whose data stays in the lower copy until the
        first write or truncate. A lower file with several names is always copied whole:
        two metacopies must never share one lower file.
        """
        if isinstance(entry, Directory):
            self.upper_directory(entry)
            return
        if entry.layer == UPPER:
            if data and entry.metacopy:
                yield from self._copy_up_data(entry)
            return
        assert entry.parent is not None
        if entry.index_name is not None:
            # Another name of this file is up already: this name becomes a link to it.
            parent_fd = self.upper_directory(entry.parent)
            os.link(entry.index_name, entry.name, src_dir_fd=self.index_fd, dst_dir_fd=parent_fd,
                    follow_symlinks=False)
            self.durability.changed(parent_fd)
            self._now_upper(entry, parent_fd)
            self.stats.copy_ups += 1
            return
        metadata_only = (not data and stat.S_ISREG(entry.stat.st_mode)
                         and entry.stat.st_nlink == 1)
        lower_layer = entry.layer
        yield from self._stage_and_place(
            entry, self._stage_metacopy if metadata_only else self._stage_file)
        self._now_upper(entry, self.upper_directory(entry.parent))
        if metadata_only:
            if not entry.metacopy:    # a lower metacopy's data stays where it was found
                entry.metacopy, entry.data = True, (lower_layer, entry.name)
            self.stats.metadata_only += 1
        else:
            entry.metacopy, entry.data = False, None

    def drop_metacopy(self, entry: Entry) -> None:
        """A metadata-only copy that was truncated to nothing has all its data: unmark it."""
        directory_fd, name = entry.location(self.fds)
        self.marks.clear_metacopy(directory_fd, name)
        entry.metacopy, entry.data = False, None

    def _now_upper(self, entry: Entry, parent_fd: int) -> None:
        entry.layer = UPPER
        entry.stat = os.stat(entry.name, dir_fd=parent_fd, follow_symlinks=False)
        entry.has_lower = True

    def _copy_up_data(self, entry: Entry) -> CopyUpSteps:
        """Fill a metadata-only upper copy with its data, then drop the metacopy mark.

        Until the mark goes, readers use the lower data: a crash half-way changes nothing.
        Writing data drops security.capability, so it is put back, as the kernel does.
        """
        started = time.perf_counter()
        directory_fd, name = entry.location(self.fds)
        st = os.stat(name, dir_fd=directory_fd, follow_symlinks=False)
        capability = _at.get_xattr(directory_fd, name, _CAPABILITY)
        yield from self._data_copy(
            lookup.open_data(self.fds, entry, _READ_FLAGS),
            lambda: os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                            dir_fd=directory_fd),
            st.st_size)
        directory_fd, name = entry.location(self.fds)   # the fd may have been recycled
        if capability is not None:
            os.setxattr(_at.fd_path(directory_fd, name), _CAPABILITY, capability,
                        follow_symlinks=False)
        self.marks.clear_metacopy(directory_fd, name)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=directory_fd,
                 follow_symlinks=False)
        self.durability.changed(directory_fd)
        entry.metacopy, entry.data = False, None
        self.stats.seconds += time.perf_counter() - started
        log.debug("copied up the data of %r", name)

    def _stage_and_place(self, entry: Entry,
                         stage: Callable[[Entry, os.stat_result, str], CopyUpSteps]
                         ) -> CopyUpSteps:
        """Make the copy in staging, then rename it into the upper parent in one step."""
        assert entry.parent is not None
        started = time.perf_counter()
        source_dir_fd, source_name = self._source(entry)
        st = os.stat(source_name, dir_fd=source_dir_fd, follow_symlinks=False) \
            if source_name is not None else os.stat(source_dir_fd)
        origin_ino = self.inode_number(entry)
        staged = self.staging.new_name()
        try:
            yield from stage(entry, st, staged)
            # Directory fds may have been recycled while the data was copied: fetch them anew.
            source_dir_fd, source_name = self._source(entry)
            copy_metadata(source_dir_fd, source_name, st, self.staging.fd, staged)
            self.marks.record_origin_ino(self.staging.fd, staged, origin_ino)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                self._index(staged, origin_ino, st.st_nlink, entry)
            parent_fd = self.upper_directory(entry.parent)
            parent_times = os.stat(parent_fd)
            _libc.renameat2(self.staging.fd, staged, parent_fd, entry.name,
                            _libc.RENAME_NOREPLACE)
        except BaseException:
            self.staging.remove(staged)
            raise
        self.durability.changed(parent_fd)
        self.stats.copy_ups += 1
        self.stats.directories += stat.S_ISDIR(st.st_mode)
        self.stats.seconds += time.perf_counter() - started
        log.debug("copied up %r (inode %d)", entry.name, origin_ino)
        # As the kernel: the parent's times do not change for a copy-up.
        os.utime(_at.fd_path(parent_fd), ns=(parent_times.st_atime_ns, parent_times.st_mtime_ns))
        entry.origin_ino = origin_ino

    def _index(self, staged: str, origin_ino: int, link_count: int, entry: Entry) -> None:
        """Link a finished copy into the index, where the file's other lower names find it.

        Like the kernel's `index=on`: one upper inode for all the lower names of a file, so
        they stay linked. The index entry counts the merged view's names of the file.
        """
        index_name = f"{origin_ino:x}"
        self.marks.write_link_count(self.staging.fd, staged, link_count)
        os.link(staged, index_name, src_dir_fd=self.staging.fd, dst_dir_fd=self.index_fd,
                follow_symlinks=False)
        entry.index_name = index_name

    def _source(self, entry: Entry) -> tuple[int, str | None]:
        if isinstance(entry, Directory):
            return self.fds.fd(entry, entry.layer), None
        return entry.location(self.fds)

    def _data_copy(self, source: int, open_target: Callable[[], int], size: int
                   ) -> CopyUpSteps:
        """Yield the copy of *size* bytes from *source* into the file *open_target* opens.

        Both fds are closed afterwards, however the caller ends the steps.
        """
        try:
            target = open_target()
            try:
                copy = DataCopy(source, target, size, sync=self.durability.sync_copies)
                yield copy
                self.stats.count_data(copy)
                self.durability.syncs += copy.sync
            finally:
                os.close(target)
        finally:
            os.close(source)

    def _stage_metacopy(self, entry: Entry, st: os.stat_result, staged: str) -> CopyUpSteps:
        target = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                         dir_fd=self.staging.fd)
        try:
            os.ftruncate(target, st.st_size)
        finally:
            os.close(target)
        self.marks.set_metacopy(self.staging.fd, staged)
        yield from ()

    def _stage_directory(self, entry: Entry, st: os.stat_result, staged: str) -> CopyUpSteps:
        os.mkdir(staged, 0o700, dir_fd=self.staging.fd)
        yield from ()

    def _stage_file(self, entry: Entry, st: os.stat_result, staged: str) -> CopyUpSteps:
        source_dir_fd, source_name = entry.location(self.fds)
        mode = st.st_mode
        if stat.S_ISREG(mode):
            # A lower metacopy's own file is a sparse stand-in: the data is further down.
            source = lookup.open_data(self.fds, entry, _READ_FLAGS) if entry.metacopy \
                else os.open(source_name, _READ_FLAGS, dir_fd=source_dir_fd)
            yield from self._data_copy(
                source,
                lambda: os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                0o600, dir_fd=self.staging.fd),
                st.st_size)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(source_name, dir_fd=source_dir_fd), staged,
                       dir_fd=self.staging.fd)
        else:
            os.mknod(staged, mode, st.st_rdev, dir_fd=self.staging.fd)


def _lstat_or_none(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
