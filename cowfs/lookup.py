"""Resolve names top-down through the layers, and list merged directories.

An `Entry` is a name resolved in the union: the parent `Directory` it was found in, and the
layer and lstat of its topmost copy. A `Directory` also knows which layers' directories merge
into it. Nothing here walks a path string: every step is one name relative to a directory fd.

Directory fds are a cache, not a resource a Directory owns: a tree of 10,000 directories over 5
layers would need 50,000 fds, more than a process may hold. `DirectoryFds` keeps the most recently
used ones open and closes the rest; a Directory whose fds were closed reopens them from its parent,
which it keeps alive, down from the layer roots that are always open.
"""

import collections
import dataclasses
import errno
import logging
import os
import stat
import weakref

from cowfs import _at, whiteout
from cowfs.layers import LayerStack
from cowfs.whiteout import Opacity

log = logging.getLogger(__name__)

# Well under the usual 20,000 RLIMIT_NOFILE of a root shell, leaving room for open files.
DEFAULT_FD_BUDGET = 4096
UPPER = 0     # the upper layer's index in LayerStack.layers, when there is one


class Name:
    """One name of an entry in the merged tree: a hard-linked file has several.

    Per name, not per file: the layer that holds this name (a lower name of a file whose copy
    is up through another name is still only in its lower layer), and whether a lower layer
    shows it (deleting it then needs a whiteout).
    """

    __slots__ = ("has_lower", "layer", "name", "parent")

    def __init__(self, parent: "Directory", name: str, layer: int) -> None:
        self.parent = parent
        self.name = name
        self.layer = layer
        self.has_lower = True

    def __repr__(self) -> str:
        return f"Name({self.name!r}, layer {self.layer})"


class Entry:
    """A file of the merged tree, as the kernel's overlayfs has inodes: its topmost copy, and
    the names it is known by.

    What arrives by file (a FUSE node, an open handle) acts on this object, never on whatever
    a name shows now: unlinking a name, renaming over it or replacing it changes `names`, not
    which file this is. When the last name goes, `pin` keeps an O_PATH fd of the copy, so the
    file stays reachable (and its inode allocated) for as long as anyone holds the entry.
    """

    __slots__ = ("__weakref__", "_unpin", "anonymous", "data", "data_parent", "index_name",
                 "last_parent", "layer", "metacopy", "names", "origin_ino", "pinned_fd",
                 "removed", "stat")

    def __init__(self, name: Name | None, layer: int, st: os.stat_result) -> None:
        self.names: list[Name] = [] if name is None else [name]
        self.layer = layer       # index into LayerStack.layers of the topmost copy
        self.stat = st           # that copy's lstat, as last seen
        # The inode number the merged view showed before copy-up, recorded in the upper copy.
        self.origin_ino: int | None = None
        self.removed = False     # every name is gone: only holders of the entry reach it
        # Where the last name was, once every name is gone (a copy-up then says why it fails).
        self.last_parent: Directory | None = None
        # Made unnamed (O_TMPFILE) and not linked yet: removed, but a first link may name it.
        self.anonymous = False
        self.pinned_fd: int | None = None
        self._unpin: weakref.finalize | None = None
        # An upper copy with metadata only (the kernel's metacopy): its data is still in the
        # lower copy at `data` (layer, place), or lost (None: reading gives EIO, as the kernel).
        self.metacopy = False
        self.data: tuple[int, Place] | None = None
        # The directory a bare-name `data` place is in: the metacopy's own name may move.
        self.data_parent: Directory | None = None
        # A file of several lower names, copied up: its name in the workdir's index. Lower
        # names of it that are not up yet reach the upper copy there.
        self.index_name: str | None = None

    @property
    def is_directory(self) -> bool:
        return False

    def name_in(self, parent: "Directory", name: str) -> Name:
        """This entry's Name record for *name* in *parent*."""
        for known in self.names:
            if known.parent is parent and known.name == name:
                return known
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), name)

    def location(self, fds: "DirectoryFds") -> tuple[int, str | None]:
        """Where the topmost copy is, for *at() calls: (directory fd, name), or (fd of the
        file itself, None) when no name reaches it (`_at.open_location` and friends)."""
        if self.pinned_fd is not None:
            return self.pinned_fd, None
        for known in self.names:
            # Every name of a lower file is the same lower inode; of an upper file, only the
            # names already in the upper are.
            if self.layer != UPPER or known.layer == UPPER:
                return fds.fd(known.parent, known.layer), known.name
        if self.index_name is not None:
            assert fds.stack.work is not None
            return fds.stack.work.index_fd, self.index_name
        raise OSError(errno.ESTALE, "no name reaches this file", self.describe())

    def describe(self) -> str:
        """A name for messages."""
        return self.names[0].name if self.names else "(removed)"

    def pin(self, fds: "DirectoryFds") -> None:
        """Before the last name goes: hold the copy open while the entry lives."""
        if self.pinned_fd is not None:
            return
        directory_fd, name = self.location(fds)
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory_fd) \
            if name is not None else os.dup(directory_fd)
        self._set_pinned(fd)

    def hold(self, fd: int) -> None:
        """Pin the copy through *fd*, which the entry takes: a file made without a name."""
        self._set_pinned(fd)

    def _set_pinned(self, fd: int | None) -> None:
        if self._unpin is not None:
            self._unpin()
        self.pinned_fd = fd
        self._unpin = weakref.finalize(self, os.close, fd) if fd is not None else None

    def unpin(self) -> None:
        """A name reaches the copy again (or the copy moved): drop the pinned fd."""
        self._set_pinned(None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.names!r}, layer {self.layer})"


