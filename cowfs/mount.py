"""The FUSE face: pyfuse3 operations over `Union`, and the mount's life in a trio nursery.

Handlers are synchronous calls to local syscalls (a thread hop costs more than the work, see
DESIGN.md §6). The kernel is asked to cache everything for long: only cowfs changes what it
serves, so nothing it caches goes stale behind its back.
"""

import errno
import functools
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from cowfs.inodes import InodeTable, Node, NodeId
from cowfs.layers import read_mountinfo
from cowfs.lookup import Directory, Entry
from cowfs.union import Union

log = logging.getLogger(__name__)

# Only cowfs changes the layers while mounted, so the kernel may keep what it learnt for long.
ENTRY_TIMEOUT_S = 300.0
ATTR_TIMEOUT_S = 300.0
# What `stat` advertises as the best I/O size: programs size their buffers by it.
BLOCK_SIZE = 128 * 1024
# The kernel asks for reads this large when read-ahead allows (DESIGN.md §6).
READ_AHEAD_KB = 1024

P = ParamSpec("P")
R = TypeVar("R")


def replies_errno(handler: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turn a handler's failure into an errno reply: a bug costs one request, not the mount."""

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        log.debug("%s(%s)", handler.__name__, _RequestArguments(args[1:]))
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
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
        return ", ".join(repr(argument) for argument in self.arguments
                         if not isinstance(argument, (pyfuse3.RequestContext,
                                                      pyfuse3.ReaddirToken)))


class DirectoryHandle:
    """An open directory: its listing, fixed at opendir and served by position."""

    __slots__ = ("names", "node")

    def __init__(self, node: Node, names: list[str]) -> None:
        self.node = node
        self.names = [".", "..", *names]


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, union: Union) -> None:
        super().__init__()
        self.union = union
        self.nodes = InodeTable(union.stack, union.fds, union.root)
        self._directory_handles: dict[int, DirectoryHandle] = {}
        self._next_handle = 1

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
        # As the kernel's overlayfs: counting a merged directory's subdirectories is not worth
        # it, and find(1) and friends take 1 as "unknown".
        merged = isinstance(entry, Directory) and entry.is_merged
        attributes.st_nlink = 1 if merged else st.st_nlink
        attributes.st_uid = st.st_uid
        attributes.st_gid = st.st_gid
        attributes.st_rdev = st.st_rdev
        attributes.st_size = st.st_size
        attributes.st_blksize = BLOCK_SIZE
        attributes.st_blocks = st.st_blocks
        attributes.st_atime_ns = st.st_atime_ns
        attributes.st_mtime_ns = st.st_mtime_ns
        attributes.st_ctime_ns = st.st_ctime_ns
        return attributes

    def _directory_node(self, node_id: int) -> Node:
        node = self.nodes.get(node_id)
        if not isinstance(node.entry, Directory):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return node

    # -- requests ---------------------------------------------------------------------------

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
        return self.attributes(node.id, entry)

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        log.debug("forget(%r)", inode_list)
        for node_id, count in inode_list:
            self.nodes.forget(node_id, count)

    @replies_errno
    async def getattr(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.nodes.get(inode)
        return self.attributes(node.id, node.entry, self.union.stat(node.entry))

    @replies_errno
    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(self.union.readlink(self.nodes.get(inode).entry))

    @replies_errno
    async def open(self, inode: pyfuse3.InodeT, flags: int,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fd = self.union.open(self.nodes.get(inode).entry, flags)
        # The layer file cannot change while mounted: the kernel may keep its cached pages.
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fd), keep_cache=True)

    @replies_errno
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    @replies_errno
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        os.close(fh)

    @replies_errno
    async def opendir(self, inode: pyfuse3.InodeT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        node = self._directory_node(inode)
        handle = DirectoryHandle(node, self.union.read_merged_names(node.entry))
        handle_id = self._next_handle
        self._next_handle += 1
        self._directory_handles[handle_id] = handle
        return pyfuse3.FileHandleT(handle_id)

    @replies_errno
    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int,
                      token: pyfuse3.ReaddirToken) -> None:
        handle = self._directory_handles[fh]
        directory = handle.node.entry
        for position in range(start_id, len(handle.names)):
            name = handle.names[position]
            if position < 2:
                # The kernel counts no lookup for . and .., so none is remembered.
                node = handle.node if position == 0 else self._parent_node(handle.node)
                attributes = self.attributes(node.id, node.entry)
                entry = None
            else:
                entry = self.union.lookup(directory, name)
                if entry is None:
                    continue          # hidden by a whiteout
                node_id = self.nodes.id_for(entry)
                attributes = self.attributes(node_id, entry)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attributes, position + 1):
                return
            if entry is not None:
                self.nodes.remember(entry, node_id)

    def _parent_node(self, node: Node) -> Node:
        parent = node.entry.parent
        if parent is None:
            return node
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


def fuse_options(*, readonly: bool, fsname: str = "cowfs") -> set[str]:
    options = {f"fsname={fsname}", "subtype=cowfs", "default_permissions"}
    if os.geteuid() == 0:
        options.add("allow_other")   # containers run as other users than the daemon
    if readonly:
        options.add("ro")
    return options


async def _terminate_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return


def raise_read_ahead(mountpoint: str) -> None:
    """Let the kernel read ahead 1 MiB: four times fewer read requests on sequential reads."""
    devices = [mount.device for mount in read_mountinfo() if mount.mountpoint == mountpoint]
    if not devices:
        return
    try:
        with open(f"/sys/class/bdi/{devices[-1]}/read_ahead_kb", "w") as setting:
            setting.write(str(READ_AHEAD_KB))
    except OSError as exc:
        log.debug("read_ahead_kb not raised: %s", exc)


def mount(operations: Operations, mountpoint: str, options: set[str]) -> None:
    """Make the mount (the kernel queues requests until `serve` runs)."""
    pyfuse3.init(operations, mountpoint, options)
    raise_read_ahead(mountpoint)


async def serve() -> None:
    """Answer requests until unmounted or signalled, then unmount."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_terminate_on_signal)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)
        log.info("unmounted")


def run(operations: Operations, mountpoint: str, options: set[str],
        on_mounted: Callable[[], Any] = lambda: None) -> None:
    """Mount, report readiness through *on_mounted*, serve until unmounted."""
    mount(operations, mountpoint, options)
    on_mounted()
    trio.run(serve)
