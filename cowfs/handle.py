"""Mount a stack from Python and get a handle that unmounts on exit: sync and trio flavours.

    with cowfs.mounted(["/layers/app", "/layers/base"], "/srv/merged", upper="/srv/upper"):
        ...                                     # the merged tree is live here

    async with cowfs.open_mounted(["/layers/app"], "/srv/merged") as mount:   # under trio
        ...

The daemon serves in the background, in the host's namespaces, as `cowfs mount` would start it:
forked from this process when that is safe (one thread), else started as `cowfs mount` (a
threaded process, or any trio program: a fork would carry trio's run state into the daemon).
"""

import contextlib
import dataclasses
import json
import os
import select
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

from cowfs import control, daemon, durability
from cowfs.fuse_extensions import KernelFeatures
from cowfs.idmap import IdMap
from cowfs.layers import (
    format_lowerdirs,
    open_stack,
    read_mountinfo,
    unmount,
)
from cowfs.whiteout import FormatOptions

UNMOUNT_TIMEOUT_S = 30.0
DEFAULT_FORMAT = FormatOptions()


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """What the kernel does for the mount beyond plain FUSE, and how the daemon waits for it
    (docs/ARCHITECTURE.md says what each costs and gains), as `cowfs mount -o` spells them."""

    caches: bool = True             # cached listings and symlinks, the extra operations
    plain_listings: bool = False    # readdirplus=auto: plain READDIR where no stat follows
    writeback: bool = False         # writeback=1: writes gather in the kernel's page cache
    passthrough: bool = False       # passthrough=on: libfuse >= 3.17 and root, else ignored
    request_poll: bool = True       # request_poll=on: after a reply, poll for the next request

    def as_options(self) -> list[str]:
        return [f"kernel_caches={'on' if self.caches else 'off'}",
                f"readdirplus={'auto' if self.plain_listings else 'yes'}",
                f"writeback={int(self.writeback)}",
                f"passthrough={'on' if self.passthrough else 'off'}",
                f"request_poll={'on' if self.request_poll else 'off'}"]


DEFAULT_KERNEL = KernelOptions()


class MountError(Exception):
    """The stack could not be mounted; the message says why in one line."""

    def __init__(self, message: str, exit_code: int = 32) -> None:
        super().__init__(message)
        self.exit_code = exit_code     # as `cowfs mount` exits: 2 for bad input, 32 otherwise


@dataclasses.dataclass
class Mounted:
    """A live mount: where it is, and the daemon serving it (if this process forked it)."""

    path: str
    daemon_pid: int | None = None

    def statistics(self) -> dict[str, object]:
        """Copy-up counts and times (root only: a trusted.* xattr)."""
        return json.loads(os.getxattr(self.path, "trusted.cowfs.stats"))

    def kernel_features(self) -> KernelFeatures:
        """Which kernel caches beyond pyfuse3's the mount uses, and why not if not (root only,
        as `statistics`)."""
        return KernelFeatures.from_dict(self.statistics()["kernel_features"])  # type: ignore[arg-type]

    def stats(self) -> dict[str, object]:
        """What `cowfs stats` shows: layers, options, daemon pid, copy-up statistics (asked of
        the daemon on its control socket, so for its user and root)."""
        return control.describe(control.find_mount(self.path))

    def refresh(self, paths: Sequence[str] | None = None) -> dict[str, object]:
        """A lower layer changed behind the mount: drop what cowfs and the kernel cached of
        *paths* (in the merged view or relative to it; None: everything)."""
        mount = control.find_mount(self.path)
        relative = None if paths is None else [control.relative_path(mount, path)
                                               for path in paths]
        return control.request(mount, {"command": "refresh", "paths": relative})

    def add_layer(self, directory: str, *, above: str | None = None, bottom: bool = False
                  ) -> None:
        """Stack *directory* as a lower layer: on top of the lowers, *above* one, or at the
        *bottom*; every later lookup sees it."""
        message: dict[str, object] = {"command": "add_layer",
                                      "path": os.path.realpath(directory),
                                      "position": "above" if above else
                                      "bottom" if bottom else "top"}
        if above:
            message["anchor"] = os.path.realpath(above)
        control.request(control.find_mount(self.path), message)

    def remove_layer(self, layer: str) -> None:
        """Take the lower layer *layer* out; ControlError if something still needs it."""
        control.request(control.find_mount(self.path),
                        {"command": "remove_layer", "path": os.path.realpath(layer)})

    def is_live(self) -> bool:
        return any(mount.mountpoint == self.path and mount.fstype == "fuse.cowfs"
                   for mount in read_mountinfo())

    def unmount(self, *, lazy: bool = False) -> None:
        """Unmount and wait for the daemon to end (its exit, 2-4 ms, included: when this
        returns, nothing of the mount is left in the caller's cgroup); lazily: detach now, and
        let the daemon end when the last user lets go. Raises OSError if busy and not lazy."""
        known = self.daemon_pid
        if self.is_live():
            # A daemon of ours is waited for by its pid: no search of /proc for it (1 ms).
            unmount(self.path, lazy=lazy, wait=known is None)
        if known is not None:
            if lazy:
                _ending.add(known)
            else:
                _wait_for(known)
            self.daemon_pid = None
        _reap_ended()


def mounts() -> list[Mounted]:
    """Every live cowfs mount of this mount namespace, whoever mounted it."""
    return [Mounted(mount.mountpoint) for mount in control.live_mounts()]