# A directory copy's place in its layer: a name in the parent's copy, or a path from the root.
Place = str | tuple[str, ...]


class Directory(Entry):
    """A merged directory: the directories of `layers` (top first) show through it.

    A directory has one name (none when it is the root or removed), so its `parent` and `name`
    are its name's; its fds are reopened through that name, which cowfs keeps up to date.
    """

    __slots__ = ("fds", "is_root", "layers", "places", "xwhiteout_layers")

    def __init__(self, name: Name | None, layers: tuple[int, ...], st: os.stat_result,
                 xwhiteout_layers: frozenset[int],
                 places: "dict[int, Place] | None" = None) -> None:
        super().__init__(name, layers[0], st)
        self.is_root = name is None
        self.layers = layers
        self.xwhiteout_layers = xwhiteout_layers
        self.fds: dict[int, int] | None = None   # layer -> O_PATH fd, while cached
        # Where a layer's copy is when not at (parent's copy, name): after a redirect.
        self.places: dict[int, Place] = places or {}

    @property
    def is_directory(self) -> bool:
        return True

    @property
    def is_merged(self) -> bool:
        return len(self.layers) > 1

    @property
    def own_name(self) -> Name:
        if not self.names:
            raise OSError(errno.ENOENT, "the directory was removed")
        return self.names[0]

    @property
    def parent(self) -> "Directory":
        return self.own_name.parent

    @property
    def name(self) -> str:
        return self.own_name.name

    def location(self, fds: "DirectoryFds") -> tuple[int, str | None]:
        if self.pinned_fd is not None:
            return self.pinned_fd, None
        return fds.fd(self, self.layer), None


