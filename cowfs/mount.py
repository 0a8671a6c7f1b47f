"""The FUSE face: pyfuse3 operations over `Union`, and the mount's life in a trio nursery.

Handlers are synchronous calls to local syscalls (a thread hop costs more than the work, see
DESIGN.md §6). The kernel is asked to cache everything for long, listings too where
`cowfs.fuse_extensions` is active: only cowfs changes what it serves, and the kernel sees the
changes it asks for, so nothing it caches goes stale behind its back (where one would, cowfs
invalidates it).
"""

import collections
import contextlib
import errno
import functools
import gc
import json
import logging
import os
import signal
import socket
import stat
import struct
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple, ParamSpec, TypeVar

import pyfuse3
import trio

from cowfs import _libc, control, fuse_extensions, layers, privileges, request_wait
from cowfs.durability import BATCH, BATCH_DELAY_S, VOLATILE, Durability
from cowfs.idmap import IDENTITY, IdMap
from cowfs.inodes import ROOT_ID, InodeTable, Node, NodeId
from cowfs.layers import Layer, LayoutError, read_mountinfo
from cowfs.lookup import UPPER, BrokenEntry, Directory, Entry, Listing, Name
from cowfs.union import Caller, Refreshed, Union
from cowfs.watch import LowerWatch
from cowfs.whiteout import check_new_name

log = logging.getLogger(__name__)

# Only cowfs changes the layers while mounted, so the kernel may keep what it learnt for long.
ENTRY_TIMEOUT_S = 300.0
ATTR_TIMEOUT_S = 300.0
# What `stat` advertises as the best I/O size: programs size their buffers by it.
BLOCK_SIZE = 128 * 1024
# The kernel asks for reads this large when read-ahead allows (DESIGN.md §6).
READ_AHEAD_KB = 1024
# A copy-up with more data than this runs in a worker thread: a thread hop costs ~0.2 ms, far
# less than copying this much, and other requests are served meanwhile.
THREADED_COPY_BYTES = 1 << 20
# A virtual xattr of the root: the copy-up statistics, the requests served and the kernel
# features in use, as JSON (root only, as trusted.* is).
STATS_XATTR = b"trusted.cowfs.stats"
# The tables are built again once the nodes known fall to a quarter of at least this many.
SHRINK_AFTER_NODES = 1024

P = ParamSpec("P")
R = TypeVar("R")