@contextlib.contextmanager
def mounted(lowers: Sequence[str], mountpoint: str, *, upper: str | None = None,
            workdir: str | None = None, fsync: str = durability.BATCH,
            uidmapping: Sequence[tuple[int, int, int]] = (),
            gidmapping: Sequence[tuple[int, int, int]] = (),
            format_options: FormatOptions = DEFAULT_FORMAT,
            kernel: KernelOptions = DEFAULT_KERNEL) -> Iterator[Mounted]:
    """Mount *lowers* (topmost first) with an optional writable *upper* at *mountpoint*.

    *uidmapping*/*gidmapping* are (disk id, view id, count) triples (`cowfs.idmap`);
    *format_options* the kernel's metacopy=, redirect_dir= and index= (`FormatOptions`);
    *kernel* the kernel features asked for (`KernelOptions`). Raises MountError or LayoutError
    before anything is mounted; unmounts on exit.
    """
    handle = mount_stack(lowers, mountpoint, upper=upper, workdir=workdir, fsync=fsync,
                         uidmapping=tuple(uidmapping), gidmapping=tuple(gidmapping),
                         format_options=format_options, kernel=kernel)
    try:
        yield handle
    finally:
        handle.unmount()


@contextlib.asynccontextmanager
async def open_mounted(lowers: Sequence[str], mountpoint: str, *, upper: str | None = None,
                       workdir: str | None = None, fsync: str = durability.BATCH,
                       uidmapping: Sequence[tuple[int, int, int]] = (),
                       gidmapping: Sequence[tuple[int, int, int]] = (),
                       format_options: FormatOptions = DEFAULT_FORMAT,
                       kernel: KernelOptions = DEFAULT_KERNEL) -> AsyncIterator[Mounted]:
    """`mounted` for trio programs: the mount and unmount wait without blocking the loop."""
    import trio
    command = _mount_command(lowers, mountpoint, upper=upper, workdir=workdir, fsync=fsync,
                             uidmapping=tuple(uidmapping), gidmapping=tuple(gidmapping),
                             format_options=format_options, kernel=kernel)
    result = await trio.run_process(command, capture_stderr=True, check=False,
                                    stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise MountError(result.stderr.decode(errors="replace").strip().removeprefix("cowfs: "),
                         result.returncode)
    handle = Mounted(os.path.realpath(mountpoint))
    try:
        yield handle
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(handle.unmount)


def mount_stack(lowers: Sequence[str], mountpoint: str, *, upper: str | None = None,
                workdir: str | None = None, fsync: str = durability.BATCH,
                uidmapping: tuple[tuple[int, int, int], ...] = (),
                gidmapping: tuple[tuple[int, int, int], ...] = (),
                format_options: FormatOptions = DEFAULT_FORMAT,
                kernel: KernelOptions = DEFAULT_KERNEL,
                while_starting: Callable[[], None] | None = None) -> Mounted:
    """`mounted` without the `with`: the caller unmounts the handle it gets.

    *while_starting* runs in this process while a forked daemon starts up (not at all when
    the daemon is started as a command).
    """
    _reap_ended()
    if fsync not in durability.MODES:
        raise MountError(f"fsync must be one of {', '.join(durability.MODES)}, not {fsync!r}", 2)
    options = daemon.MountOptions(readonly=upper is None, fsync=fsync,
                                  uids=IdMap(uidmapping), gids=IdMap(gidmapping),
                                  kernel_caches=kernel.caches,
                                  plain_listings=kernel.plain_listings,
                                  writeback_cache=kernel.writeback,
                                  passthrough=kernel.passthrough,
                                  request_poll=kernel.request_poll)
    if conflict := options.conflict():
        raise MountError(conflict, 2)
    if threading.active_count() > 1:
        command = _mount_command(lowers, mountpoint, upper=upper, workdir=workdir, fsync=fsync,
                                 uidmapping=uidmapping, gidmapping=gidmapping,
                                 format_options=format_options, kernel=kernel)
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                text=True, check=False)
        if result.returncode != 0:
            raise MountError(result.stderr.strip().removeprefix("cowfs: "), result.returncode)
        return Mounted(os.path.realpath(mountpoint))
    stack = open_stack(list(lowers), upper, workdir, mountpoint=mountpoint,
                       format_options=format_options)
    path = os.path.realpath(mountpoint)
    try:
        return Mounted(path, daemon.start(stack, path, options, meanwhile=while_starting))
    except daemon.DaemonError as exc:
        raise MountError(f"cannot mount {mountpoint}: {exc}") from None


def _mount_command(lowers: Sequence[str], mountpoint: str, *, upper: str | None,
                   workdir: str | None, fsync: str,
                   uidmapping: tuple[tuple[int, int, int], ...],
                   gidmapping: tuple[tuple[int, int, int], ...],
                   format_options: FormatOptions, kernel: KernelOptions) -> list[str]:
    lowerdir = format_lowerdirs(list(lowers))
    options = [f"fsync={fsync}", *format_options.as_options(), *kernel.as_options()]
    for name, triples in (("uidmapping", uidmapping), ("gidmapping", gidmapping)):
        if triples:
            options.append(f"{name}=" + ":".join(f"{disk}:{view}:{count}"
                                                 for disk, view, count in triples))
    command = [sys.executable, "-m", "cowfs", "mount", "-o", ",".join(options)]
    if workdir:
        command += ["--workdir", workdir]
    return [*command, lowerdir, *([upper] if upper else []), mountpoint]


def _wait_for(pid: int) -> None:
    """Reap a forked daemon once its unmount has ended it."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ended, _, _ = select.select([pidfd], [], [], UNMOUNT_TIMEOUT_S)
    finally:
        os.close(pidfd)
    if not ended:
        raise TimeoutError(f"the daemon {pid} did not end after its unmount")
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


# Daemons of ours unmounted lazily: reaped once ended, so none stays a zombie.
_ending: set[int] = set()


def _reap_ended() -> None:
    for pid in list(_ending):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            _ending.discard(pid)