class DirectoryFds:
    """Open O_PATH fds of directories, least recently used closed first beyond a budget."""

    def __init__(self, stack: LayerStack, budget: int = DEFAULT_FD_BUDGET) -> None:
        self.stack = stack
        self.budget = budget
        self.open_count = 0
        self._recent: collections.OrderedDict[Directory, None] = collections.OrderedDict()

    def fd(self, directory: Directory, layer: int) -> int:
        """The fd of *directory*'s copy in *layer*, reopened from its parent when closed."""
        if directory.is_root:
            return self.stack.layers[layer].fd
        fds = directory.fds
        if fds is None:
            fds = self.adopt(directory, self._reopen(directory))
        else:
            self._recent.move_to_end(directory)
        return fds[layer]

    def adopt(self, directory: Directory, fds: dict[int, int]) -> dict[int, int]:
        """Take ownership of freshly opened fds for *directory*."""
        directory.fds = fds
        self._recent[directory] = None
        self.open_count += len(fds)
        while self.open_count > self.budget and len(self._recent) > 1:
            oldest, _ = self._recent.popitem(last=False)
            self._close(oldest)
        return fds

    def add_layer_on_top(self, directory: Directory, layer: int, fd: int) -> None:
        """*directory* gained a copy in *layer* (copy-up), open as *fd*, which this takes."""
        directory.layers = (layer, *directory.layers)
        directory.layer = directory.own_name.layer = layer
        if directory.fds is None:
            os.close(fd)             # reopened with the others when next needed
            return
        directory.fds[layer] = fd
        self.open_count += 1
        self._recent.move_to_end(directory)

    def discard(self, directory: Directory) -> None:
        if directory.fds is not None:
            del self._recent[directory]
            self._close(directory)

    @property
    def open_directories(self) -> int:
        return len(self._recent)

    def shrink(self) -> None:
        """Build the table again at the size it now needs (see `Union.shrink`)."""
        self._recent = collections.OrderedDict(self._recent)

    def close_all(self) -> None:
        for directory in self._recent:
            self._close(directory)
        self._recent.clear()

    def _close(self, directory: Directory) -> None:
        assert directory.fds is not None
        for fd in directory.fds.values():
            os.close(fd)
        self.open_count -= len(directory.fds)
        directory.fds = None

    def _reopen(self, directory: Directory) -> dict[int, int]:
        """Through the directory's name: a removed directory (no name) is not reopened."""
        opened: dict[int, int] = {}
        try:
            for layer in directory.layers:
                place = directory.places.get(layer, directory.name)
                if isinstance(place, tuple):
                    opened[layer] = open_path(self.stack.layers[layer].fd, place)
                    continue
                parent_fd = self.fd(directory.parent, layer)
                opened[layer] = os.open(place, _at.DIR_PATH_FLAGS, dir_fd=parent_fd)
        except BaseException:
            for fd in opened.values():
                os.close(fd)
            raise
        return opened


@dataclasses.dataclass
class Listing:
    """A merged directory's candidate names as scanned, and the names each lower layer holds.

    Lower layers never change while mounted, so a lookup of a listed name may skip every lower
    layer that does not hold it (nor its `.wh.` marker): one stat instead of one per layer.
    """

    names: list[str]
    lower_names: dict[int, frozenset[str]]   # layer -> its names and `.wh.` marker targets
    # name -> the topmost layer holding an entry of that name, and that layer's entry
    top: dict[str, tuple[int, os.DirEntry[str]]] = dataclasses.field(default_factory=dict)
    marked: frozenset[str] = frozenset()     # names a lower layer's `.wh.` marker names

    def may_hold(self, layer: int, name: str) -> bool:
        """False only for a lower layer scanned without *name* (the upper is never skipped)."""
        held = self.lower_names.get(layer)
        return held is None or name in held


def make_root(stack: LayerStack) -> Directory:
    """The merged root: every layer's root. As in the kernel, a layer root is never opaque."""
    xwhiteouts = frozenset(index for index, layer in enumerate(stack.layers)
                           if whiteout.directory_opacity(layer.fd) is Opacity.XWHITEOUTS)
    return Directory(None, tuple(range(len(stack.layers))), os.fstat(stack.top.fd), xwhiteouts)