def replies_errno(handler: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turn a handler's failure into an errno reply: a bug costs one request, not the mount."""

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        log.debug("%s(%s)", handler.__name__, _RequestArguments(args[1:]))
        args[0].requests[handler.__name__] += 1     # type: ignore[attr-defined]
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            log.debug("%s: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("%s%r failed", handler.__name__, args[1:])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


class _RequestArguments:
    """A request's arguments as a debug line shows them, formatted only if it is written."""

    __slots__ = ("arguments",)

    def __init__(self, arguments: tuple[object, ...]) -> None:
        self.arguments = arguments

    def __str__(self) -> str:
        return ", ".join(_describe(argument) for argument in self.arguments
                         if not isinstance(argument, (pyfuse3.RequestContext,
                                                      pyfuse3.ReaddirToken,
                                                      pyfuse3.EntryAttributes)))


def _describe(argument: object) -> str:
    if isinstance(argument, pyfuse3.SetattrFields):
        changed = [name[len("update_"):] for name in ("update_mode", "update_uid", "update_gid",
                                                       "update_size", "update_atime",
                                                       "update_mtime")
                   if getattr(argument, name)]
        return "set " + "+".join(changed) if changed else "set nothing"
    return repr(argument)


class DirectoryHandle:
    """An open directory: its listing, served by position. It is read at each readdir from
    position 0 (the first, and each after rewinddir(3)), so it shows what was made since
    opendir, as the kernel's overlay does."""

    __slots__ = ("listing", "names", "node")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.listing: Listing | None = None
        self.names: list[str] = []

    def use(self, listing: Listing) -> None:
        self.listing = listing
        self.names = [".", "..", *listing.names]


class FileHandle:
    """An open file: an fd on the copy that was topmost when it was opened.

    A reader that opened a lower copy follows the entry when it is copied up, so all openers
    of one file see one file (the kernel keeps one page cache for the node).
    """

    __slots__ = ("entry", "fd", "flags", "source")

    def __init__(self, entry: Entry, fd: int, flags: int) -> None:
        self.entry = entry
        self.fd = fd
        self.flags = flags
        self.source = self.copy_of(entry)

    @staticmethod
    def copy_of(entry: Entry) -> tuple[int, bool]:
        """Which copy an fd opened now would be on: the layer, and whether only its data."""
        return entry.layer, entry.metacopy


class KillRequest(NamedTuple):
    """The kernel's word that a request kill suid/sgid (FUSE_HANDLE_KILLPRIV_V2): what it is
    on, and who asks."""

    opcode: int     # fuse_extensions.KILL_ON_WRITE, _SETATTR or _OPEN
    node_id: int
    fh: int         # a write's handle (0 for the others)
    gid: int
    pid: int


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, union: Union, uids: IdMap = IDENTITY, gids: IdMap = IDENTITY, *,
                 writeback_cache: bool = False, request_poll: bool = True) -> None:
        """*uids* and *gids* map owners between the layers and the view (`cowfs.idmap`);
        *writeback_cache* asks the kernel for it (pyfuse3 reads the attribute at INIT);
        *request_poll* lets the request loop poll for the next request (`cowfs.request_wait`)."""
        super().__init__()
        self.enable_writeback_cache = writeback_cache
        self.union = union
        self.uids = uids
        self.gids = gids
        self.nodes = InodeTable(union, union.fds, self._invalidate_node)
        self._directory_handles: dict[int, DirectoryHandle] = {}
        self._file_handles: dict[int, FileHandle] = {}
        self._next_handle = 1
        # Requests served, by handler: what the kernel still asks (the statistics show it).
        self.requests: collections.Counter[str] = collections.Counter()
        # Entries whose copy-up is under way, and the event set when it is done.
        self._copying: dict[Entry, trio.Event] = {}
        # What the request being dispatched asks to kill (note_kill_request), until its
        # handler takes it; and how many files had suid or sgid removed so.
        self._kill_request: KillRequest | None = None
        self.privileges_killed = 0
        self.shrinks = 0              # times the tables were built again (`_shrink`)
        # How the request loop waits for the kernel (installed into pyfuse3 by `serve`).
        self.request_wait = request_wait.RequestWait(
            request_wait.spin_by_default() if request_poll else 0)
        self.initialized = trio.Event()   # the kernel's INIT answered (`init`)
        # What `cowfs list` shows beside the live layers: set by whoever mounts.
        self.mountpoint = ""
        self.options: dict[str, object] = {}
        self._changing_layers = trio.Lock()
        # `-o watch`: the lower directories of those the kernel looked up are watched.
        self.watch_lowers = False
        self.lower_watch: LowerWatch | None = None
        # Where files no name reaches since a refresh were: what a refusal calls them.
        self._retired_paths: weakref.WeakKeyDictionary[Entry, str] = \
            weakref.WeakKeyDictionary()

    def _caller(self, ctx: pyfuse3.RequestContext) -> Caller:
        """Who asks, in the layers' ids: what it creates is owned so on disk."""
        return Caller(self.uids.to_disk(ctx.uid), self.gids.to_disk(ctx.gid))

    # -- attributes -------------------------------------------------------------------------

    def attributes(self, node_id: NodeId, entry: Entry,
                   st: os.stat_result | None = None) -> pyfuse3.EntryAttributes:
        st = st or entry.stat
        attributes = pyfuse3.EntryAttributes()
        attributes.st_ino = pyfuse3.InodeT(node_id)
        attributes.generation = 0
        attributes.entry_timeout = ENTRY_TIMEOUT_S
        attributes.attr_timeout = ATTR_TIMEOUT_S
        attributes.st_mode = pyfuse3.ModeT(st.st_mode)
        attributes.st_nlink = st.st_nlink if entry.removed else self.union.link_count(entry, st)
        attributes.st_uid = self.uids.to_view(st.st_uid)
        attributes.st_gid = self.gids.to_view(st.st_gid)
        attributes.st_rdev = st.st_rdev
        attributes.st_size = st.st_size
        attributes.st_blksize = BLOCK_SIZE
        attributes.st_blocks = st.st_blocks
        attributes.st_atime_ns = st.st_atime_ns
        attributes.st_mtime_ns = st.st_mtime_ns
        attributes.st_ctime_ns = st.st_ctime_ns
        return attributes

    def _reply_entry(self, entry: Entry) -> pyfuse3.EntryAttributes:
        """Count a lookup of *entry* and describe it, as every entry-creating reply does."""
        node = self.nodes.remember(entry)
        return self.attributes(node.id, node.entry, self.union.stat(entry))

    def _node_stat(self, node: Node) -> os.stat_result:
        return self.union.stat(node.entry)

    def _directory_node(self, node_id: int) -> Node:
        node = self.nodes.get(node_id)
        if not isinstance(node.entry, Directory):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return node

    def _new_handle(self) -> int:
        handle_id = self._next_handle
        self._next_handle += 1
        return handle_id

    async def _copy_up(self, entry: Entry, *, data: bool = True, name: Name | None = None
                       ) -> None:
        """Copy *entry* (and its *name*) up unless done; one copy-up per entry at a time, big
        data in a thread."""
        await self._settle(entry)
        if not self.union.writable or \
                not self.union.needs_copy_up(entry, data=data, name=name):
            return
        done = self._copying[entry] = trio.Event()
        try:
            with contextlib.closing(self.union.copy_up_steps(entry, data=data, name=name)
                                    ) as steps:
                for job in steps:
                    if job.size >= THREADED_COPY_BYTES:
                        await trio.to_thread.run_sync(job.run)
                    else:
                        job.run()
        finally:
            del self._copying[entry]
            done.set()

    async def _settle(self, *entries: Entry | None) -> None:
        """Wait until no copy-up of *entries* is under way: nothing else may change them."""
        for entry in entries:
            while entry is not None and (done := self._copying.get(entry)) is not None:
                await done.wait()

    async def _prepare_removal(self, parent: Entry, name: str) -> None:
        """A name about to go: let its copy-up finish first (the union keeps the file itself
        reachable for its node and open handles)."""
        await self._settle(self.union.lookup(parent, name))

    def statistics(self) -> dict[str, object]:
        """What the root's STATS_XATTR shows."""
        return {**self.union.statistics(), "requests": dict(self.requests),
                "kernel_features": fuse_extensions.features().as_dict(),
                **fuse_extensions.counters(), "privileges_killed": self.privileges_killed,
                "shrinks": self.shrinks, "requests_polled": self.request_wait.caught,
                "request_sleeps": self.request_wait.slept,
                "request_polls_missed": self.request_wait.missed}

    def describe(self) -> dict[str, object]:
        """What `cowfs list` and `cowfs stats` show of the mount."""
        stack = self.union.stack
        statistics = self.statistics()
        statistics.update(nodes=len(self.nodes), open_files=len(self._file_handles),
                          open_directories=len(self._directory_handles))
        return {"merged": self.mountpoint, "pid": os.getpid(),
                "upper": stack.upper.path if stack.upper is not None else None,
                "lowers": [layer.path for layer in stack.lowers],
                "workdir": stack.work.path if stack.work is not None else None,
                "options": self.options, "statistics": statistics}

    # -- layers changed under the mount: `cowfs refresh` and `cowfs layer add/remove` --------

    async def refresh(self, paths: Sequence[str] | None = None) -> dict[str, int]:
        """Forget what was read of the layers and make the kernel forget what it cached: of
        *paths* (relative to the root; None: everything), and of whatever changed identity
        anywhere. Returns counts for the command to report."""
        async with self._changing_layers:
            return await self._refresh(paths)

    async def add_layer(self, path: str, position: str, anchor: str | None = None
                        ) -> dict[str, int]:
        """Put the directory *path* (resolved) in the stack as a lower layer: `top` of the
        lowers, `bottom`, or `above` the lower layer *anchor*; every later lookup sees it."""
        stack = self.union.stack
        added = await trio.to_thread.run_sync(layers.open_added_layer, stack, path,
                                              self.mountpoint)
        try:
            async with self._changing_layers:
                if position == "top":
                    index = 1 if stack.upper is not None else 0
                elif position == "bottom":
                    index = len(stack.layers)
                else:
                    index = self._lower_index(anchor or "")
                result = await self._refresh(None, lambda: [*stack.layers[:index], added,
                                                            *stack.layers[index:]])
        except BaseException:
            if added not in stack.layers:
                os.close(added.fd)
            raise
        log.info("layer %s added at %d", added.path, index)
        return result

    async def remove_layer(self, path: str) -> dict[str, int]:
        """Take the lower layer *path* (resolved) out of the stack, unless an open file, a
        metacopy or a redirect still needs it; every later lookup goes without it."""
        stack = self.union.stack
        async with self._changing_layers:
            index = self._lower_index(path)
            removed = stack.layers[index]
            if len(stack.lowers) == 1:
                raise LayoutError(f"lower layer {path} is the only lower layer of the mount")

            def without() -> list[Layer]:
                named = {entry: self._retired_paths.get(entry) or "/".join(_path_of(entry) or
                                                                           ("(removed)",))
                         for entry in self._open_entries()}
                reason = self.union.layer_needed(index, named)
                if reason is not None:
                    raise LayoutError(f"lower layer {path} is still needed: {reason}")
                return [layer for layer in stack.layers if layer is not removed]

            result = await self._refresh(None, without)
        os.close(removed.fd)
        log.info("layer %s removed", removed.path)
        return result

    async def _refresh(self, paths: Sequence[str] | None,
                       new_layers: Callable[[], list[Layer]] | None = None) -> dict[str, int]:
        """`refresh`, under the lock; *new_layers* (which may refuse) gives the new stack once
        no copy-up runs, and nothing runs between it and the change."""
        await self._settle(*self._copying)
        layers_now = new_layers() if new_layers is not None else None
        # Each node's entry, names and path as they were: rehoming moves the nodes.
        old_entries = {node.id: node.entry for node in self.nodes.all()}
        kernel_names = {node_id: self._kernel_names(entry)
                        for node_id, entry in old_entries.items()}
        node_paths = {node_id: _path_of(entry) for node_id, entry in old_entries.items()}
        refreshed = self.union.refresh(list(old_entries.values()), self._open_entries(),
                                       layers_now)
        self.nodes.rehome(refreshed.found, self.union.root)
        self._rehome_handles(refreshed)
        gone = set(refreshed.gone)
        for node_id, entry in old_entries.items():
            if entry in gone and (path := node_paths[node_id]):
                self._retired_paths[entry] = "/".join(path)
        scope = None if paths is None else [tuple(filter(None, path.split("/")))
                                            for path in paths]
        invalidations = self._invalidations(old_entries, refreshed, kernel_names, node_paths,
                                            scope)
        await trio.to_thread.run_sync(_send_invalidations, invalidations)
        return {"nodes": len(old_entries),
                "changed": len(refreshed.gone) + len(refreshed.renumbered),
                "invalidated": len(invalidations)}

    def _lower_index(self, path: str) -> int:
        for index, layer in enumerate(self.union.stack.layers):
            if layer.path == path and not layer.writable:
                return index
        raise LayoutError(f"{path} is not a lower layer of {self.mountpoint}")

    def _open_entries(self) -> list[Entry]:
        return [*(handle.entry for handle in self._file_handles.values()),
                *(handle.node.entry for handle in self._directory_handles.values())]

    def _kernel_names(self, entry: Entry) -> list[tuple[NodeId, str]]:
        """The (parent node, name) pairs under which the kernel may hold *entry*."""
        names = []
        for name in entry.names:
            parent_id = self.nodes.known_id(name.parent)
            if parent_id is not None:
                names.append((parent_id, name.name))
        return names

    def _rehome_handles(self, refreshed: Refreshed) -> None:
        for handle in self._file_handles.values():
            handle.entry = refreshed.found.get(handle.entry, handle.entry)
            layer, metacopy = handle.source
            moved = refreshed.moved_layers.get(layer)
            handle.source = (layer if moved is None else moved, metacopy)
        for directory_handle in self._directory_handles.values():
            directory_handle.listing = None       # read again at the next readdir

    def _invalidations(self, old_entries: dict[NodeId, Entry], refreshed: Refreshed,
                       kernel_names: dict[NodeId, list[tuple[NodeId, str]]],
                       node_paths: dict[NodeId, tuple[str, ...] | None],
                       scope: list[tuple[str, ...]] | None) -> list["_Invalidation"]:
        """What the kernel must forget: every name whose file changed, and within *scope*
        each node's attributes, pages and listing, and each name a refreshed directory holds
        that the kernel does not know as a file (it may have cached it as missing)."""
        def in_scope(path: tuple[str, ...] | None) -> bool:
            return scope is None or (path is not None and any(
                path[:len(wanted)] == wanted or wanted[:len(path)] == path for wanted in scope))

        changed: list[_Invalidation] = []
        refreshed_ids: list[_Invalidation] = []
        shown: set[tuple[NodeId, str]] = set()
        directories: list[tuple[NodeId, Directory]] = []
        for node_id, entry in old_entries.items():
            old = entry if node_id != ROOT_ID else None
            new = self.union.root if old is None else refreshed.found.get(old)
            if old is not None and (new is None or old in refreshed.renumbered):
                changed += [("entry", parent_id, name) for parent_id, name
                            in kernel_names[node_id]]
                continue
            shown.update(kernel_names[node_id])
            if not in_scope(() if old is None else node_paths[node_id]):
                continue
            assert new is not None
            if isinstance(new, Directory):
                directories.append((node_id, new))
            elif new.layer == UPPER and self.union.writable and not new.metacopy:
                continue              # nothing of it is in a lower layer
            refreshed_ids.append(("inode", node_id, ""))
        missing: list[_Invalidation] = []
        for node_id, directory in directories:
            if directory.layers == (UPPER,) and self.union.writable:
                continue
            for name in self.union.read_listing(directory).names:
                if (node_id, name) not in shown:
                    missing.append(("entry", node_id, name))
        return [*changed, *missing, *refreshed_ids]

    # -- killing suid and sgid (FUSE_HANDLE_KILLPRIV_V2, docs/ARCHITECTURE.md) ---------------

    def note_kill_request(self, opcode: int, node_id: int, fh: int, uid: int, gid: int,
                          pid: int) -> None:
        """The request being dispatched asks to kill suid/sgid. pyfuse3 runs its handler
        right after (before it reads another request), and the handler takes this before
        it first awaits."""
        self._kill_request = KillRequest(opcode, node_id, fh, gid, pid)

    def _take_kill_request(self, opcode: int, key: int) -> KillRequest | None:
        """The kill the request now handled asks for (*key*: a write's handle, else the node)."""
        request, self._kill_request = self._kill_request, None
        if request is None:
            return None
        if request.opcode != opcode or \
                (request.fh if opcode == fuse_extensions.KILL_ON_WRITE else request.node_id) != key:
            log.error("kill request %r reached another request's handler (%d, %d)", request,
                      opcode, key)
            return None
        return request

    def _bits_to_kill(self, st: os.stat_result, request: KillRequest, *, chown: bool) -> int:
        return privileges.bits_to_kill(st.st_mode, self.gids.to_view(st.st_gid), request.gid,
                                       request.pid, chown=chown)

    def _kill_privileges(self, fd: int, request: KillRequest) -> None:
        """Remove from the upper file open as *fd* the bits the caller's change removes. The
        kernel's cached mode is dropped: no reply to a write or open carries the new one."""
        st = os.fstat(fd)
        kill = self._bits_to_kill(st, request, chown=False)
        if kill:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~kill)
            self.privileges_killed += 1
            self._invalidate_attributes(request.node_id)

    def _mode_after_kill(self, node: Node, request: KillRequest, *, chown: bool) -> int | None:
        """For a setattr (truncate, chown): the copied-up file's mode less what the caller's
        change removes, or None if nothing is to go."""
        st = self._node_stat(node)
        kill = self._bits_to_kill(st, request, chown=chown)
        if not kill:
            return None
        self.privileges_killed += 1
        return st.st_mode & ~kill

    # -- reading ----------------------------------------------------------------------------

    def init(self) -> None:
        """pyfuse3 calls this while answering INIT; the answer goes out before its session
        loop next waits, so a task woken here runs after the kernel took it."""
        self.initialized.set()

    @replies_errno
    async def lookup(self, parent_inode: pyfuse3.InodeT, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._directory_node(parent_inode)
        entry = self.union.lookup(parent.entry, os.fsdecode(name))
        if entry is None:
            negative = pyfuse3.EntryAttributes()   # st_ino 0: the kernel caches the miss
            negative.entry_timeout = ENTRY_TIMEOUT_S
            return negative
        node = self.nodes.remember(entry)
        if self.lower_watch is not None and isinstance(entry, Directory):
            self.watch_directory(entry)
        return self.attributes(node.id, node.entry, entry.stat)

    def watch_directory(self, directory: Directory) -> None:
        assert self.lower_watch is not None
        path = _path_of(directory)
        if path is not None:
            self.lower_watch.add(self.union.fds, directory, "/".join(path))

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        log.debug("forget(%r)", inode_list)
        self.requests["forget"] += 1
        for node_id, count in inode_list:
            self.nodes.forget(node_id, count)
        if self.nodes.peak >= SHRINK_AFTER_NODES and len(self.nodes) < self.nodes.peak // 4:
            self._shrink()

    def _shrink(self) -> None:
        """The kernel forgot most of the nodes (drop_caches, memory pressure): hand back what
        held them. Each time the nodes known fell to a quarter, so rarely (tens of ms)."""
        self.nodes.shrink()
        self.union.shrink()
        gc.collect()                 # entries in cycles (a directory and its names)
        _libc.release_free_memory()
        self.shrinks += 1

    @replies_errno
    async def getattr(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.nodes.get(inode)
        return self.attributes(node.id, node.entry, self._node_stat(node))

    @replies_errno
    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(self.union.readlink(self.nodes.get(inode).entry))

    @replies_errno
    async def open(self, inode: pyfuse3.InodeT, flags: int,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        entry = self.nodes.get(inode).entry
        kill = self._take_kill_request(fuse_extensions.KILL_ON_OPEN, inode) \
            if self._kill_request is not None else None
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            # Filling a metacopy with its data stamps mtime, which no reply tells the kernel.
            stamps = entry.metacopy and not flags & os.O_TRUNC
            await self._copy_up(entry, data=not flags & os.O_TRUNC)
            if stamps:
                self._invalidate_attributes(inode)
        direct = False
        try:
            fd = self.union.open(entry, self._backing_flags(flags))
        except PermissionError:
            if not flags & os.O_APPEND or not self.enable_writeback_cache:
                raise
            # Append-only (chattr +a): its fd must append, where the writeback cache would
            # rewrite the last page in place, so this handle writes through, at the end.
            fd, direct = self.union.open(entry, flags), True
        if kill is not None:
            self._kill_privileges(fd, kill)
        handle_id = self._new_handle()
        self._file_handles[handle_id] = FileHandle(entry, fd, flags)
        self._offer_backing(handle_id, inode, entry, fd)
        # Only cowfs changes the file, through this same kernel inode: its cache stays right.
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(handle_id), keep_cache=not direct,
                                direct_io=direct)

    def _offer_backing(self, handle_id: int, inode: int, entry: Entry, fd: int) -> None:
        """Let the kernel read and write *fd* itself (passthrough) where it is the file's last
        copy: the upper file, or any file of a mount with no upper. The kernel fixes a file's
        backing file for as long as any passthrough open of it lasts, and fails every open
        that does not name that same file (EIO), so a lower file, which a copy-up may replace
        while it is open, is read through the daemon and the page cache instead (the library
        counts those opens too: a cached open and a passthrough one exclude each other)."""
        last_copy = not self.union.writable or (entry.layer == UPPER and not entry.metacopy)
        fuse_extensions.offer_backing(handle_id, inode, fd if last_copy else -1)

    def _backing_flags(self, flags: int) -> int:
        """The open flags of a handle's fd. With the writeback cache the kernel writes dirty
        pages back at their offsets through any writable handle, and reads a page in before
        it writes part of it: a writable handle's fd opens read-write and without O_APPEND
        (the kernel appends itself, at the size it keeps)."""
        if not self.enable_writeback_cache or not flags & (os.O_WRONLY | os.O_RDWR):
            return flags
        return (flags & ~(os.O_ACCMODE | os.O_APPEND)) | os.O_RDWR

    def _readable_fd(self, handle: FileHandle) -> int:
        if handle.source != FileHandle.copy_of(handle.entry):
            # Copied up since this reader opened it: read the copy everyone else writes.
            fd = self.union.open(handle.entry, handle.flags)
            os.close(handle.fd)
            handle.fd, handle.source = fd, FileHandle.copy_of(handle.entry)
        return handle.fd

    @replies_errno
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        return os.pread(self._readable_fd(self._file_handles[fh]), size, off)

    @replies_errno
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        os.close(self._file_handles.pop(fh).fd)

    @replies_errno
    async def opendir(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        node = self._directory_node(inode)
        if self.lower_watch is not None:
            self.watch_directory(node.entry)       # known from a listing, not a lookup
        handle = DirectoryHandle(node)
        handle_id = self._new_handle()
        self._directory_handles[handle_id] = handle
        return pyfuse3.FileHandleT(handle_id)

    @replies_errno
    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int,
                      token: pyfuse3.ReaddirToken) -> None:
        handle = self._directory_handles[fh]
        directory = handle.node.entry
        if start_id == 0 or handle.listing is None:
            handle.use(self.union.read_listing(directory))
        if fuse_extensions.is_plain_listing(fh):
            self._reply_plain_entries(handle, start_id, token)
            return
        for position in range(start_id, len(handle.names)):
            name = handle.names[position]
            if position < 2:
                # The kernel counts no lookup for . and .., so none is remembered.
                node = handle.node if position == 0 else self._parent_node(handle.node)
                attributes = self.attributes(node.id, node.entry)
                entry = None
            else:
                try:
                    entry = self.union.lookup(directory, name, handle.listing)
                except BrokenEntry:
                    # The kernel lists it and fails its stat. pyfuse3 gives a listed name a
                    # node or d_ino 0, which readdir(3) drops: cowfs leaves it out.
                    continue
                if entry is None:
                    continue          # hidden by a whiteout, or removed since opendir
                node_id = self.nodes.id_for(entry)
                attributes = self.attributes(node_id, entry)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attributes, position + 1):
                return
            if entry is not None:
                self.nodes.remember(entry, node_id)

    def _reply_plain_entries(self, handle: DirectoryHandle, start_id: int,
                             token: pyfuse3.ReaddirToken) -> None:
        """A plain READDIR: names, inode numbers and types only, and no lookups to count."""
        assert handle.listing is not None
        directory = handle.node.entry
        attributes = pyfuse3.EntryAttributes()    # only st_ino and the type are sent
        for position in range(start_id, len(handle.names)):
            name = handle.names[position]
            if position < 2:
                node = handle.node if position == 0 else self._parent_node(handle.node)
                number, kind = node.id, stat.S_IFDIR
            else:
                shown = self.union.listed_file(directory, name, handle.listing)
                if shown is None:
                    continue
                number, kind = shown
            attributes.st_ino = number
            attributes.st_mode = kind
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attributes, position + 1):
                return

    def _parent_node(self, node: Node) -> Node:
        directory = node.entry
        if not isinstance(directory, Directory) or directory.is_root or directory.removed:
            return node
        parent = directory.parent
        try:
            return self.nodes.get(self.nodes.id_for(parent))
        except OSError:
            return node

    @replies_errno
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        del self._directory_handles[fh]

    @replies_errno
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = self.union.statfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize = st.f_bsize
        data.f_frsize = st.f_frsize
        data.f_blocks = st.f_blocks
        data.f_bfree = st.f_bfree
        data.f_bavail = st.f_bavail
        data.f_files = st.f_files
        data.f_ffree = st.f_ffree
        data.f_favail = st.f_favail
        data.f_namemax = st.f_namemax
        return data

    @replies_errno
    async def getxattr(self, inode: pyfuse3.InodeT, name: bytes,
                       ctx: pyfuse3.RequestContext) -> bytes:
        if name == STATS_XATTR and inode == pyfuse3.ROOT_INODE:
            return json.dumps(self.statistics()).encode()
        try:
            return self.union.get_xattr(self.nodes.get(inode).entry, os.fsdecode(name))
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    @replies_errno
    async def listxattr(self, inode: pyfuse3.InodeT,
                        ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(name) for name in self.union.list_xattrs(self.nodes.get(inode).entry)]

    @replies_errno
    async def access(self, inode: pyfuse3.InodeT, mode: int,
                     ctx: pyfuse3.RequestContext) -> bool:
        # default_permissions: the kernel checks permissions itself and does not ask.
        return True

    # -- writing ----------------------------------------------------------------------------

    @replies_errno
    async def create(self, parent_inode: pyfuse3.InodeT, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self._directory_node(parent_inode)
        if name == fuse_extensions.TMPFILE_NAME and flags & os.O_TMPFILE == os.O_TMPFILE:
            # A TMPFILE request (the extensions route it here): a file with no name, whose
            # node only a LINK of it names. Counted as a create too.
            self.requests["tmpfile"] += 1
            entry, fd = self.union.tmpfile(parent.entry, mode, self._backing_flags(flags),
                                           self._caller(ctx))
        else:
            entry, fd = self.union.create(parent.entry, os.fsdecode(name), mode,
                                          self._backing_flags(flags), self._caller(ctx))
        handle_id = self._new_handle()
        self._file_handles[handle_id] = FileHandle(entry, fd, flags)
        reply = self._reply_entry(entry)
        self._offer_backing(handle_id, reply.st_ino, entry, fd)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(handle_id), keep_cache=True), reply

    @replies_errno
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        fd = self._file_handles[fh].fd
        if self._kill_request is not None:
            kill = self._take_kill_request(fuse_extensions.KILL_ON_WRITE, fh)
            if kill is not None:
                self._kill_privileges(fd, kill)     # before the data, as the VFS does
        return os.pwrite(fd, buf, off)

    @replies_errno
    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        pass    # data goes straight to the upper file: nothing is buffered here

    @replies_errno
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        """The file's own sync, and (unless volatile) the copy-ups and whiteouts so far."""
        fd = self._file_handles[fh].fd
        durability = self.union.durability
        if durability is not None and durability.mode == VOLATILE:
            return

        def sync() -> None:
            if datasync:
                os.fdatasync(fd)
            else:
                os.fsync(fd)
            if durability is not None:
                durability.flush()
        await trio.to_thread.run_sync(sync)

    @replies_errno
    async def fsyncdir(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        directory = self._directory_handles[fh].node.entry
        durability = self.union.durability
        if durability is None or durability.mode == VOLATILE or directory.layer != 0 \
                or directory.removed:
            return
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                     dir_fd=self.union.fds.fd(directory, 0))

        def sync() -> None:
            try:
                os.fsync(fd)
                durability.flush()
            finally:
                os.close(fd)
        await trio.to_thread.run_sync(sync)

    @replies_errno
    async def setattr(self, inode: pyfuse3.InodeT, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: pyfuse3.FileHandleT | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.nodes.get(inode)
        kill = self._take_kill_request(fuse_extensions.KILL_ON_SETATTR, inode) \
            if self._kill_request is not None else None
        if self._hands_back_times(fields):
            current = self._node_stat(node)
            if attr.st_mtime_ns == current.st_mtime_ns:
                # The times the kernel kept: nothing changes, so nothing is copied up.
                return self.attributes(node.id, node.entry, current)
        if kill is None and self._keeps_size(fields):
            current = self._node_stat(node)
            if attr.st_size == current.st_size and stat.S_ISREG(current.st_mode):
                # The kernel keeps the file as it was: so does cowfs (no copy-up, no stamp
                # that only a later mount would show).
                return self.attributes(node.id, node.entry, current)
        await self._copy_up(node.entry, data=fields.update_size and attr.st_size > 0)
        handle = self._file_handles.get(fh) if fh is not None else None
        mode = attr.st_mode if fields.update_mode else None
        if kill is not None and mode is None:
            mode = self._mode_after_kill(node, kill, chown=fields.update_uid or fields.update_gid)
        st = self.union.setattr(
            node.entry,
            mode=mode,
            uid=self.uids.to_disk(attr.st_uid) if fields.update_uid else None,
            gid=self.gids.to_disk(attr.st_gid) if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            fd=handle.fd if handle is not None
            and handle.source == FileHandle.copy_of(node.entry) else None)
        return self.attributes(node.id, node.entry, st)

    def _hands_back_times(self, fields: pyfuse3.SetattrFields) -> bool:
        """Whether a setattr may be the writeback cache handing back the times it kept: an
        mtime (and a ctime, which no one can set) and nothing else. One that brings the
        file's own mtime changes nothing; a file renamed over or linked gets one though its
        data never changed."""
        return (self.enable_writeback_cache and fields.update_mtime
                and not (fields.update_mode or fields.update_uid or fields.update_gid
                         or fields.update_size or fields.update_atime))

    def _keeps_size(self, fields: pyfuse3.SetattrFields) -> bool:
        """Whether a setattr may be truncate(2) by path to the size the file has, under the
        writeback cache: the kernel stamps mtime and ctime itself, and only when the size
        changes (fs/fuse/dir.c, fuse_do_setattr), and never takes the daemon's, so a file
        system that stamped them would show them only after the inode left the cache."""
        return (self.enable_writeback_cache and fields.update_size
                and not (fields.update_mode or fields.update_uid or fields.update_gid
                         or fields.update_mtime or fields.update_atime))

    @replies_errno
    async def mknod(self, parent_inode: pyfuse3.InodeT, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._directory_node(parent_inode)
        return self._reply_entry(self.union.mknod(parent.entry, os.fsdecode(name), mode, rdev,
                                                  self._caller(ctx)))

    @replies_errno
    async def mkdir(self, parent_inode: pyfuse3.InodeT, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._directory_node(parent_inode)
        return self._reply_entry(self.union.mkdir(parent.entry, os.fsdecode(name), mode,
                                                  self._caller(ctx)))

    @replies_errno
    async def symlink(self, parent_inode: pyfuse3.InodeT, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._directory_node(parent_inode)
        return self._reply_entry(self.union.symlink(parent.entry, os.fsdecode(name),
                                                    os.fsdecode(target), self._caller(ctx)))

    @replies_errno
    async def link(self, inode: pyfuse3.InodeT, new_parent_inode: pyfuse3.InodeT,
                   new_name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        check_new_name(os.fsdecode(new_name))       # before the copy-up below
        node = self.nodes.get(inode)
        parent = self._directory_node(new_parent_inode)
        await self._copy_up(node.entry, data=False)    # as the kernel: no data for a link
        entry = self.union.link(node.entry, parent.entry, os.fsdecode(new_name))
        return self._reply_entry(entry)

    @replies_errno
    async def unlink(self, parent_inode: pyfuse3.InodeT, name: bytes,
                     ctx: pyfuse3.RequestContext) -> None:
        parent = self._directory_node(parent_inode)
        await self._prepare_removal(parent.entry, os.fsdecode(name))
        self.union.unlink(parent.entry, os.fsdecode(name))

    @replies_errno
    async def rmdir(self, parent_inode: pyfuse3.InodeT, name: bytes,
                    ctx: pyfuse3.RequestContext) -> None:
        parent = self._directory_node(parent_inode)
        await self._prepare_removal(parent.entry, os.fsdecode(name))
        self.union.rmdir(parent.entry, os.fsdecode(name))

    @replies_errno
    async def rename(self, parent_inode_old: pyfuse3.InodeT, name_old: bytes,
                     parent_inode_new: pyfuse3.InodeT, name_new: bytes, flags: int,
                     ctx: pyfuse3.RequestContext) -> None:
        check_new_name(os.fsdecode(name_new))       # before the copy-ups below
        old_parent = self._directory_node(parent_inode_old)
        new_parent = self._directory_node(parent_inode_new)
        # Nothing is copied up for a rename that fails (EXDEV, ENOTEMPTY...), as the kernel.
        if not self.union.check_rename(old_parent.entry, os.fsdecode(name_old), new_parent.entry,
                                       os.fsdecode(name_new), flags):
            return
        source = self.union.lookup(old_parent.entry, os.fsdecode(name_old))
        if source is not None:
            # No data, as the kernel: a renamed lower file is a metacopy where allowed.
            await self._copy_up(source, data=False, name=source.name_in(
                old_parent.entry, os.fsdecode(name_old)))
        if flags & pyfuse3.RENAME_EXCHANGE:
            await self._settle(self.union.lookup(new_parent.entry, os.fsdecode(name_new)))
        else:
            await self._prepare_removal(new_parent.entry, os.fsdecode(name_new))
        self.union.rename(old_parent.entry, os.fsdecode(name_old), new_parent.entry,
                          os.fsdecode(name_new), flags)
        if old_parent is not new_parent:
            moved = [source]
            if flags & pyfuse3.RENAME_EXCHANGE:
                moved.append(self.union.lookup(old_parent.entry, os.fsdecode(name_old)))
            for entry in moved:
                if isinstance(entry, Directory):
                    self._invalidate_listing(entry)

    def _invalidate_listing(self, directory: Directory) -> None:
        """Drop the kernel's cached listing of *directory*, which changed where the kernel did
        not see it: a directory moved to another parent lists another `..`."""
        node_id = self.nodes.known_id(directory)
        if node_id is not None:
            self._invalidate_node(node_id)

    @staticmethod
    def _invalidate_attributes(node_id: NodeId | pyfuse3.InodeT) -> None:
        try:
            pyfuse3.invalidate_inode(pyfuse3.InodeT(node_id), attr_only=True)
        except OSError as exc:   # ENOENT: the kernel has forgotten it
            log.debug("invalidate_inode(%d): %s", node_id, exc)

    @staticmethod
    def _invalidate_node(node_id: NodeId) -> None:
        """Drop what the kernel caches of a node: attributes, data, a directory's listing.
        Safe inside a handler, also with the writeback cache: only directories' nodes are
        invalidated so, and a directory has no dirty pages to write back through us."""
        try:
            pyfuse3.invalidate_inode(pyfuse3.InodeT(node_id), attr_only=False)
        except OSError as exc:   # ENOENT: the kernel has forgotten it, and its listing too
            log.debug("invalidate_inode(%d): %s", node_id, exc)

    @replies_errno
    async def setxattr(self, inode: pyfuse3.InodeT, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        if name == STATS_XATTR and inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EPERM)
        entry = self.nodes.get(inode).entry
        await self._copy_up(entry, data=False)
        self.union.set_xattr(entry, os.fsdecode(name), value)

    @replies_errno
    async def removexattr(self, inode: pyfuse3.InodeT, name: bytes,
                          ctx: pyfuse3.RequestContext) -> None:
        if name == STATS_XATTR and inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EPERM)
        entry = self.nodes.get(inode).entry
        try:
            if self.union.writable and self.union.needs_copy_up(entry, data=False):
                # A missing one is ENODATA with nothing copied up, as the kernel answers.
                self.union.get_xattr(entry, os.fsdecode(name))
            await self._copy_up(entry, data=False)
            self.union.remove_xattr(entry, os.fsdecode(name))
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise


    # -- requests pyfuse3 does not route ------------------------------------------------------
    # Served through `fuse_extensions.route_extra_operations`: synchronous calls on the trio
    # thread, inside libfuse's processing of the request, so nothing here awaits or waits
    # for another request; an OSError becomes its errno there.

    # The inode-flag ioctls the kernel's fileattr code sends (lsattr, chattr).
    FILE_ATTRIBUTE_READS = (_libc.FS_IOC_GETFLAGS, _libc.FS_IOC_FSGETXATTR)
    FILE_ATTRIBUTE_WRITES = (_libc.FS_IOC_SETFLAGS, _libc.FS_IOC_FSSETXATTR)
    IOCTL_COMMANDS = FILE_ATTRIBUTE_READS + FILE_ATTRIBUTE_WRITES

    def _open_file(self, fh: int) -> FileHandle:
        try:
            return self._file_handles[fh]
        except KeyError:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF)) from None

    def _handle_entry(self, fh: int) -> Entry:
        """The file or directory an open handle is on (the kernel opens either for ioctls)."""
        directory = self._directory_handles.get(fh)
        return directory.node.entry if directory is not None else self._open_file(fh).entry

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """Every mode the FUSE kernel passes on (KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE); the file
        is open for writing, so the open copied it up already."""
        self.requests["fallocate"] += 1
        log.debug("fallocate(%d, %#x, %d, %d)", fh, mode, offset, length)
        self.union.allocate(self._open_file(fh).fd, mode, offset, length)

    def lseek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA and SEEK_HOLE, the only ones the kernel asks: so `cp --sparse`, tar and
        qemu-img see the holes of the copy readers see."""
        self.requests["lseek"] += 1
        log.debug("lseek(%d, %d, %d)", fh, offset, whence)
        handle = self._open_file(fh)
        return self.union.seek(handle.entry, self._readable_fd(handle), offset, whence)

    def copy_file_range(self, fh_in: int, offset_in: int, fh_out: int, offset_out: int,
                        length: int, flags: int) -> int:
        """Done by the kernel on the backing files; a short count past Union's bound."""
        self.requests["copy_file_range"] += 1
        log.debug("copy_file_range(%d, %d, %d, %d, %d)", fh_in, offset_in, fh_out, offset_out,
                  length)
        if flags:
            raise OSError(errno.EINVAL, "copy_file_range takes no flags")
        source = self._readable_fd(self._open_file(fh_in))
        return self.union.copy_range(source, offset_in, self._open_file(fh_out).fd, offset_out,
                                     length)

    def ioctl(self, fh: int, command: int, flags: int, data: bytes, out_size: int
              ) -> tuple[int, bytes]:
        """The inode-flag ioctls the kernel sends for lsattr and chattr (it opens the file or
        directory for them); every other command is ENOTTY, as on a filesystem without it
        (the library answers those itself: only IOCTL_COMMANDS arrive here)."""
        self.requests["ioctl"] += 1
        log.debug("ioctl(%d, %#x, %#x, %d bytes in, %d out)", fh, command, flags, len(data),
                  out_size)
        if command in self.FILE_ATTRIBUTE_READS:
            return 0, self.union.get_file_attributes(self._handle_entry(fh), command, out_size)
        if command in self.FILE_ATTRIBUTE_WRITES:
            entry = self._handle_entry(fh)
            if entry in self._copying:
                # Its copy-up runs in a worker thread, and this call cannot wait for it.
                raise OSError(errno.EAGAIN, "a copy-up of this file is under way")
            self.union.set_file_attributes(entry, command, data)
            node_id = self.nodes.known_id(entry)
            if node_id is not None:
                self._invalidate_attributes(node_id)     # ctime, and a copy-up's blocks
            return 0, b""
        raise OSError(errno.ENOTTY, os.strerror(errno.ENOTTY))


# What the kernel is told to forget: ("inode", node, "") or ("entry", parent node, name).
_Invalidation = tuple[str, int, str]


def _path_of(entry: Entry) -> tuple[str, ...] | None:
    """The names from the root to *entry* by its first name; None if no name reaches it."""
    path: list[str] = []
    while not (isinstance(entry, Directory) and entry.is_root):
        if not entry.names:
            return None
        path.append(entry.names[0].name)
        entry = entry.names[0].parent
    return tuple(reversed(path))


def _send_invalidations(invalidations: list[_Invalidation]) -> None:
    """Tell the kernel, from a worker thread: a notification waits for the requests in flight
    on what it names, which the trio thread answers meanwhile."""
    for kind, node_id, name in invalidations:
        try:
            if kind == "inode":
                pyfuse3.invalidate_inode(pyfuse3.InodeT(node_id), attr_only=False)
            else:
                pyfuse3.invalidate_entry(pyfuse3.InodeT(node_id), os.fsencode(name))
        except OSError as exc:       # ENOENT: the kernel holds nothing of it
            log.debug("invalidate %s %d %r: %s", kind, node_id, name, exc)


def fuse_options(*, readonly: bool, fsname: str = "cowfs") -> set[str]:
    options = {f"fsname={fsname}", "subtype=cowfs", "default_permissions"}
    if os.geteuid() == 0:
        options.add("allow_other")   # containers run as other users than the daemon
    if readonly:
        options.add("ro")
    return options


TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


async def _terminate_on_signal(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                               ) -> None:
    with trio.open_signal_receiver(*TERMINATING_SIGNALS) as signals:
        task_status.started()
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return


async def _raise_read_ahead_once_initialized(operations: Operations, device: str) -> None:
    """Let the kernel read ahead 1 MiB: four times fewer read requests on sequential reads.
    The kernel sets a FUSE mount's read-ahead from INIT's answer (lowering it only, to the
    128 KiB it offered), so it is raised once that answer is in."""
    await operations.initialized.wait()
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as setting:
            setting.write(str(READ_AHEAD_KB))
    except OSError as exc:
        log.debug("read_ahead_kb not raised: %s", exc)


def mount(operations: Operations, mountpoint: str, options: set[str]) -> None:
    """Make the mount (the kernel queues requests until `serve` runs)."""
    fuse_extensions.route_extra_operations(operations)
    fuse_extensions.route_kill_requests(operations)
    pyfuse3.init(operations, mountpoint, options)
    fuse_extensions.check_session()


async def _serve_control(operations: Operations, device: str | None, *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer `cowfs list`, `stats`, `refresh` and `layer add/remove` for this mount on its
    control socket (`cowfs.control`, named after the FUSE connection's *device*) until
    cancelled."""
    path = control.socket_path(device) if device is not None else None
    listener = await _listen(path) if path is not None else None
    task_status.started()
    if listener is None or path is None:
        log.info("no control socket: `cowfs list` shows this mount without its details")
        return
    identity = os.stat(path)
    try:
        async with trio.open_nursery() as nursery:
            while True:
                connection, _ = await listener.accept()
                nursery.start_soon(_answer, operations, connection)
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            if os.path.samestat(os.stat(path), identity):
                os.unlink(path)


async def _listen(path: str) -> trio.socket.SocketType | None:
    """A socket at *path*, in directories of the daemon's user alone (its umask is 0)."""
    try:
        for directory in (os.path.dirname(os.path.dirname(path)), os.path.dirname(path)):
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory, 0o700)
            st = os.lstat(directory)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or \
                    st.st_mode & 0o077:
                log.warning("%s is not a private directory of ours: no control socket",
                            directory)
                return None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)          # a killed daemon's, of the device number now ours
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await listener.bind(path)
            os.chmod(path, 0o600)
            listener.listen(16)
        except BaseException:
            listener.close()
            raise
    except OSError as exc:
        log.warning("no control socket at %s: %s", path, exc)
        return None
    return listener


async def _answer(operations: Operations, connection: trio.socket.SocketType) -> None:
    with connection:
        credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                            struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", credentials)
        if uid not in (0, os.geteuid()):
            return                    # only the daemon's user and root are heard
        stream = trio.SocketStream(connection)
        message = b""
        while len(message) < control.MAX_MESSAGE and (chunk := await stream.receive_some()):
            message += chunk
        try:
            reply = await _dispatch(operations, json.loads(message))
        except (LayoutError, ValueError, KeyError, TypeError) as exc:
            reply = {"error": str(exc)}
        except OSError as exc:
            reply = {"error": exc.strerror or str(exc)}
        except Exception:
            log.exception("control request %r failed", message[:200])
            reply = {"error": "the daemon failed to do it (its log says why)"}
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(json.dumps(reply).encode())


async def _dispatch(operations: Operations, message: dict[str, Any]) -> dict[str, object]:
    command = message.get("command")
    if command == "stats":
        return operations.describe()
    if command == "refresh":
        return await operations.refresh(message.get("paths"))
    if command == "add_layer":
        return await operations.add_layer(message["path"], message.get("position", "top"),
                                          message.get("anchor"))
    if command == "remove_layer":
        return await operations.remove_layer(message["path"])
    raise ValueError(f"unknown control command {command!r}")


async def _flush_batches(durability: Durability) -> None:
    """`fsync=batch`: what changed is durable within BATCH_DELAY_S."""
    while True:
        await trio.sleep(BATCH_DELAY_S)
        if durability.pending:
            await trio.to_thread.run_sync(durability.flush)


async def serve(early_signals: list[int], operations: Operations) -> None:
    """Answer requests until unmounted or signalled, then unmount."""
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(_terminate_on_signal)
            # The FUSE connection's major:minor, which names the control socket and the
            # mount's read-ahead setting.
            device = control.own_device(operations.mountpoint, read_mountinfo())
            await nursery.start(_serve_control, operations, device)
            if device is not None:
                nursery.start_soon(_raise_read_ahead_once_initialized, operations, device)
            if operations.watch_lowers:
                operations.lower_watch = LowerWatch(operations.refresh)
                operations.watch_directory(operations.union.root)
                nursery.start_soon(operations.lower_watch.run)
            durability = operations.union.durability
            if durability is not None and durability.mode == BATCH:
                nursery.start_soon(_flush_batches, durability)
            if early_signals:
                log.info("signal %d before serving: unmounting", early_signals[0])
            else:
                request_wait.install(operations.request_wait)
                await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        if operations.lower_watch is not None:
            operations.lower_watch.close()
        pyfuse3.close(unmount=True)
        log.info("unmounted")


def run(operations: Operations, mountpoint: str, options: set[str],
        on_mounted: Callable[[], Any] = lambda: None) -> None:
    """Mount, report readiness through *on_mounted*, serve until unmounted.

    A signal that comes once the mount exists but before trio listens is remembered, so it
    still unmounts cleanly instead of killing the daemon over a live mount.
    """
    early_signals: list[int] = []
    for signum in TERMINATING_SIGNALS:
        signal.signal(signum, lambda signum, _frame: early_signals.append(signum))
    mount(operations, mountpoint, options)
    on_mounted()
    trio.run(serve, early_signals, operations)
