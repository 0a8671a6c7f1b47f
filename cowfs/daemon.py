"""Start a mount's FUSE daemon: in the foreground, or forked into the background.

A background start returns only once the mount is live (the daemon writes `ready` on a pipe)
or has failed (it writes the reason), as mount programs must: callers such as podman use the
merged tree the moment the command exits. pyfuse3 and trio are imported in the daemon only, so
`cowfs umount` and the library stay light.
"""

import dataclasses
import logging
import os
import resource
import signal
import traceback
from collections.abc import Callable

import setproctitle

from cowfs.durability import BATCH
from cowfs.idmap import IDENTITY, IdMap
from cowfs.layers import LayerStack, daemon_title

log = logging.getLogger(__name__)


class DaemonError(Exception):
    """The daemon could not make the mount; the message is its reason."""


@dataclasses.dataclass
class MountOptions:
    readonly: bool = False
    fsname: str = "cowfs"
    fsync: str = BATCH                   # when changes reach the disk (`cowfs.durability`)
    uids: IdMap = IDENTITY               # owners between disk and view (`cowfs.idmap`)
    gids: IdMap = IDENTITY
    # Mount flags passed on to the kernel: nosuid, nodev, noexec, noatime, sync, dirsync.
    kernel_flags: frozenset[str] = frozenset()
    # The kernel caches pyfuse3 cannot ask for, through `cowfs.fuse_extensions`.
    kernel_caches: bool = True
    # Plain READDIR where the kernel wants no attributes (`-o readdirplus=auto`): faster
    # `ls -f`, slower `du` of a large directory (docs/ARCHITECTURE.md).
    plain_listings: bool = False
    # The kernel's writeback cache (`-o writeback=1`): writes gather in the page cache and
    # reach the daemon as page runs at writeback, fsync or close (docs/ARCHITECTURE.md).
    writeback_cache: bool = False
    # FUSE passthrough (`-o passthrough=on`; libfuse >= 3.17, root): the kernel reads and
    # writes the backing files itself (docs/ARCHITECTURE.md says when).
    passthrough: bool = False
    # Poll /dev/fuse for a moment after each reply before sleeping (`-o request_poll=on`, the
    # default; `cowfs.request_wait`): on with more than one CPU.
    request_poll: bool = True
    # Refresh by itself what changes in the lower layers (`-o watch`: inotify, `cowfs.watch`).
    watch: bool = False

    def as_options(self, stack: LayerStack) -> list[str]:
        """The `-o` options of the mount with *stack*, as `cowfs list` shows them."""
        shown = ["ro" if self.readonly else "rw", f"fsname={self.fsname}", f"fsync={self.fsync}",
                 *sorted(self.kernel_flags), *stack.format.as_options(),
                 f"kernel_caches={'on' if self.kernel_caches else 'off'}",
                 f"readdirplus={'auto' if self.plain_listings else 'yes'}",
                 f"writeback={int(self.writeback_cache)}",
                 f"passthrough={'on' if self.passthrough else 'off'}",
                 f"request_poll={'on' if self.request_poll else 'off'}"]
        if stack.xattr_prefix.startswith("user."):
            shown.append("userxattr")
        if self.watch:
            shown.append("watch")
        for name, mapping in (("uidmapping", self.uids), ("gidmapping", self.gids)):
            if mapping.ranges:
                shown.append(f"{name}=" + ":".join(f"{disk}:{view}:{count}"
                                                   for disk, view, count in mapping.ranges))
            if mapping.squash is not None:
                shown.append(f"squash_to_{name[:3]}={mapping.squash}")
        return shown

    def conflict(self) -> str | None:
        """Why these options cannot mount together, if they cannot."""
        if self.passthrough and self.writeback_cache:
            return ("mount options 'passthrough=on' and 'writeback=1' exclude each other: the "
                    "kernel has no passthrough under the writeback cache")
        return None


def serve(stack: LayerStack, mountpoint: str, options: MountOptions,
          on_mounted: Callable[[], None] | None = None) -> None:
    """Mount and answer requests in this process until unmounted or signalled; the unmount
    makes the changes durable."""
    from cowfs import fuse_extensions
    # before pyfuse3 is imported
    fuse_extensions.load(enabled=options.kernel_caches, plain_listings=options.plain_listings,
                         passthrough=options.passthrough and os.geteuid() == 0)
    from cowfs import mount, union
    _raise_fd_limit()
    os.umask(0)   # the kernel applies the caller's umask before asking us
    merged = union.Union(stack, fsync=options.fsync)
    try:
        operations = mount.Operations(merged, options.uids, options.gids,
                                      writeback_cache=options.writeback_cache,
                                      request_poll=options.request_poll)
        operations.mountpoint = os.path.realpath(mountpoint)
        operations.options = options.as_options(stack)
        operations.watch_lowers = options.watch
        fuse_options = mount.fuse_options(readonly=options.readonly, fsname=options.fsname)
        mount.run(operations, mountpoint, fuse_options | options.kernel_flags,
                  on_mounted or (lambda: None))
    finally:
        merged.close()


def start(stack: LayerStack, mountpoint: str, options: MountOptions,
          log_file: str | None = None, meanwhile: Callable[[], None] | None = None) -> int:
    """Fork a daemon serving *stack* at *mountpoint*; its pid once the mount is live.

    The stack's fds go to the daemon and are closed here. Fork only from a process with one
    thread (a forked copy of a threaded process can deadlock on locks the others held).
    *meanwhile* runs here while the daemon starts (it imports pyfuse3 and trio, ~100 ms).
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            code = _daemon(stack, mountpoint, write_end, options, log_file)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_end)
    stack.close()
    if meanwhile is not None:
        meanwhile()
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read()
    if report == b"ready":
        return pid
    os.waitpid(pid, 0)
    raise DaemonError(report.decode(errors="replace").strip()
                      or "the daemon died before mounting")


def _daemon(stack: LayerStack, mountpoint: str, report_fd: int, options: MountOptions,
            log_file: str | None) -> int:
    # The caller's handlers and fds are not the daemon's: a caller's pipe kept open here would
    # never see EOF, and its signal handlers would run in the wrong process.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    _close_fds_except({0, 1, 2, report_fd, *stack.fds()})
    os.setsid()
    # A fork carries its caller's command line: `ps` and `pkill -f` would take the daemon for
    # the `cowfs run ... CMD` that started it.
    setproctitle.setproctitle(daemon_title(mountpoint))
    with os.fdopen(report_fd, "wb", buffering=0) as report:
        def mounted() -> None:
            # podman waits for EOF on our stderr too: no fd of the caller's may stay open.
            _detach_stdio(log_file)
            report.write(b"ready")
            report.close()
        try:
            serve(stack, mountpoint, options, on_mounted=mounted)
        except BaseException as exc:
            if not report.closed:
                report.write(str(exc).encode())
                return 1
            log.exception("daemon failed")
            return 1
    return 0


def _close_fds_except(kept: set[int]) -> None:
    low = 0
    for fd in sorted(kept):
        if low < fd:       # closerange(n, n) would close everything from n up
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def _detach_stdio(log_file: str | None) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    target = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600) if log_file \
        else null
    os.dup2(null, 0)
    os.dup2(target, 1)
    os.dup2(target, 2)
    for fd in {null, target}:
        os.close(fd)


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