def _find(directory_fd: int, name: str, xwhiteouts: bool,
          oci: bool = True) -> os.stat_result | None:
    """The lstat of *name* in one layer's directory; None when absent.

    Raises _Hidden when the layer hides the name from the layers below it. *oci* False (the
    upper layer) does not read `.wh.NAME` as a whiteout.
    """
    try:
        st = os.stat(name, dir_fd=directory_fd, follow_symlinks=False)
    except FileNotFoundError:
        if oci and whiteout.is_oci_whiteout_present(directory_fd, name):
            raise _Hidden from None
        return None
    if whiteout.is_whiteout(directory_fd, name, st, xwhiteouts=xwhiteouts):
        raise _Hidden
    return st


class _Hidden(Exception):
    """A whiteout: the name ends here, in this layer."""


class BrokenEntry(OSError):
    """A name the layers hold but that cannot be looked up, because the kernel refuses it too:
    a metadata-only copy without data (EIO), a malformed redirect (EINVAL) or one with a `.`
    or `..` step (EACCES). The kernel lists such a name; its stat gives the error."""


def open_path(root_fd: int, path: tuple[str, ...]) -> int:
    """An O_PATH fd of the directory at *path* below *root_fd*, one component at a time.

    A `.` or `..` component is refused (EACCES, as the kernel's walk of a redirect): it would
    lead out of the layer.
    """
    fd = os.dup(root_fd)
    try:
        for name in path:
            check_redirect_component(name)
            child = os.open(name, _at.DIR_PATH_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def parse_redirect(value: bytes | None) -> Place | None:
    """An `overlay.redirect` value: `/a/b` from the layer root, or a bare name beside us.

    A malformed value (empty, an empty component, a `/` in a relative name) is EINVAL, the
    kernel's answer; it is never taken for "no redirect". `.` and `..` pass here and are
    refused where a walk reaches them (`check_redirect_component`), as the kernel does. The
    kernel reads the value as a C string: it ends at a NUL.
    """
    if value is None:
        return None
    text = os.fsdecode(value.split(b"\0", 1)[0])
    if text.startswith("/"):
        components = tuple(text[1:].split("/"))
        if "" not in components:
            return components
    elif value and "/" not in text:
        return text
    raise BrokenEntry(errno.EINVAL, f"invalid overlay.redirect {value!r}")


def check_redirect_component(name: str) -> None:
    """Refuse a redirect's step that is no name in its directory (EACCES, as the kernel)."""
    if name in ("", ".", ".."):
        raise BrokenEntry(errno.EACCES, f"overlay.redirect leads to {name!r}")


def read_redirect(fds: "DirectoryFds", layer: int, directory_fd: int,
                  name: str | None) -> Place | None:
    """The redirect of (directory_fd, name) in *layer*; None in the lowest layer, where the
    kernel never reads one (there is nothing below to redirect to)."""
    if layer == len(fds.stack.layers) - 1:
        return None
    redirect = parse_redirect(whiteout.read_overlay_xattr(directory_fd, name, whiteout.REDIRECT))
    if redirect is not None and not fds.stack.format.follows_redirects:
        raise BrokenEntry(errno.EPERM, "redirect_dir=nofollow: a redirect is not followed",
                          name)
    return redirect


class _Search:
    """Where lookup looks next: *name* in the parent's copies, or a path from layer roots."""

    def __init__(self, fds: DirectoryFds, parent: Directory, place: Place) -> None:
        self.fds, self.parent, self.place = fds, parent, place
        self.opened: int | None = None

    def follow(self, redirect: Place) -> None:
        """Search the layers below at *redirect*: a path from the root, or a name beside the
        place searched now (in the directory a path led to, if it was one)."""
        if isinstance(redirect, str) and isinstance(self.place, tuple):
            self.place = (*self.place[:-1], redirect)
        else:
            self.place = redirect

    def directory_fd(self, layer: int) -> tuple[int, str, bool] | None:
        """(fd of the directory to search, name, xwhiteouts) in *layer*, or None to skip it.

        Raises _Hidden where a path meets a non-directory (a file, a symlink, a whiteout):
        the kernel stops looking there. Raises EACCES for a `.` or `..` step.
        """
        self.close()
        if isinstance(self.place, str):
            if layer not in self.parent.layers:
                return None
            check_redirect_component(self.place)
            return (self.fds.fd(self.parent, layer), self.place,
                    layer in self.parent.xwhiteout_layers)
        try:
            self.opened = open_path(self.fds.stack.layers[layer].fd, self.place[:-1])
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                raise _Hidden from None
            raise
        check_redirect_component(self.place[-1])
        xwhiteouts = whiteout.directory_opacity(self.opened) is Opacity.XWHITEOUTS
        return self.opened, self.place[-1], xwhiteouts

    def close(self) -> None:
        if self.opened is not None:
            os.close(self.opened)
            self.opened = None


def lookup(fds: DirectoryFds, parent: Directory, name: str, *,
           upper: int | None = None, listing: Listing | None = None) -> Entry | None:
    """Resolve *name* in *parent*, top layer first; None when no layer shows it.

    A directory's `overlay.redirect` sends the search in the layers below to the path it names
    (a renamed directory finds its lower copies where they are). A metadata-only copy (the
    kernel's metacopy), in any layer, finds its data below (`_find_data`). *upper* is the index
    of the writable layer, if any: for a copy found there, the layers below are probed too, to
    know whether deleting it needs a whiteout.
    *listing*, a scan of *parent*, lets the search skip lower layers that lack the name.
    The upper is not read in the OCI dialect: a `.wh.` name there is an ordinary entry (below
    it, only a marker), and hides nothing, as in the kernel.
    Raises OSError for a name that cannot exist (ENAMETOOLONG, EINVAL) or a layer that fails,
    and BrokenEntry where the kernel fails the lookup of a name its layers hold.
    """
    _at.check_name(name)
    search = _Search(fds, parent, name)
    top_stat: os.stat_result | None = None
    merged: dict[int, int] = {}             # layer -> fd of the directory copies found so far
    places: dict[int, Place] = {}
    xwhiteouts: set[int] = set()
    try:
        for layer in range(parent.layers[0], len(fds.stack.layers)):
            if layer != upper and whiteout.is_oci_name(name):
                break                      # a marker in a lower layer, never an entry
            if listing is not None and search.place == name \
                    and not listing.may_hold(layer, name):
                continue
            try:
                where = search.directory_fd(layer)
                if where is None:
                    continue
                directory_fd, search_name, layer_xwhiteouts = where
                st = _find(directory_fd, search_name, layer_xwhiteouts, oci=layer != upper)
            except _Hidden:
                break
            if st is None:
                continue
            if not stat.S_ISDIR(st.st_mode):
                if top_stat is None:
                    found = Name(parent, name, layer)
                    entry = Entry(found, layer, st)
                    if layer == upper:
                        found.has_lower = _shown_below(fds, parent, name, layer, listing)
                        entry.origin_ino = whiteout.read_origin_ino(directory_fd, name)
                    if stat.S_ISREG(st.st_mode) and _is_metacopy(directory_fd, name):
                        if not fds.stack.format.metacopy:
                            raise BrokenEntry(errno.EPERM, "metacopy=off: a metadata-only "
                                              "copy is not read", name)
                        entry.metacopy = True
                        entry.data, data_stat = _find_data(fds, search, directory_fd, layer)
                        entry.data_parent = parent
                        entry.stat = _with_blocks(st, data_stat.st_blocks)
                    return entry
                break                      # a non-directory below a directory ends the merge
            if top_stat is None:
                top_stat = st
            merged[layer] = fd = os.open(search_name, _at.DIR_PATH_FLAGS, dir_fd=directory_fd)
            if search.place != name:
                places[layer] = search.place
            opacity = whiteout.directory_opacity(fd, oci=layer != upper)
            if opacity is Opacity.XWHITEOUTS:
                xwhiteouts.add(layer)
            elif opacity is Opacity.OPAQUE:
                break
            if layer != upper and whiteout.is_oci_whiteout_present(directory_fd, search_name):
                break      # OCI: `.wh.NAME` beside NAME hides only the layers below
            redirect = read_redirect(fds, layer, fd, None)
            if redirect is not None:
                search.follow(redirect)
    except BaseException:
        for fd in merged.values():
            os.close(fd)
        raise
    finally:
        search.close()
    if top_stat is None:
        return None
    own_name = Name(parent, name, next(iter(merged)))
    directory = Directory(own_name, tuple(merged), top_stat, frozenset(xwhiteouts), places)
    fds.adopt(directory, merged)
    if directory.layer == upper:
        own_name.has_lower = _shown_below(fds, parent, name, upper, listing)
        directory.origin_ino = whiteout.read_origin_ino(merged[upper], None)
    return directory


def _find_data(fds: DirectoryFds, search: _Search, directory_fd: int,
               layer: int) -> tuple[tuple[int, Place], os.stat_result]:
    """Where the data of the metacopy found at (directory_fd, search.place) in *layer* is, and
    its lstat.

    As the kernel: down through the layers below, at each metacopy's redirect, to the first
    regular file that is no metacopy itself. A whiteout, a file of another type, or the end of
    the stack before it means the data is lost: EIO, never the metacopy's own zeros.
    """
    name = search.place if isinstance(search.place, str) else search.place[-1]
    for lower in range(layer, len(fds.stack.layers)):
        if lower > layer:
            try:
                where = search.directory_fd(lower)
                if where is None:
                    continue
                directory_fd, name, xwhiteouts = where
                st = _find(directory_fd, name, xwhiteouts)
            except _Hidden:
                break
            if st is None:
                continue
            if not stat.S_ISREG(st.st_mode):
                break
            if not _is_metacopy(directory_fd, name):
                return (lower, search.place), st
        redirect = read_redirect(fds, lower, directory_fd, name)
        if redirect is not None:
            search.follow(redirect)
    raise BrokenEntry(errno.EIO, "a metadata-only copy whose data is in no layer below", name)


def _is_metacopy(directory_fd: int, name: str) -> bool:
    """Whether a regular file holds metadata only; a mark of 1 to 3 bytes is corrupt (EIO, as
    the kernel)."""
    value = whiteout.read_metacopy(directory_fd, name)
    if value is not None and 0 < len(value) < whiteout.METACOPY_MIN_SIZE:
        raise BrokenEntry(errno.EIO, f"invalid overlay.metacopy {value!r}", name)
    return value is not None


def _with_blocks(st: os.stat_result, blocks: int) -> os.stat_result:
    """*st* with another st_blocks: a metacopy shows its data's, as the kernel does."""
    shown, more = st.__reduce__()[1]
    return os.stat_result(shown, {**more, "st_blocks": blocks})


def _data_directory(fds: DirectoryFds, entry: Entry) -> tuple[int, str, bool]:
    """(directory fd, name) of a metacopy entry's data, and whether the fd is the caller's to
    close."""
    if entry.data is None:
        raise OSError(errno.EIO, "the data of this metadata-only copy is missing",
                      entry.describe())
    layer, place = entry.data
    if isinstance(place, str):
        assert entry.data_parent is not None
        return fds.fd(entry.data_parent, layer), place, False
    return open_path(fds.stack.layers[layer].fd, place[:-1]), place[-1], True


def open_data(fds: DirectoryFds, entry: Entry, flags: int) -> int:
    """An fd on a metacopy entry's data, in the lower layer that holds it."""
    directory_fd, name, owned = _data_directory(fds, entry)
    try:
        return os.open(name, flags, dir_fd=directory_fd)
    finally:
        if owned:
            os.close(directory_fd)


def stat_data(fds: DirectoryFds, entry: Entry) -> os.stat_result:
    """The lstat of a metacopy entry's data."""
    directory_fd, name, owned = _data_directory(fds, entry)
    try:
        return os.stat(name, dir_fd=directory_fd, follow_symlinks=False)
    finally:
        if owned:
            os.close(directory_fd)


def _shown_below(fds: DirectoryFds, parent: Directory, name: str, layer: int,
                 listing: Listing | None = None) -> bool:
    """Whether a layer of *parent* below *layer* shows *name* (first hit decides)."""
    if whiteout.is_oci_name(name):
        return False                       # below the upper, only a marker
    for lower in parent.layers:
        if lower <= layer:
            continue
        if listing is not None and not listing.may_hold(lower, name):
            continue
        try:
            if _find(fds.fd(parent, lower), name, lower in parent.xwhiteout_layers) is not None:
                return True
        except _Hidden:
            return False
    return False


def read_listing(fds: DirectoryFds, directory: Directory, *, upper: int | None) -> Listing:
    """Candidate names of a merged directory: each layer's names once, top layer's order first.

    Markers (`.wh.*`, in layers other than *upper*) are left out; names hidden by a whiteout
    are not, since `lookup` decides visibility. Callers resolve each name before showing it, so
    listing and lookup cannot disagree.
    """
    names: dict[str, tuple[int, os.DirEntry[str]]] = {}
    lower_names: dict[int, frozenset[str]] = {}
    marked: set[str] = set()
    prefix = whiteout.OCI_WHITEOUT_PREFIX
    for layer in directory.layers:
        listing_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                             dir_fd=fds.fd(directory, layer))
        try:
            with os.scandir(listing_fd) as scanned:
                entries = list(scanned)
        finally:
            os.close(listing_fd)
        if layer == upper:
            for entry in entries:
                names.setdefault(entry.name, (layer, entry))
            continue
        here: set[str] = set()
        for entry in entries:
            name = entry.name
            if name.startswith(prefix):
                name = name[len(prefix):]
                marked.add(name)
            else:
                names.setdefault(name, (layer, entry))
            here.add(name)
        lower_names[layer] = frozenset(here)
    return Listing(list(names), lower_names, names, frozenset(marked))


