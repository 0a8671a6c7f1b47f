"""The merged tree as a plain synchronous API: what cowfs serves, without FUSE.

Another runtime can open a stack and use the union through this class; mount.py is a thin FUSE
face over it. Every method raises OSError with the errno a filesystem would return.

An Entry is a file, not a name (the kernel's inodes, with its dentries as `Name`s on them), and
entries are canonical: while anyone holds the Entry of a file, looking up any of its names gives
that same object, and every change made here updates it (copy-up moves its copy to the upper,
rename moves one of its names, unlink takes a name away). What arrives by entry (setattr, open,
xattrs, link's source) acts on the file itself whatever happened to its names since.
"""

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import stat
import weakref
from collections.abc import Callable, Iterable, Mapping

from cowfs import _at, _libc, durability, lookup, whiteout
from cowfs.copyup import UPPER, CopyUp, CopyUpSteps, Staging
from cowfs.layers import Layer, LayerStack
from cowfs.lookup import Directory, DirectoryFds, Entry, Listing, Name

log = logging.getLogger(__name__)

ROOT_INO = 1                       # the merged root's inode number (FUSE's root node id)
_WRITE_ACCESS = os.O_WRONLY | os.O_RDWR
# Flags a caller may pass to open() that must not reach a layer file: creation is done here,
# O_APPEND would make the kernel's positioned writes append, the page cache is not aligned.
_DROPPED_OPEN_FLAGS = (os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOCTTY | os.O_DIRECT)
_SPECIAL_MODE_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX
# The most one copy_range call copies: a request is served while all others wait, and an
# in-kernel copy of this much takes milliseconds (a reflink, any length, takes none).
COPY_RANGE_MAX_BYTES = 16 << 20


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who asks: new entries are owned by the caller, as on any filesystem."""

    uid: int
    gid: int


ROOT = Caller(0, 0)


def _error(code: int, name: str | None = None) -> OSError:
    return OSError(code, os.strerror(code), name)


class InodeNumbers:
    """Maps (st_dev, st_ino) of a layer file to the number the merged view shows.

    The topmost copy's own inode number, so hard links of one lower file are one inode and the
    same number comes back after a remount. Layers on several filesystems get the filesystem's
    index in the top bits (the kernel's `xino` idea).
    """

    _BITS = 64

    def __init__(self, stack: LayerStack) -> None:
        devices = list(dict.fromkeys(layer.st_dev for layer in stack.layers))
        self._index = {device: index for index, device in enumerate(devices)}
        # One spare index above the layers' filesystems numbers what does not fit.
        bits = len(devices).bit_length()
        self._spare_index = (1 << bits) - 1
        self._shift = self._BITS - bits
        self._remapped: dict[tuple[int, int], int] = {}

    def number(self, st: os.stat_result) -> int:
        return self.number_of(st.st_dev, st.st_ino)

    def number_of(self, device: int, ino: int) -> int:
        index = self._index.get(device)
        if index is None and len(self._index) < self._spare_index:
            # A filesystem mounted inside a layer: numbered from now on, not across remounts.
            index = self._index[device] = len(self._index)
        if index is not None and ino >> self._shift == 0:
            number = (index << self._shift) | ino
            if number > ROOT_INO:
                return number
        return self._remap(device, ino)

    def _remap(self, device: int, ino: int) -> int:
        key = (device, ino)
        number = self._remapped.get(key)
        if number is None:
            if not self._remapped:
                log.warning("inode numbers of device %d do not fit; those may change at remount",
                            device)
            number = (self._spare_index << self._shift) | (len(self._remapped) + 2)
            self._remapped[key] = number
        return number


class Union:
    """A layer stack seen as one tree. Not thread-safe: one caller at a time."""

    def __init__(self, stack: LayerStack, *, fd_budget: int = lookup.DEFAULT_FD_BUDGET,
                 fsync: str = durability.BATCH) -> None:
        """*fsync* is when changes reach the disk: `strict`, `batch` or `volatile`
        (`cowfs.durability`)."""
        self.stack = stack
        self.fds = DirectoryFds(stack, fd_budget)
        self.root = lookup.make_root(stack)
        self.numbers = InodeNumbers(stack)
        self.upper: int | None = UPPER if stack.upper is not None else None
        # Names to the entries they show, and inode numbers to the file entries that have
        # them: another name of a known file is that same entry. Weak: what nobody holds goes.
        self._entries: weakref.WeakValueDictionary[tuple[Directory, str], Entry] = \
            weakref.WeakValueDictionary()
        self._files: weakref.WeakValueDictionary[int, Entry] = weakref.WeakValueDictionary()
        self._handle_anchors: dict[int, int] = {}    # st_dev -> fd, for open_by_handle_at
        self._copy_up: CopyUp | None = None
        self.durability: durability.Durability | None = None
        self.index_fd: int | None = None
        if stack.upper is not None:
            assert stack.work is not None, "an upper layer comes with a workdir"
            self.staging = Staging(stack.work.staging_fd)
            # index=off: no index is kept (lower hard links part once copied up, as the
            # kernel's do after a remount).
            self.index_fd = stack.work.index_fd if stack.format.index else None
            self.marks = whiteout.Marks(stack.xattr_prefix)
            self.durability = durability.Durability(stack, fsync)
            self._copy_up = CopyUp(self.fds, self.staging, self.index_fd, self.marks,
                                   self.inode_number, self.durability)

    def close(self) -> None:
        """Everything durable (but for `volatile`), every fd closed."""
        try:
            if self.durability is not None:
                self.durability.close()
        finally:
            for fd in self._handle_anchors.values():
                os.close(fd)
            self._handle_anchors.clear()
            self.fds.close_all()
            self.stack.close()

    def statistics(self) -> dict[str, object]:
        """Copy-up counts and times, the durability mode, and what is held in memory: what a
        mount's root shows."""
        held = {"entries": len(self._entries), "files": len(self._files),
                "directories_open": self.fds.open_directories}
        if self._copy_up is None or self.durability is None:
            return {"fsync": None, **held}
        return {**dataclasses.asdict(self._copy_up.stats), "fsync": self.durability.mode,
                "syncs": self.durability.syncs, "pending": self.durability.unsynced, **held}

    def shrink(self) -> None:
        """Build the tables of names, files and open directories again at the size they now
        need: after the kernel forgot most of what it knew, they would keep their largest
        size (docs/ARCHITECTURE.md, "Memory that follows the kernel")."""
        self._entries = weakref.WeakValueDictionary(self._entries)
        self._files = weakref.WeakValueDictionary(self._files)
        self.fds.shrink()

    # -- layers that change under the mount (docs/ARCHITECTURE.md, "Live mounts") ----------

    def refresh(self, known: Iterable[Entry], open_entries: Iterable[Entry] = (),
                layers: list[Layer] | None = None) -> "Refreshed":
        """Forget what was read of the layers (after a lower changed, or with the stack
        *layers* in place of today's) and find each *known* entry again by its names.

        An entry found again is the same file if it has the same number (a directory: the
        same path); the caller moves its holders to the new entry. One that is not is
        retired, as if removed: no name reaches it any more, and only those in
        *open_entries*, pinned first, still reach their file. Every later lookup sees the
        new stack.
        """
        known = [entry for entry in dict.fromkeys(known) if entry is not self.root]
        numbers = {entry: self.inode_number(entry) for entry in known}
        old_layers = list(self.stack.layers)
        new_layers = old_layers if layers is None else layers
        moved = {index: (new_layers.index(layer) if layer in new_layers else None)
                 for index, layer in enumerate(old_layers)}
        for entry in open_entries:
            if not entry.removed and entry.names:
                entry.pin(self.fds)
        self.fds.close_all()
        self._entries.clear()
        self._files.clear()
        self.stack.layers[:] = new_layers
        if self._copy_up is not None:
            self._copy_up.forget_layers()
        old_root, self.root = self.root, lookup.make_root(self.stack)
        directories: dict[Directory, Directory | None] = {old_root: self.root}
        refreshed = Refreshed(moved)
        for entry in known:
            found = self._find_again(entry, directories)
            if found is None:
                refreshed.gone.append(entry)
                _renumber_layers(entry, moved)
                if entry.names:
                    entry.last_parent = entry.names[0].parent
                entry.names, entry.removed = [], True
                continue
            refreshed.found[entry] = found
            if self.inode_number(found) != numbers[entry]:
                refreshed.renumbered.add(entry)
        return refreshed

    def _find_again(self, entry: Entry, directories: "dict[Directory, Directory | None]"
                    ) -> Entry | None:
        if entry.removed or not entry.names:
            return None
        if isinstance(entry, Directory):
            return self._directory_again(entry, directories)
        number = self.inode_number(entry)
        for name in entry.names:
            parent = self._directory_again(name.parent, directories)
            candidate = self._lookup_again(parent, name.name) if parent is not None else None
            if candidate is not None and not candidate.is_directory and \
                    stat.S_IFMT(candidate.stat.st_mode) == stat.S_IFMT(entry.stat.st_mode) and \
                    self.inode_number(candidate) == number:
                return candidate
        return None

    def _directory_again(self, old: Directory, directories: "dict[Directory, Directory | None]"
                         ) -> Directory | None:
        if old in directories:
            return directories[old]
        found = None
        if old.names and not old.removed:
            parent = self._directory_again(old.parent, directories)
            candidate = self._lookup_again(parent, old.name) if parent is not None else None
            if isinstance(candidate, Directory):
                found = candidate
        directories[old] = found
        return found

    def _lookup_again(self, parent: Directory, name: str) -> Entry | None:
        try:
            return self.lookup(parent, name)
        except OSError:          # unreadable now (BrokenEntry, EACCES...): not the same file
            return None

    def layer_needed(self, index: int, open_entries: Mapping[Entry, str]) -> str | None:
        """Why the lower layer at *index* cannot go, if something still needs it: a file open
        from it (*open_entries*: each open entry and how to name it), or a metacopy or
        redirect of the upper that reads it."""
        path = self.stack.layers[index].path
        for entry, shown_as in open_entries.items():
            data_layer = entry.data[0] if entry.metacopy and entry.data else None
            layers = entry.layers if isinstance(entry, Directory) else (entry.layer,)
            if layers == (index,) or data_layer == index:
                return f"{shown_as} is open from lower layer {path}"
        if self.upper is None:
            return None
        upper_root = _at.fd_path(self.stack.layers[UPPER].fd)
        metacopy = self.stack.xattr_prefix + whiteout.METACOPY
        redirect = self.stack.xattr_prefix + whiteout.REDIRECT
        for directory, subdirectories, files in os.walk(upper_root):
            relative = os.path.relpath(directory, upper_root)
            for name, attribute in [*((name, redirect) for name in subdirectories),
                                    *((name, metacopy) for name in files)]:
                try:
                    os.getxattr(os.path.join(directory, name), attribute,
                                follow_symlinks=False)
                except OSError:
                    continue
                shown = os.path.normpath(os.path.join(relative, name))
                entry = self.resolve(shown)
                if entry is None:
                    continue
                if entry.metacopy and entry.data is not None and entry.data[0] == index:
                    return f"metacopy {shown} of the upper takes its data from lower layer {path}"
                if isinstance(entry, Directory) and index in entry.places:
                    return f"redirect {shown} of the upper leads into lower layer {path}"
        return None

    def __enter__(self) -> "Union":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def writable(self) -> bool:
        return self._copy_up is not None

    # -- names ------------------------------------------------------------------------------

    def lookup(self, parent: Entry, name: str,
               listing: Listing | None = None) -> Entry | None:
        """The entry *name* in *parent*, or None when the merged view has no such name.

        *listing*, from `read_listing(parent)`, spares probes of lower layers without *name*.
        """
        directory = self._directory(parent)
        if directory.removed:
            return None                      # as the kernel: a removed directory holds nothing
        entry = self._entries.get((directory, name))
        if entry is not None:
            try:
                entry.stat = self.stat(entry)
            except FileNotFoundError:        # changed behind cowfs's back: look again
                self._unmap(entry, directory, name)
                entry.names = [known for known in entry.names
                               if known.parent is not directory or known.name != name]
            else:
                return entry
        found = lookup.lookup(self.fds, directory, name, upper=self.upper, listing=listing)
        if found is None:
            return None
        self._read_kernel_origin(found)
        self._check_indexed_copy(found)
        self._find_index(found)
        entry = self._same_file(found)
        self._entries[(directory, name)] = entry
        return entry

    def _same_file(self, found: Entry) -> Entry:
        """The entry of the file *found* (one name, just looked up) is: a file already known
        by another name (a hard link) is that entry, which gains the name."""
        if found.is_directory:
            return found
        number = self.inode_number(found)
        known = self._files.get(number)
        if known is None or known.is_directory:
            self._files[number] = found
            return found
        known.names.extend(found.names)
        known.removed = False
        known.stat = found.stat
        return known

    def _read_kernel_origin(self, entry: Entry) -> None:
        """An upper copy the kernel made carries its `overlay.origin` (a lower file's handle)
        and not cowfs's number: show the lower file's number, as the kernel does (for a
        directory, or a file the lower layer gave one name)."""
        if self.upper is None or entry.layer != UPPER or entry.origin_ino is not None:
            return                   # (the kernel reads no origin in a lower layer either)
        directory_fd, name = entry.location(self.fds)
        decoded = whiteout.decode_origin(
            _at.get_xattr(directory_fd, name, self.stack.xattr_prefix + whiteout.ORIGIN))
        if decoded is None:
            return
        tried: set[int] = set()
        for layer in self.stack.lowers:
            if layer.st_dev in tried:
                continue
            tried.add(layer.st_dev)
            try:
                fd = _libc.open_by_handle_at(self._handle_anchor(layer), *decoded,
                                             os.O_PATH | os.O_CLOEXEC)
            except OSError:      # not of this filesystem, gone, or no privilege to decode
                continue
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if stat.S_ISDIR(st.st_mode) or st.st_nlink == 1:
                entry.origin_ino = self.numbers.number(st)
            return

    def _handle_anchor(self, layer: Layer) -> int:
        """A plain fd on *layer*'s root (open_by_handle_at refuses O_PATH ones), kept open."""
        fd = self._handle_anchors.get(layer.st_dev)
        if fd is None:
            fd = os.open(_at.fd_path(layer.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._handle_anchors[layer.st_dev] = fd
        return fd

    def _check_indexed_copy(self, entry: Entry) -> None:
        """An upper copy of a file with several lower names keeps their number only while
        the index ties those names to it; without the index (a new workdir) they are separate
        files again, as under the kernel, and the copy gets a number of its own."""
        if entry.layer != UPPER or entry.is_directory or entry.origin_ino is None:
            return
        directory_fd, name = entry.location(self.fds)
        if whiteout.read_link_count(directory_fd, name) is None:
            return                   # the lower file had one name: nothing to tie
        index_name = f"{entry.origin_ino:x}"
        try:
            indexed = os.stat(index_name, dir_fd=self.index_fd, follow_symlinks=False) \
                if self.index_fd is not None else None
        except FileNotFoundError:
            indexed = None
        if indexed is not None and os.path.samestat(indexed, entry.stat):
            entry.index_name = index_name
        else:
            entry.origin_ino = None

    def _find_index(self, entry: Entry) -> None:
        """A lower file of several names may have one copied up: its names show that copy."""
        if (self.index_fd is None or entry.index_name is not None or entry.is_directory
                or entry.layer == UPPER or entry.stat.st_nlink < 2):
            return
        number = self.numbers.number(entry.stat)
        index_name = f"{number:x}"
        try:
            indexed = os.stat(index_name, dir_fd=self.index_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        # The file is up (its name here is not, yet): its copy is the indexed one, whose data,
        # if it holds metadata only, is still this lower file's.
        found = entry.names[0]
        lower_data = entry.data if entry.metacopy else (found.layer, found.name)
        lower_parent = entry.data_parent if entry.metacopy else found.parent
        entry.index_name, entry.layer = index_name, UPPER
        entry.stat, entry.origin_ino = indexed, number
        if whiteout.read_metacopy(self.index_fd, index_name) is not None:
            entry.metacopy, entry.data, entry.data_parent = True, lower_data, lower_parent
        else:
            entry.metacopy, entry.data, entry.data_parent = False, None, None

    def link_count(self, entry: Entry, st: os.stat_result) -> int:
        """st_nlink as the merged view counts names."""
        if isinstance(entry, Directory):
            # As the kernel's overlayfs: counting a merged directory's subdirectories is not
            # worth it, and find(1) and friends take 1 as "unknown".
            return 1 if entry.is_merged else st.st_nlink
        if entry.index_name is not None and self.index_fd is not None:
            count = whiteout.read_link_count(self.index_fd, entry.index_name)
            if count is not None:
                return count
        return st.st_nlink

    def _count_link(self, entry: Entry, change: int) -> None:
        """Keep an indexed file's name count; the index entry goes with its last name."""
        if entry.index_name is None or self.index_fd is None:
            return
        count = whiteout.read_link_count(self.index_fd, entry.index_name)
        if count is None:
            return
        if count + change > 0:
            self.marks.write_link_count(self.index_fd, entry.index_name, count + change)
        else:
            os.unlink(entry.index_name, dir_fd=self.index_fd)

    def resolve(self, path: str) -> Entry | None:
        """The entry at a /-separated path from the root (a convenience for library users)."""
        entry: Entry | None = self.root
        for name in path.strip("/").split("/"):
            if name and entry is not None:
                entry = self.lookup(entry, name)
        return entry

    def list_names(self, directory: Entry) -> list[str]:
        """The visible names in *directory* (without . and ..), each resolved once; a name
        that cannot be looked up (`lookup.BrokenEntry`) counts, as for the kernel's rmdir."""
        directory = self._directory(directory)
        if directory.removed:
            return []
        listing = self.read_listing(directory)
        return [name for name in listing.names if self._is_shown(directory, name, listing)]

    def _is_shown(self, directory: Directory, name: str, listing: Listing) -> bool:
        try:
            return self.lookup(directory, name, listing) is not None
        except lookup.BrokenEntry:
            return True

    def read_listing(self, directory: Entry) -> Listing:
        """Candidate names of *directory*, some perhaps hidden: resolve each before showing it
        (passing the listing to `lookup` makes that cheaper)."""
        directory = self._directory(directory)
        if directory.removed:
            return Listing([], {})
        return lookup.read_listing(self.fds, directory, upper=self.upper)

    def listed_file(self, directory: Entry, name: str,
                    listing: Listing) -> tuple[int, int] | None:
        """(st_ino, file type bits) of *name* as a plain listing shows it, None for a name
        the merged view does not show. Where the layers' directory entries tell (a lower file
        no layer above hides: `lookup.listed_file`), nothing is probed and nothing is looked
        up, so nothing is remembered either; else the name is looked up.

        The number is the one stat shows, read from the directory entry (d_ino); for a
        directory that a filesystem is mounted on inside a layer, the two differ, as they do
        on the host."""
        directory = self._directory(directory)
        found = lookup.listed_file(listing, directory, name, self.upper)
        if found is not None:
            # A copy-up since the listing was read keeps the number, and a rename or an
            # unlink since then is what a listing read at opendir may show.
            layer, ino, kind = found
            return self.numbers.number_of(self.stack.layers[layer].st_dev, ino), kind
        try:
            entry = self.lookup(directory, name, listing)
        except lookup.BrokenEntry:
            return None          # as in a listing with attributes (mount.Operations.readdir)
        if entry is None:
            return None
        return self.inode_number(entry), stat.S_IFMT(entry.stat.st_mode)

    def read_merged_names(self, directory: Entry) -> list[str]:
        return self.read_listing(directory).names

    def layer_path(self, entry: Entry) -> str:
        """The root path of the layer that supplies *entry*."""
        return self.stack.layers[entry.layer].path

    def inode_number(self, entry: Entry) -> int:
        """The st_ino the merged view shows: stable across copy-up and remount."""
        if isinstance(entry, Directory) and entry.is_root:
            return ROOT_INO
        if entry.origin_ino is not None:
            return entry.origin_ino
        return self.numbers.number(entry.stat)

    # -- attributes and data ----------------------------------------------------------------

    def stat(self, entry: Entry) -> os.stat_result:
        return lookup.stat_entry(self.fds, entry)

    def open(self, entry: Entry, flags: int) -> int:
        """An fd on the entry's file; opening for writing copies the file up first.

        O_TRUNC copies no data: the data it would throw away is never copied.
        """
        if entry.is_directory:
            raise _error(errno.EISDIR, entry.describe())
        truncating = bool(flags & os.O_TRUNC)
        if flags & _WRITE_ACCESS or truncating:
            self._copy_up_entry(entry, data=not truncating)
        requested, flags = flags, (flags & ~_DROPPED_OPEN_FLAGS) | os.O_CLOEXEC
        if entry.metacopy and not truncating:
            return lookup.open_data(self.fds, entry, flags | os.O_NOFOLLOW)
        directory_fd, name = entry.location(self.fds)
        try:
            fd = _at.open_location(directory_fd, name, flags)
        except PermissionError:
            if not requested & os.O_APPEND or not flags & _WRITE_ACCESS:
                raise
            # An append-only file (chattr +a) opens for writing only with O_APPEND; the
            # kernel's writes to it come at its end anyway.
            fd = _at.open_location(directory_fd, name, flags | os.O_APPEND)
        if entry.metacopy:
            self._writer().drop_metacopy(entry)   # truncated: no lower data is wanted any more
        return fd

    # -- operations on open files (fds from `open` and `create`) -----------------------------

    @staticmethod
    def allocate(fd: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on a file open for writing (opening it so copied it up)."""
        _libc.fallocate(fd, mode, offset, length)

    def seek(self, entry: Entry, fd: int, offset: int, whence: int) -> int:
        """lseek(2) with SEEK_DATA or SEEK_HOLE on *fd*, open on *entry*: where the data or
        the next hole is (ENXIO past the end). The fd's own position is not used by cowfs's
        reads and writes.

        A backing file that knows no holes (EINVAL: a special file bound into a layer) is all
        data up to the entry's size, as the kernel answers for filesystems without SEEK_DATA
        (and as the FUSE kernel did before cowfs served lseek)."""
        try:
            return os.lseek(fd, offset, whence)
        except OSError as exc:
            if exc.errno != errno.EINVAL or whence not in (os.SEEK_DATA, os.SEEK_HOLE):
                raise
        size = self.stat(entry).st_size
        if not 0 <= offset < size:
            raise _error(errno.ENXIO)
        return offset if whence == os.SEEK_DATA else size

    @staticmethod
    def copy_range(source_fd: int, source_offset: int, target_fd: int, target_offset: int,
                   length: int) -> int:
        """Copy up to *length* bytes in the kernel (a reflink or an in-kernel copy), never
        through Python's memory; at most COPY_RANGE_MAX_BYTES a call, so one request does not
        hold up the others (callers loop on a short count, as copy_file_range(2) allows).
        Backing files on different filesystems fall back to sendfile(2), in the kernel too;
        where that cannot serve either, EOPNOTSUPP has the kernel copy through read and write
        requests instead."""
        length = min(length, COPY_RANGE_MAX_BYTES)
        try:
            return os.copy_file_range(source_fd, target_fd, length, source_offset,
                                      target_offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EOPNOTSUPP):
                raise
        # sendfile writes at the target's position: cowfs itself only uses pwrite on it.
        os.lseek(target_fd, target_offset, os.SEEK_SET)
        try:
            return os.sendfile(target_fd, source_fd, source_offset, length)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            raise _error(errno.EOPNOTSUPP) from None

    def get_file_attributes(self, entry: Entry, command: int, size: int) -> bytes:
        """The inode flags (FS_IOC_GETFLAGS) or fsxattr (FS_IOC_FSGETXATTR) of the entry's
        current copy: the lower file's until it is copied up, as the kernel's overlay reads."""
        fd = self._open_for_attributes(entry)
        try:
            answer = bytearray(size)
            fcntl.ioctl(fd, command, answer)
            return bytes(answer)
        finally:
            os.close(fd)

    def set_file_attributes(self, entry: Entry, command: int, data: bytes) -> None:
        """FS_IOC_SETFLAGS / FS_IOC_FSSETXATTR on the upper copy, copied up first (metadata
        only where allowed, as the kernel's overlay; with the data when the new flags make the
        file append-only, which would forbid filling the data in later)."""
        self._copy_up_entry(entry, data=_makes_append_only(command, data))
        fd = self._open_for_attributes(entry)
        try:
            fcntl.ioctl(fd, command, data)
        finally:
            os.close(fd)
        entry.stat = self.stat(entry)

    def _open_for_attributes(self, entry: Entry) -> int:
        """An fd on the copy itself (a metacopy's own inode, not its data), opened without
        side effects: no read permission is needed for the inode-flag ioctls."""
        if not (entry.is_directory or stat.S_ISREG(entry.stat.st_mode)):
            raise _error(errno.ENOTTY, entry.describe())
        directory_fd, name = entry.location(self.fds)
        return _at.open_location(directory_fd, name,
                                 os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)

    def readlink(self, entry: Entry) -> str:
        if entry.is_directory:
            raise _error(errno.EINVAL, entry.describe())
        return _at.readlink_location(*entry.location(self.fds))

    def get_xattr(self, entry: Entry, attribute: str) -> bytes:
        """A user-visible xattr: asking for `trusted.overlay.X` reads the user's own, escaped
        copy, so overlay's private xattrs cannot be read through the union."""
        directory_fd, name = self._xattr_target(entry)
        return _at.read_xattr(directory_fd, name, whiteout.stored_xattr_name(attribute))

    def list_xattrs(self, entry: Entry) -> list[str]:
        directory_fd, name = self._xattr_target(entry)
        names = (whiteout.visible_xattr_name(stored)
                 for stored in _at.list_xattrs(directory_fd, name))
        return [visible for visible in names if visible is not None]

    def statfs(self) -> os.statvfs_result:
        """The top layer's filesystem: where new data would go."""
        return os.statvfs(_at.fd_path(self.stack.top.fd))

    # -- changes ----------------------------------------------------------------------------

    def set_xattr(self, entry: Entry, attribute: str, value: bytes, flags: int = 0) -> None:
        self._copy_up_entry(entry, data=False)
        directory_fd, name = self._xattr_target(entry)
        os.setxattr(_at.fd_path(directory_fd, name), whiteout.stored_xattr_name(attribute),
                    value, flags, follow_symlinks=name is None)

    def remove_xattr(self, entry: Entry, attribute: str) -> None:
        if self.needs_copy_up(entry, data=False):
            self.get_xattr(entry, attribute)    # ENODATA before any copy-up, as the kernel
        self._copy_up_entry(entry, data=False)
        directory_fd, name = self._xattr_target(entry)
        os.removexattr(_at.fd_path(directory_fd, name), whiteout.stored_xattr_name(attribute),
                       follow_symlinks=name is None)

    def setattr(self, entry: Entry, *, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime_ns: int | None = None,
                mtime_ns: int | None = None, fd: int | None = None) -> os.stat_result:
        """chmod, chown, truncate and utimes in one call, on the entry's upper copy.

        Only a truncate to a non-zero size copies the data up; the rest is a metadata-only
        copy-up.
        """
        self._copy_up_entry(entry, data=bool(size))
        directory_fd, name = self._xattr_target(entry)
        path = _at.fd_path(directory_fd, name)
        follow = name is None
        if uid is not None or gid is not None:
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid,
                     follow_symlinks=follow)
        if mode is not None:
            if stat.S_ISLNK(entry.stat.st_mode):
                raise _error(errno.EOPNOTSUPP, entry.describe())
            os.chmod(path, stat.S_IMODE(mode))
        if size is not None:
            self._truncate(entry, size, fd)
            if entry.metacopy:
                self._writer().drop_metacopy(entry)
        if atime_ns is not None or mtime_ns is not None:
            current = self.stat(entry)
            os.utime(path, ns=(current.st_atime_ns if atime_ns is None else atime_ns,
                               current.st_mtime_ns if mtime_ns is None else mtime_ns),
                     follow_symlinks=follow)
        entry.stat = self.stat(entry)
        return entry.stat

    def _truncate(self, entry: Entry, size: int, fd: int | None) -> None:
        if fd is not None:
            os.ftruncate(fd, size)
            return
        if entry.is_directory:
            raise _error(errno.EISDIR, entry.describe())
        directory_fd, name = entry.location(self.fds)
        target = _at.open_location(directory_fd, name, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(target, size)
        finally:
            os.close(target)

    def create(self, parent: Entry, name: str, mode: int, flags: int,
               caller: Caller = ROOT) -> tuple[Entry, int]:
        """A new regular file, open with *flags*; EEXIST if the name is taken."""
        whiteout.check_new_name(name)
        opened: list[int] = []

        def make(directory_fd: int, staged_name: str) -> None:
            open_flags = ((flags & ~_DROPPED_OPEN_FLAGS & ~os.O_TRUNC) | os.O_CREAT | os.O_EXCL
                          | os.O_NOFOLLOW | os.O_CLOEXEC)
            opened.append(os.open(staged_name, open_flags, stat.S_IMODE(mode),
                                  dir_fd=directory_fd))

        try:
            entry = self._create_entry(parent, name, mode, caller, make)
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        return entry, opened[0]

    def tmpfile(self, parent: Entry, mode: int, flags: int, caller: Caller = ROOT
                ) -> tuple[Entry, int]:
        """An unnamed regular file for *parent* (open(2)'s O_TMPFILE), open with *flags*: `link`
        may name it once, else it goes with its last holder.

        Made by O_TMPFILE in the parent's upper copy (copied up first), as the kernel's overlay
        does: the upper's filesystem keeps it out of every listing until it is linked, and a
        crash leaves nothing behind. It is made linkable whatever the caller asked: O_EXCL
        (never linkable) is the kernel's to enforce, and it refuses such a link before any
        request is sent. In a removed directory the upper's filesystem answers, as under the
        kernel (ext4 refuses with EPERM, tmpfs makes the file).
        """
        directory = self._directory(parent)
        if not flags & _WRITE_ACCESS:
            raise _error(errno.EINVAL)           # as open(2): O_TMPFILE needs write access
        directory_fd = self._writer().upper_directory(directory)
        gid, mode = self._new_owner(directory_fd, mode, caller)
        open_flags = ((flags & ~(_DROPPED_OPEN_FLAGS | os.O_TRUNC | os.O_TMPFILE))
                      | os.O_TMPFILE | os.O_CLOEXEC)
        fd = os.open(".", open_flags, stat.S_IMODE(mode), dir_fd=directory_fd)
        try:
            os.fchown(fd, caller.uid, gid)
            if mode & _SPECIAL_MODE_BITS:
                os.fchmod(fd, stat.S_IMODE(mode))     # chown cleared setuid and setgid
            entry = Entry(None, UPPER, os.fstat(fd))
            entry.hold(os.open(_at.fd_path(fd), os.O_PATH | os.O_CLOEXEC))
        except BaseException:
            os.close(fd)
            raise
        entry.removed = entry.anonymous = True
        # Where its first name will find it: `link` relooks the new name up.
        self._files[self.inode_number(entry)] = entry
        log.debug("tmpfile(%r) = %d", directory, entry.stat.st_ino)
        return entry, fd

    def mkdir(self, parent: Entry, name: str, mode: int, caller: Caller = ROOT) -> Entry:
        whiteout.check_new_name(name)
        def make(directory_fd: int, staged_name: str) -> None:
            os.mkdir(staged_name, stat.S_IMODE(mode), dir_fd=directory_fd)
        return self._create_entry(parent, name, mode | stat.S_IFDIR, caller, make)

    def mknod(self, parent: Entry, name: str, mode: int, rdev: int = 0,
              caller: Caller = ROOT) -> Entry:
        """A device, fifo or socket; a character device 0/0 is refused with EPERM, as the
        kernel's overlay does: in the upper it would be a whiteout, hiding the name it makes."""
        whiteout.check_new_name(name)
        if stat.S_ISCHR(mode) and rdev == 0:
            raise _error(errno.EPERM, name)

        def make(directory_fd: int, staged_name: str) -> None:
            os.mknod(staged_name, mode, rdev, dir_fd=directory_fd)
        return self._create_entry(parent, name, mode, caller, make)

    def symlink(self, parent: Entry, name: str, target: str, caller: Caller = ROOT) -> Entry:
        whiteout.check_new_name(name)
        def make(directory_fd: int, staged_name: str) -> None:
            os.symlink(target, staged_name, dir_fd=directory_fd)
        return self._create_entry(parent, name, stat.S_IFLNK | 0o777, caller, make)

    def link(self, entry: Entry, new_parent: Entry, new_name: str) -> Entry:
        """Another name for a non-directory; a lower file is copied up once and linked."""
        whiteout.check_new_name(new_name)
        if entry.is_directory:
            raise _error(errno.EPERM, entry.describe())
        directory = self._directory(new_parent)
        if self.lookup(directory, new_name) is not None:
            raise _error(errno.EEXIST, new_name)
        if entry.removed and not entry.anonymous:
            raise _error(errno.ENOENT, new_name)   # as link(2) of a file with no names left
        self._copy_up_entry(entry, data=False)     # as the kernel: a metacopy may be linked
        self._writer().redirect_metacopy(entry)
        source_fd, source_name = entry.location(self.fds)

        def make(directory_fd: int, staged_name: str) -> None:
            _at.link_location(source_fd, source_name, directory_fd, staged_name)

        self._place(directory, new_name, make, is_directory=False)
        entry.anonymous = False                    # linkable once, as the kernel's I_LINKABLE
        self._count_link(entry, +1)
        entry.stat = self.stat(entry)
        return self._relookup(directory, new_name)   # the same entry, with one name more

    def unlink(self, parent: Entry, name: str) -> Entry:
        """Remove a non-directory name; a whiteout hides it if a lower layer has it."""
        directory = self._directory(parent)
        entry = self._existing(directory, name)
        if entry.is_directory:
            raise _error(errno.EISDIR, name)
        known = entry.name_in(directory, name)
        self._copy_up_linked_lower(entry, known)
        self._remove(directory, entry, known)
        self._count_link(entry, -1)
        return entry

    def rmdir(self, parent: Entry, name: str) -> Entry:
        """Remove a directory that is empty in the merged view."""
        directory = self._directory(parent)
        entry = self._existing(directory, name)
        if not isinstance(entry, Directory):
            raise _error(errno.ENOTDIR, name)
        if self.list_names(entry):
            raise _error(errno.ENOTEMPTY, name)
        self._remove(directory, entry, entry.own_name)
        self.fds.discard(entry)
        return entry

    def rename(self, parent: Entry, name: str, new_parent: Entry, new_name: str,
               flags: int = 0) -> Entry | None:
        """rename(2) with RENAME_NOREPLACE and RENAME_EXCHANGE; returns a replaced entry."""
        if not self.check_rename(parent, name, new_parent, new_name, flags):
            return None                   # two names of one file: nothing to do (POSIX)
        directory, new_directory = self._directory(parent), self._directory(new_parent)
        source = self._existing(directory, name)
        source_name = source.name_in(directory, name)
        target = self.lookup(new_directory, new_name)
        target_name = target.name_in(new_directory, new_name) if target is not None else None
        if flags & _libc.RENAME_EXCHANGE:
            assert target is not None and target_name is not None
            self._exchange(source, source_name, target, target_name)
            return None
        if target is not None and target_name is not None and not target.is_directory:
            self._copy_up_linked_lower(target, target_name)
        writer = self._writer()
        self._copy_up_entry(source, data=False, name=source_name)
        writer.redirect_metacopy(source)
        source_parent_fd = writer.upper_directory(directory)
        target_parent_fd = writer.upper_directory(new_directory)
        covers_lower = target_name.has_lower if target_name is not None else \
            self._upper_holds_whiteout(target_parent_fd, new_name)
        if isinstance(source, Directory):
            self._prepare_directory_move(source, covers_lower)
        if target is not None and len(target.names) == 1:
            target.pin(self.fds)
        if (isinstance(target, Directory) and target.layer == UPPER) or \
                (isinstance(source, Directory) and target is None and covers_lower):
            self._rename_over_directory(source_name, source_parent_fd, target_parent_fd,
                                        new_name)
        else:
            _libc.renameat2(source_parent_fd, name, target_parent_fd, new_name,
                            _libc.RENAME_WHITEOUT if source_name.has_lower else 0)
        if target is not None and target_name is not None:
            self._drop_name(target, target_name)
            self._count_link(target, -1)
            if isinstance(target, Directory):
                self.fds.discard(target)
        self._move(source, source_name, new_directory, new_name, has_lower=covers_lower)
        if source.origin_ino is not None or (isinstance(source, Directory) and source.places):
            self.marks.set_impure(target_parent_fd)   # as the kernel, for its readdir
        log.debug("rename(%r, %r)", name, new_name)
        return target

    # -- helpers ----------------------------------------------------------------------------

    def _copy_up_linked_lower(self, entry: Entry, name: Name) -> None:
        """Before a lower file with several names loses *name*: its other names must see one
        name fewer, and the index, which only an upper copy has, keeps that count. Metadata
        only where metacopy is on, as the kernel's index copy (6.18 here)."""
        if entry.layer != UPPER and entry.stat.st_nlink > 1 and self.index_fd is not None:
            self._copy_up_entry(entry, data=False, name=name)

    def _copy_up_entry(self, entry: Entry, *, data: bool = True, name: Name | None = None
                       ) -> None:
        with contextlib.closing(self.copy_up_steps(entry, data=data, name=name)) as steps:
            for job in steps:
                job.run()

    def needs_copy_up(self, entry: Entry, *, data: bool = True, name: Name | None = None
                      ) -> bool:
        return self._writer().needs_copy_up(entry, data=data, name=name)

    def copy_up_steps(self, entry: Entry, *, data: bool = True, name: Name | None = None
                      ) -> CopyUpSteps:
        """Copy *entry* up (and its *name*, if given, with it), yielding each data copy for the
        caller to run (in a thread, say).

        Meanwhile the caller must not let anything else change *entry* (other entries may
        change). A failure thrown in, or closing the steps early, removes the half-made copy.
        """
        return self._writer().copy_up_steps(entry, data=data, name=name)

    def _durability(self) -> durability.Durability:
        assert self.durability is not None, "only a writable union changes the upper"
        return self.durability

    def _writer(self) -> CopyUp:
        if self._copy_up is None:
            raise _error(errno.EROFS)
        return self._copy_up

    def _directory(self, entry: Entry) -> Directory:
        if not isinstance(entry, Directory):
            raise _error(errno.ENOTDIR, entry.describe())
        return entry

    def _existing(self, directory: Directory, name: str) -> Entry:
        entry = self.lookup(directory, name)
        if entry is None:
            raise _error(errno.ENOENT, name)
        return entry

    def _xattr_target(self, entry: Entry) -> tuple[int, str | None]:
        return entry.location(self.fds)

    def _relookup(self, directory: Directory, name: str) -> Entry:
        self._entries.pop((directory, name), None)
        entry = self.lookup(directory, name)
        assert entry is not None, f"{name!r} vanished right after it was made"
        return entry

    def _unmap(self, entry: Entry, directory: Directory, name: str) -> None:
        if self._entries.get((directory, name)) is entry:
            del self._entries[(directory, name)]

    def _drop_name(self, entry: Entry, name: Name) -> None:
        """*name* is gone from the merged view; the entry is removed with its last name (the
        caller pinned it before: see `Entry.pin`)."""
        if entry.metacopy and self._copy_up is not None:
            self._copy_up.find_data_by_path(entry)
        self._unmap(entry, name.parent, name.name)
        entry.names.remove(name)
        if not entry.names:
            entry.removed = True
            entry.last_parent = name.parent

    def _move(self, entry: Entry, known: Name, directory: Directory, name: str, *,
              has_lower: bool) -> None:
        self._unmap(entry, known.parent, known.name)
        known.parent, known.name, known.has_lower = directory, name, has_lower
        self._entries[(directory, name)] = entry

    def _upper_holds_whiteout(self, directory_fd: int, name: str) -> bool:
        try:
            st = os.stat(name, dir_fd=directory_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return whiteout.is_device_whiteout(st)

    def _new_owner(self, directory_fd: int, mode: int, caller: Caller) -> tuple[int, int]:
        """The gid and mode of a new entry: a setgid directory passes its group on."""
        parent = os.stat(directory_fd)
        if parent.st_mode & stat.S_ISGID:
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
            return parent.st_gid, mode
        return caller.gid, mode

    def _create_entry(self, parent: Entry, name: str, mode: int, caller: Caller,
                      make: Callable[[int, str], None]) -> Entry:
        directory = self._directory(parent)
        if self.lookup(directory, name) is not None:
            raise _error(errno.EEXIST, name)
        directory_fd = self._writer().upper_directory(directory)
        gid, mode = self._new_owner(directory_fd, mode, caller)

        def make_owned(target_fd: int, target_name: str) -> None:
            make(target_fd, target_name)
            try:
                os.chown(target_name, caller.uid, gid, dir_fd=target_fd, follow_symlinks=False)
                if mode & _SPECIAL_MODE_BITS and not stat.S_ISLNK(mode):
                    os.chmod(target_name, stat.S_IMODE(mode), dir_fd=target_fd)
            except BaseException:
                _remove_quietly(target_fd, target_name)
                raise

        self._place(directory, name, make_owned, is_directory=stat.S_ISDIR(mode))
        return self._relookup(directory, name)

    def _place(self, directory: Directory, name: str, make: Callable[[int, str], None], *,
               is_directory: bool) -> None:
        """Make a new entry at *name* in the upper copy of *directory*.

        Where a whiteout stands, or a new directory must be opaque (the kernel makes every
        directory created in a merged parent opaque), the entry is made in staging and renamed
        into place, so it appears whole or not at all.
        """
        writer = self._writer()
        directory_fd = writer.upper_directory(directory)
        over_whiteout = self._upper_holds_whiteout(directory_fd, name)
        opaque = is_directory and (over_whiteout or directory.is_merged)
        if not over_whiteout and not opaque:
            make(directory_fd, name)
            return
        staged = self.staging.new_name()
        try:
            make(self.staging.fd, staged)
            if opaque:
                self.marks.set_opaque(self.staging.fd, staged)
            if over_whiteout and is_directory:
                _libc.renameat2(self.staging.fd, staged, directory_fd, name,
                                _libc.RENAME_EXCHANGE)
            else:
                _libc.renameat2(self.staging.fd, staged, directory_fd, name,
                                0 if over_whiteout else _libc.RENAME_NOREPLACE)
                self._durability().changed(directory_fd)
                return
        except BaseException:
            self.staging.remove(staged)
            raise
        self._durability().changed(directory_fd)
        self.staging.remove(staged)        # the whiteout the directory replaced

    def _remove(self, directory: Directory, entry: Entry, known: Name) -> None:
        """Take the name *known* of *entry* out of the merged view, with a whiteout if a lower
        layer has it. An entry losing its last name is pinned first: who holds it (an open
        file, a FUSE node) still reaches the file."""
        directory_fd = self._writer().upper_directory(directory)
        name = known.name
        if len(entry.names) == 1:
            entry.pin(self.fds)
        if known.layer != UPPER:
            _check_deletable_in(directory_fd)
            self._place_whiteout(directory_fd, name, replace=False)
        elif known.has_lower:
            self._place_whiteout(directory_fd, name, replace=True,
                                 exchange=entry.is_directory)
        elif entry.is_directory:
            self._remove_upper_directory(directory_fd, name)
        else:
            os.unlink(name, dir_fd=directory_fd)
        self._drop_name(entry, known)
        log.debug("removed %r (whiteout: %s)", name, known.has_lower)

    def _place_whiteout(self, directory_fd: int, name: str, *, replace: bool,
                        exchange: bool = False) -> None:
        """A whiteout at *name*, made in staging and renamed over what stands there."""
        staged = self.staging.new_name()
        try:
            whiteout.make_whiteout(self.staging.fd, staged)
            flags = (_libc.RENAME_EXCHANGE if exchange else 0) if replace \
                else _libc.RENAME_NOREPLACE
            _libc.renameat2(self.staging.fd, staged, directory_fd, name, flags)
        except BaseException:
            self.staging.remove(staged)
            raise
        self._durability().changed(directory_fd)
        if exchange:
            self.staging.remove(staged)     # the directory the whiteout replaced

    def _remove_upper_directory(self, directory_fd: int, name: str) -> None:
        """rmdir, also when the directory still holds whiteouts of names long gone."""
        try:
            os.rmdir(name, dir_fd=directory_fd)
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                raise
            staged = self.staging.new_name()
            _libc.renameat2(directory_fd, name, self.staging.fd, staged, _libc.RENAME_NOREPLACE)
            self.staging.remove(staged)

    def check_rename(self, parent: Entry, name: str, new_parent: Entry, new_name: str,
                     flags: int = 0) -> bool:
        """Raise what rename would fail with, changing nothing: the FUSE face asks before it
        copies anything up, as the kernel checks before its copy-up. False when there is
        nothing to do (two names of one file)."""
        whiteout.check_new_name(new_name)
        directory, new_directory = self._directory(parent), self._directory(new_parent)
        source = self._existing(directory, name)
        _at.check_name(new_name)
        target = self.lookup(new_directory, new_name)
        if flags & _libc.RENAME_EXCHANGE:
            if target is None:
                raise _error(errno.ENOENT, new_name)
            if target is source:
                return False
            self._check_movable(source)
            self._check_movable(target)
            return True
        if target is not None and flags & _libc.RENAME_NOREPLACE:
            raise _error(errno.EEXIST, new_name)
        if target is source:
            return False
        self._check_rename(source, target)
        return True

    def _check_rename(self, source: Entry, target: Entry | None) -> None:
        """In the kernel's order: the types (the VFS checks them first), then whether the
        source may move (EXDEV), then whether a directory it replaces is empty."""
        if isinstance(source, Directory):
            if target is not None and not target.is_directory:
                raise _error(errno.ENOTDIR, target.describe())
        elif target is not None and target.is_directory:
            raise _error(errno.EISDIR, target.describe())
        self._check_movable(source)
        if isinstance(source, Directory) and target is not None and self.list_names(target):
            raise _error(errno.ENOTEMPTY, target.describe())

    def _check_movable(self, entry: Entry) -> None:
        """A directory with lower copies moves only by a redirect: without redirect_dir=on,
        EXDEV (as the kernel: mv then copies it whole)."""
        if isinstance(entry, Directory) and not self.stack.format.writes_redirects \
                and any(layer != UPPER for layer in entry.layers):
            raise _error(errno.EXDEV, entry.describe())

    def _prepare_directory_move(self, directory: Directory, covers_lower: bool) -> None:
        """Before a directory moves: it must keep its own lower copies and no others.

        One with lower copies gets a redirect to them (which also stops the lower layers at
        its new name from showing through); one without, landing where a lower layer has the
        name, is made opaque.
        """
        writer = self._writer()
        if any(layer != UPPER for layer in directory.layers):
            writer.redirect(directory)
        elif covers_lower:
            self.marks.set_opaque(self.fds.fd(directory, UPPER), None)

    def _rename_over_directory(self, source: Name, source_parent_fd: int,
                               target_parent_fd: int, new_name: str) -> None:
        """Move a directory onto an upper directory or whiteout in one step, then clear the old.

        rename(2) cannot replace a directory that still holds whiteouts, nor a whiteout with a
        directory: exchange the two, then remove what landed at the source name (or leave a
        whiteout there if a lower layer has that name).
        """
        _libc.renameat2(source_parent_fd, source.name, target_parent_fd, new_name,
                        _libc.RENAME_EXCHANGE)
        if source.has_lower:
            self._place_whiteout(source_parent_fd, source.name, replace=True,
                                 exchange=True)
            return
        staged = self.staging.new_name()
        _libc.renameat2(source_parent_fd, source.name, self.staging.fd, staged)
        self.staging.remove(staged)

    def _exchange(self, source: Entry, source_name: Name, target: Entry,
                  target_name: Name) -> None:
        """RENAME_EXCHANGE: both names stay, each showing the other's entry."""
        writer = self._writer()
        self._copy_up_entry(source, data=False, name=source_name)
        self._copy_up_entry(target, data=False, name=target_name)
        writer.redirect_metacopy(source)
        writer.redirect_metacopy(target)
        source_parent, target_parent = source_name.parent, target_name.parent
        old_source, old_target = source_name.name, target_name.name
        source_fd = writer.upper_directory(source_parent)
        target_fd = writer.upper_directory(target_parent)
        for moving, destination in ((source, target_name), (target, source_name)):
            if isinstance(moving, Directory):
                self._prepare_directory_move(moving, destination.has_lower)
        _libc.renameat2(source_fd, old_source, target_fd, old_target, _libc.RENAME_EXCHANGE)
        source_lower, target_lower = source_name.has_lower, target_name.has_lower
        self._move(source, source_name, target_parent, old_target, has_lower=target_lower)
        self._move(target, target_name, source_parent, old_source, has_lower=source_lower)


def _check_deletable_in(directory_fd: int) -> None:
    """EPERM in an append-only or immutable upper directory (chattr +a/+i), as the kernel's
    VFS answers: a new whiteout only adds an entry, which the upper's filesystem allows, and
    the FUSE kernel does not know the flags. Filesystems without inode flags pass."""
    try:
        fd = _at.open_location(directory_fd, None, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except PermissionError:
        return          # an unprivileged daemon that may not read it: the flags stay unknown
    try:
        answer = bytearray(4)
        fcntl.ioctl(fd, _libc.FS_IOC_GETFLAGS, answer)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            return
        raise
    finally:
        os.close(fd)
    if int.from_bytes(answer, "little") & (_libc.FS_APPEND_FL | _libc.FS_IMMUTABLE_FL):
        raise _error(errno.EPERM)


def _makes_append_only(command: int, data: bytes) -> bool:
    if command == _libc.FS_IOC_SETFLAGS and len(data) >= 4:
        return bool(int.from_bytes(data[:4], "little") & _libc.FS_APPEND_FL)
    if command == _libc.FS_IOC_FSSETXATTR and len(data) >= 4:
        return bool(int.from_bytes(data[:4], "little") & _libc.FS_XFLAG_APPEND)
    return False


def _remove_quietly(directory_fd: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=directory_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(name, dir_fd=directory_fd)
        else:
            os.unlink(name, dir_fd=directory_fd)
    except OSError as exc:
        log.warning("cannot remove half-made %r: %s", name, exc)


@dataclasses.dataclass
class Refreshed:
    """What `Union.refresh` found: each known entry's new self, or that it is gone."""

    moved_layers: dict[int, int | None]      # old layer index -> new (None: removed)
    found: dict[Entry, Entry] = dataclasses.field(default_factory=dict)
    renumbered: set[Entry] = dataclasses.field(default_factory=set)   # found, another number
    gone: list[Entry] = dataclasses.field(default_factory=list)


def _renumber_layers(entry: Entry, moved: dict[int, int | None]) -> None:
    """Keep a retired entry's layer indices naming the same layers (a removed one: none)."""
    def kept(indices: Iterable[int]) -> list[int]:
        return [target for index in indices if (target := moved.get(index)) is not None]

    entry.layer = next(iter(kept([entry.layer])), entry.layer)
    for known in entry.names:
        known.layer = next(iter(kept([known.layer])), known.layer)
    if entry.data is not None:
        layer, place = entry.data
        entry.data = (new_layer, place) if (new_layer := moved.get(layer)) is not None else None
    if isinstance(entry, Directory):
        entry.layers = tuple(kept(entry.layers)) or (entry.layer,)
        entry.places = {target: place for index, place in entry.places.items()
                        if (target := moved.get(index)) is not None}
        entry.xwhiteout_layers = frozenset(kept(entry.xwhiteout_layers))
