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
from cowfs.lookup import UPPER, Directory, DirectoryFds, Entry, Name

log = logging.getLogger(__name__)

__all__ = ["UPPER", "CopyUp", "CopyUpStats", "DataCopy", "Staging"]
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
    if os.fstat(target_fd).st_size != size:    # a hole at the end; else no new mtime
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
    target = _at.fd_path(target_dir_fd, target_name)
    for attribute in _at.list_xattrs(source_dir_fd, source_name):
        if whiteout.visible_xattr_name(attribute) is None:
            continue
        value = _at.read_xattr(source_dir_fd, source_name, attribute)
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

    def __init__(self, fds: DirectoryFds, staging: Staging, index_fd: int | None,
                 marks: whiteout.Marks,
                 inode_number: Callable[[Entry], int], durability: Durability) -> None:
        self.fds = fds
        self.durability = durability
        self.stats = CopyUpStats()
        self.marks = marks
        self.staging = staging
        self.index_fd = index_fd
        self._uuids: dict[int, bytes | None] = {}    # layer -> its filesystem's uuid
        self.inode_number = inode_number

    def upper_directory(self, directory: Directory) -> int:
        """The fd of *directory*'s upper copy, copying it (and its parents) up if missing."""
        if directory.layers[0] == UPPER:
            if directory.pinned_fd is not None:    # removed: who holds it still reaches it
                return directory.pinned_fd
            return self.fds.fd(directory, UPPER)
        assert not directory.is_root, "the root always has an upper copy"
        own_name = directory.own_name
        parent_fd = self.upper_directory(own_name.parent)
        existing = _lstat_or_none(parent_fd, own_name.name)
        if existing is None or not stat.S_ISDIR(existing.st_mode):
            for _ in self._stage_and_place(directory, own_name, self._stage_directory):
                raise AssertionError("a directory has no data to copy")
            parent_fd = self.upper_directory(own_name.parent)
        fd = os.open(own_name.name, _at.DIR_PATH_FLAGS, dir_fd=parent_fd)
        directory.stat = os.fstat(fd)
        own_name.has_lower = True
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

    def redirect_metacopy(self, entry: Entry) -> None:
        """Before a metadata-only copy moves or gets another name, point it at its data by
        path from the layer root, as the kernel does (`overlay.redirect` on the file), so that
        every name finds the data after a remount, under either implementation."""
        if not entry.metacopy or entry.data is None:
            return
        self.find_data_by_path(entry)
        _, place = entry.data
        assert isinstance(place, tuple)
        directory_fd, name = entry.location(self.fds)
        self.marks.set_redirect(directory_fd, name, "/" + "/".join(place))

    def find_data_by_path(self, entry: Entry) -> None:
        """Have a metadata-only copy find its data by path from the layer root, not through a
        directory of the merged view: that directory may be removed once the name in it goes
        (the lower copy it held stays where it is: lower layers never change)."""
        if not entry.metacopy or entry.data is None:
            return
        layer, place = entry.data
        if isinstance(place, str):
            assert entry.data_parent is not None
            place = (*self.layer_path(entry.data_parent, layer), place)
            entry.data, entry.data_parent = (layer, place), None

    def layer_path(self, directory: Directory, layer: int) -> tuple[str, ...]:
        """The path from the root of *layer* to *directory*'s copy there."""
        if directory.is_root:
            return ()
        place = directory.places.get(layer, directory.name)
        if isinstance(place, tuple):
            return place
        return (*self.layer_path(directory.parent, layer), place)

    def needs_copy_up(self, entry: Entry, *, data: bool = True, name: Name | None = None
                      ) -> bool:
        if isinstance(entry, Directory):
            return entry.layers[0] != UPPER
        names = [name] if name is not None else entry.names
        return (entry.layer != UPPER or (data and entry.metacopy)
                or any(known.layer != UPPER for known in names))

    def copy_up_steps(self, entry: Entry, *, data: bool = True, name: Name | None = None
                      ) -> CopyUpSteps:
        """Give an entry (a file, whichever name it came by) an upper copy; without *data*, a
        metadata-only one where it can. *name*, one of the entry's names, must then be in the
        upper too (a rename moves it there); without it, every name known of the entry is.

        The copy goes to *name*, or else the entry's first name. A lower file whose names are
        all gone cannot be copied up: EEXIST, as the kernel answers (its copy-up meets what
        now stands at the old name), or ENOENT where the old name's directory is gone too
        (the kernel's copy-up of that directory fails first).
        A metadata-only copy (the kernel's metacopy) of a regular file is a sparse file of the
        same size marked `overlay.metacopy`, whose data stays in the lower copy until the
        first write or truncate. A lower file with several names is always copied whole:
        two metacopies must never share one lower file.
        """
        if isinstance(entry, Directory):
            self.upper_directory(entry)
            return
        if entry.layer != UPPER:
            if name is None and not entry.names:
                if entry.last_parent is not None and entry.last_parent.removed:
                    raise OSError(errno.ENOENT, "the directory of this lower file is gone",
                                  entry.describe())
                raise OSError(errno.EEXIST, "the names of this lower file are gone",
                              entry.describe())
            yield from self._copy_up_file(entry, name or entry.names[0], data=data)
        elif data and entry.metacopy:
            yield from self._copy_up_data(entry)
        # A change made by file (no name) brings every name known of it up, as a change
        # through each name would with the kernel: a reader without cowfs's index (the
        # kernel) then sees the change at each of them.
        for lower_name in [name] if name is not None else list(entry.names):
            if lower_name.layer != UPPER:
                self.link_up(entry, lower_name)

    def _copy_up_file(self, entry: Entry, name: Name, *, data: bool) -> CopyUpSteps:
        # A file of several lower names may hold metadata only when the index makes its names
        # one upper inode (never two metacopies of one lower file).
        metadata_only = (not data and self.fds.stack.format.metacopy
                         and stat.S_ISREG(entry.stat.st_mode)
                         and (entry.stat.st_nlink == 1 or self.index_fd is not None))
        lower_layer = name.layer
        yield from self._stage_and_place(
            entry, name, self._stage_metacopy if metadata_only else self._stage_file)
        self._now_upper(entry, name)
        if metadata_only:
            if not entry.metacopy:    # a lower metacopy's data stays where it was found
                entry.metacopy, entry.data = True, (lower_layer, name.name)
                entry.data_parent = name.parent
            self.stats.metadata_only += 1
        else:
            entry.metacopy, entry.data = False, None

    def link_up(self, entry: Entry, name: Name) -> None:
        """A lower name of a file whose copy is up already (through the index) gets its own
        link to that copy in the upper, as the kernel's index=on does."""
        source_fd, source_name = entry.location(self.fds)
        parent_fd = self.upper_directory(name.parent)
        parent_times = os.stat(parent_fd)
        _at.link_location(source_fd, source_name, parent_fd, name.name)
        self.durability.changed(parent_fd)
        _keep_times(parent_fd, parent_times)   # as for a copy-up: the parent did not change
        name.layer, name.has_lower = UPPER, True
        self.stats.copy_ups += 1

    def drop_metacopy(self, entry: Entry) -> None:
        """A metadata-only copy that was truncated to nothing has all its data: unmark it."""
        directory_fd, name = entry.location(self.fds)
        self.marks.clear_metacopy(directory_fd, name)
        entry.metacopy, entry.data, entry.data_parent = False, None, None

    def _now_upper(self, entry: Entry, name: Name) -> None:
        parent_fd = self.upper_directory(name.parent)
        entry.layer = name.layer = UPPER
        name.has_lower = True
        entry.stat = os.stat(name.name, dir_fd=parent_fd, follow_symlinks=False)

    def _copy_up_data(self, entry: Entry) -> CopyUpSteps:
        """Fill a metadata-only upper copy with its data, then drop the metacopy mark.

        Until the mark goes, readers use the lower data: a crash half-way changes nothing.
        Writing data drops security.capability, so it is put back, as the kernel does. The
        times are not put back: writing the data stamps mtime and ctime, which the kernel
        shows too (an open for write of a metacopy file is a change to it, as it is there).
        """
        started = time.perf_counter()
        directory_fd, name = entry.location(self.fds)
        st = _at.stat_location(directory_fd, name)
        capability = _at.get_xattr(directory_fd, name, _CAPABILITY)
        yield from self._data_copy(
            lookup.open_data(self.fds, entry, _READ_FLAGS),
            lambda: _at.open_location(directory_fd, name, os.O_WRONLY | os.O_CLOEXEC),
            st.st_size)
        directory_fd, name = entry.location(self.fds)   # the fd may have been recycled
        path, follow = _at.path_of(directory_fd, name)
        if capability is not None:
            os.setxattr(path, _CAPABILITY, capability, follow_symlinks=follow)
        self.marks.clear_metacopy(directory_fd, name)
        if name is not None:
            self.durability.changed(directory_fd)
        entry.metacopy, entry.data, entry.data_parent = False, None, None
        self.stats.seconds += time.perf_counter() - started
        log.debug("copied up the data of %s", entry.describe())

    def _stage_and_place(self, entry: Entry, target: Name,
                         stage: Callable[[Entry, os.stat_result, str], CopyUpSteps]
                         ) -> CopyUpSteps:
        """Make the copy in staging, then rename it into the upper parent at *target*, one of
        the entry's names, in one step."""
        started = time.perf_counter()
        source_dir_fd, source_name = entry.location(self.fds)
        st = _at.stat_location(source_dir_fd, source_name)
        origin_ino = self.inode_number(entry)
        staged = self.staging.new_name()
        try:
            yield from stage(entry, st, staged)
            # Directory fds may have been recycled while the data was copied: fetch them anew.
            source_dir_fd, source_name = entry.location(self.fds)
            copy_metadata(source_dir_fd, source_name, st, self.staging.fd, staged)
            # The kernel's origin gives the number to either reader; cowfs's own record only
            # where there is none (an inode's inline xattr room is small: a second record
            # would cost a block per copy).
            kernel_origin = self._kernel_origin(entry, st, source_dir_fd, source_name)
            if kernel_origin is not None:
                self.marks.set_origin(self.staging.fd, staged, kernel_origin)
            else:
                self.marks.record_origin_ino(self.staging.fd, staged, origin_ino)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and self.index_fd is not None:
                self._index(staged, origin_ino, st.st_nlink, entry)
            parent_fd = self.upper_directory(target.parent)
            parent_times = os.stat(parent_fd)
            _libc.renameat2(self.staging.fd, staged, parent_fd, target.name,
                            _libc.RENAME_NOREPLACE)
        except BaseException:
            self.staging.remove(staged)
            raise
        if kernel_origin is not None:
            self.marks.set_impure(parent_fd)
        self.durability.changed(parent_fd)
        self.stats.copy_ups += 1
        self.stats.directories += stat.S_ISDIR(st.st_mode)
        self.stats.seconds += time.perf_counter() - started
        log.debug("copied up %r (inode %d)", target.name, origin_ino)
        _keep_times(parent_fd, parent_times)   # as the kernel: a copy-up changes no parent
        entry.origin_ino = origin_ino

    def _kernel_origin(self, entry: Entry, st: os.stat_result, source_dir_fd: int,
                       source_name: str | None) -> bytes | None:
        """The kernel's overlay.origin for a copy of this lower file, so that the kernel shows
        the same inode number as cowfs; None where the kernel would not use one: a lower file
        of several names (its copy stands for one name only, without the kernel's index), a
        filesystem without file handles or whose uuid this kernel does not tell (before
        Linux 6.5), `user.overlay.` xattrs (no handles unprivileged)."""
        if entry.layer == UPPER or self.marks.prefix != whiteout.OVERLAY_XATTR_PREFIXES[0] \
                or (not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1):
            return None
        uuid = self._filesystem_uuid(entry.layer)
        if uuid is None:
            return None
        try:
            handle_type, handle = _libc.name_to_handle_at(source_dir_fd, source_name)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EOVERFLOW, errno.ENOSYS):
                return None
            raise
        return whiteout.encode_origin(uuid, handle_type, handle)

    def forget_layers(self) -> None:
        """The stack's layers changed: what was learnt of them by index is void."""
        self._uuids.clear()

    def _filesystem_uuid(self, layer: int) -> bytes | None:
        if layer not in self._uuids:
            self._uuids[layer] = filesystem_uuid(self.fds.stack.layers[layer].fd)
        return self._uuids[layer]

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
            os.symlink(_at.readlink_location(source_dir_fd, source_name), staged,
                       dir_fd=self.staging.fd)
        else:
            os.mknod(staged, mode, st.st_rdev, dir_fd=self.staging.fd)


def _lstat_or_none(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _keep_times(directory_fd: int, st: os.stat_result) -> None:
    os.utime(_at.fd_path(directory_fd), ns=(st.st_atime_ns, st.st_mtime_ns))


def filesystem_uuid(directory_fd: int) -> bytes | None:
    """The 16-byte uuid of the filesystem *directory_fd* is on (FS_IOC_GETFSUUID, Linux 6.5),
    as the kernel's overlay records it; None where the kernel does not tell."""
    fd = os.open(_at.fd_path(directory_fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        answer = bytearray(17)                # struct fsuuid2: a length, then 16 bytes
        fcntl.ioctl(fd, _libc.FS_IOC_GETFSUUID, answer)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            return None
        raise
    finally:
        os.close(fd)
    return bytes(answer[1:17]) if answer[0] == 16 else None