def listed_file(listing: Listing, directory: Directory, name: str,
                upper: int | None) -> tuple[int, int, int] | None:
    """(layer, inode number, file type bits) of *name*'s topmost copy, where the layers'
    directory entries alone tell it, as they do for a lower layer's directory, regular file or
    symlink that no layer above hides; None where only `lookup` can tell (an upper copy, with
    its recorded origin; a device node, perhaps a whiteout; a regular file in a layer that may
    hold xwhiteouts; a name a `.wh.` marker names).

    A plain listing (no attributes) names each entry this way, with no stat: `ls -f` of a
    large lower directory costs a dictionary lookup per name instead of a probe per layer."""
    top = listing.top.get(name)
    if top is None or name in listing.marked:
        return None            # a `.wh.` marker: hidden, perhaps, or shown from its layer
    layer, found = top
    if layer == upper:
        return None
    if found.is_file(follow_symlinks=False):
        if layer in directory.xwhiteout_layers:
            return None
        kind = stat.S_IFREG
    elif found.is_dir(follow_symlinks=False):
        kind = stat.S_IFDIR
    elif found.is_symlink():
        kind = stat.S_IFLNK
    else:
        return None
    return layer, found.inode(), kind


def read_merged_names(fds: DirectoryFds, directory: Directory, *,
                      upper: int | None = None) -> list[str]:
    """`read_listing`'s names alone."""
    return read_listing(fds, directory, upper=upper).names


def stat_entry(fds: DirectoryFds, entry: Entry) -> os.stat_result:
    """A fresh lstat of the entry's topmost copy (for an indexed lower name: the upper one)."""
    directory_fd, name = entry.location(fds)
    st = _at.stat_location(directory_fd, name)
    if entry.metacopy:
        st = _with_blocks(st, stat_data(fds, entry).st_blocks)
    return st
