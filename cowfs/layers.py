"""The layer stack: parse the layer list, validate the layout, open each layer root once.

Every later access goes through the root fds opened here, so a layer path that changes after the
mount (a symlink re-pointed, a detached mount) does not change what cowfs serves.
"""

import dataclasses
import fcntl
import logging
import os
import shutil
import subprocess

from cowfs import _at, _libc, whiteout

log = logging.getLogger(__name__)


class LayoutError(ValueError):
    """A layer stack or mount point that cannot be mounted; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class Layer:
    path: str          # as resolved when opened, for messages and mountinfo
    fd: int            # O_PATH fd on the layer root, held for the stack's lifetime
    st_dev: int
    st_ino: int
    writable: bool


# cowfs's own part of the workdir; the kernel's overlayfs uses work/ and index/ beside it.
WORKDIR_SUBDIR = "cowfs"
STAGING_DIR = "staging"   # half-made copy-ups, whiteouts and directories, renamed into place
INDEX_DIR = "index"       # a link to the upper copy of each lower file with several names
# The kernel's marker of an unclean volatile mount: its workdir must not be reused as it is.
KERNEL_VOLATILE_MARKER = ("work", "incompat", "volatile")


@dataclasses.dataclass
class Workdir:
    """Where changes are prepared before they appear in the upper, on the upper's filesystem."""

    path: str
    staging_fd: int          # O_PATH fd of WORKDIR/cowfs/staging
    index_fd: int            # O_PATH fd of WORKDIR/cowfs/index
    lock_fds: list[int]      # flock()ed: the workdir and the upper belong to this mount alone

    def close(self) -> None:
        for fd in (self.staging_fd, self.index_fd, *self.lock_fds):
            os.close(fd)


@dataclasses.dataclass
class LayerStack:
    """Layers top first: the upper (if any), then the lowers as given (leftmost on top)."""

    layers: list[Layer]
    upper: Layer | None
    work: Workdir | None = None
    # Where overlay xattrs are written: `trusted.overlay.` or `user.overlay.` (userxattr).
    xattr_prefix: str = dataclasses.field(default_factory=whiteout.default_xattr_prefix)
    # The kernel overlay's metacopy=, redirect_dir= and index=: how the format is read/written.
    format: whiteout.FormatOptions = dataclasses.field(default_factory=whiteout.FormatOptions)

    @property
    def lowers(self) -> list[Layer]:
        return self.layers[1:] if self.upper else self.layers

    @property
    def top(self) -> Layer:
        return self.layers[0]

    def fds(self) -> list[int]:
        """Every fd the stack holds: a forked daemon keeps these and closes the rest."""
        fds = [layer.fd for layer in self.layers]
        if self.work is not None:
            fds += [self.work.staging_fd, self.work.index_fd, *self.work.lock_fds]
        return fds

    def close(self) -> None:
        for layer in self.layers:
            os.close(layer.fd)
        self.layers = []
        if self.work is not None:
            self.work.close()
            self.work = None


def split_escaped(spec: str, separator: str) -> list[str]:
    r"""Split at *separator*; a backslash makes the next character literal (`\:` is a colon)."""
    parts: list[str] = []
    current: list[str] = []
    characters = iter(spec)
    for character in characters:
        if character == "\\":
            current.append(next(characters, "\\"))
        elif character == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(character)
    parts.append("".join(current))
    return parts


def format_lowerdirs(paths: list[str]) -> str:
    r"""`parse_lowerdirs` the other way: paths joined by `:`, each `\` and `:` escaped."""
    return ":".join(path.replace("\\", "\\\\").replace(":", "\\:") for path in paths)


def parse_lowerdirs(spec: str) -> list[str]:
    """`a:b:c` as a list of lower layer paths, top first."""
    lowers = split_escaped(spec, ":")
    if any(not path for path in lowers):
        raise LayoutError(f"empty layer path in lower layer list {spec!r}")
    return lowers


def default_workdir(upper: str) -> str:
    """A hidden sibling of the upper: on its filesystem, and outside every layer."""
    parent, name = os.path.split(os.path.realpath(upper))
    return os.path.join(parent, f".{name}.cowfs-work")


def open_stack(lowers: list[str], upper: str | None = None, workdir: str | None = None, *,
               userxattr: bool = False, mountpoint: str | None = None,
               nonempty: bool = False,
               format_options: whiteout.FormatOptions | None = None) -> LayerStack:
    """Open and validate a stack; raises LayoutError naming the first problem found.

    Everything is checked before anything is made, so a refused stack leaves the filesystem as
    it was; with *mountpoint* that includes where the merged view goes (`check_mountpoint`,
    also against the workdir). Only then, with an upper, is the workdir made when missing,
    locked for this stack alone and its staging area swept of what an earlier mount left.
    """
    if not lowers:
        raise LayoutError("at least one lower layer is needed")
    if workdir is not None and upper is None:
        raise LayoutError("a workdir needs an upper layer")
    named = ([("upper layer", upper)] if upper is not None else []) + [
        ("lower layer", path) for path in lowers
    ]
    stack = LayerStack(layers=[], upper=None)
    if format_options is not None:
        stack.format = format_options
    if userxattr:
        stack.xattr_prefix = whiteout.OVERLAY_XATTR_PREFIXES[1]
    try:
        for role, path in named:
            stack.layers.append(_open_layer(role, path, writable=role == "upper layer"))
        places = _layer_places(stack)
        planned = None
        if upper is not None:
            stack.upper = stack.layers[0]
            planned = _plan_workdir(workdir or default_workdir(upper))
            places.append(planned)
        _check_disjoint(places)
        if stack.upper is not None and planned is not None:
            _check_workdir(planned, stack.upper)
        if mountpoint is not None:
            _check_mountpoint(places, mountpoint, nonempty=nonempty)
        if stack.upper is not None and planned is not None:    # all checked: now make it
            stack.work = _open_workdir(planned.path, stack.upper)
    except BaseException:
        stack.close()
        raise
    return stack


def open_added_layer(stack: LayerStack, path: str, mountpoint: str) -> Layer:
    """Open *path* as a new lower layer of a live stack, checked as `open_stack` checks a
    layer (nothing of it may be, or be inside, another layer, the workdir or the merged
    view); the caller owns the fd. It stats the merged view: never call it on the thread
    that serves the mount."""
    layer = _open_layer("lower layer", path, writable=False)
    try:
        places = _layer_places(stack)
        if stack.work is not None:
            places.append(_Place("workdir", stack.work.path, _ancestry(stack.work.path)))
        places.append(_Place("mount point", mountpoint, _ancestry(mountpoint)))
        _check_disjoint([*places, _Place("lower layer", layer.path, _ancestry(layer.path))])
    except BaseException:
        os.close(layer.fd)
        raise
    return layer


@dataclasses.dataclass(frozen=True)
class _Place:
    """A layer or the workdir as the layout checks see it."""

    role: str
    path: str
    # (st_dev, st_ino) of the path, then of each parent up to /; None first for a workdir
    # not made yet, which is judged by where it would be.
    ancestry: tuple[tuple[int, int] | None, ...]


def _layer_places(stack: LayerStack) -> list[_Place]:
    return [_Place("upper layer" if layer.writable else "lower layer", layer.path,
                   _ancestry(layer.path)) for layer in stack.layers]


def _plan_workdir(workdir: str) -> _Place:
    """The workdir, made or not: one that is missing needs a parent to be made in."""
    if os.path.lexists(workdir) and not os.path.isdir(workdir):
        raise LayoutError(f"workdir {workdir} is not a directory")
    resolved = os.path.realpath(workdir)
    if os.path.isdir(resolved):
        return _Place("workdir", workdir, _ancestry(resolved))
    parent = os.path.dirname(resolved)
    if not os.path.isdir(parent):
        raise LayoutError(f"workdir {workdir} cannot be created: its parent does not exist")
    return _Place("workdir", workdir, (None, *_ancestry(parent)))


def _check_workdir(workdir: _Place, upper: Layer) -> None:
    """Renames from the workdir into the upper need one filesystem; a kernel's unclean
    volatile session must not be taken for a clean one."""
    st_dev, _ = next(identity for identity in workdir.ancestry if identity is not None)
    if st_dev != upper.st_dev:
        raise LayoutError(f"workdir {workdir.path} is not on the same filesystem as upper "
                          f"layer {upper.path}")
    marker = os.path.join(os.path.realpath(workdir.path), *KERNEL_VOLATILE_MARKER)
    if os.path.lexists(marker):
        raise LayoutError(f"workdir {workdir.path} holds an unclean volatile overlay session: "
                          f"delete {os.path.join(workdir.path, *KERNEL_VOLATILE_MARKER)} to "
                          f"discard it")


def _lock(path: str, role: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LayoutError(f"{role} {path} is in use by another mount") from None
    return fd


def _open_workdir(workdir: str, upper: Layer) -> Workdir:
    """Lock the upper, make the workdir if missing, lock it, give staging a clean start.

    The upper is locked first, so a mount refused for sharing it makes no workdir; a workdir
    made here goes again if a later step fails.
    """
    resolved = os.path.realpath(workdir)
    lock_fds = [_lock(upper.path, "upper layer")]
    made = False
    try:
        if not os.path.isdir(resolved):
            try:
                os.mkdir(resolved, 0o700)
            except OSError as exc:
                raise LayoutError(f"workdir {workdir} cannot be created: {exc.strerror}") \
                    from None
            made = True
        lock_fds.append(_lock(resolved, "workdir"))
        own = os.path.join(resolved, WORKDIR_SUBDIR)
        os.makedirs(own, mode=0o700, exist_ok=True)
        _sweep_staging(os.path.join(own, STAGING_DIR))
        os.makedirs(os.path.join(own, INDEX_DIR), mode=0o700, exist_ok=True)
        flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        staging_fd = os.open(os.path.join(own, STAGING_DIR), flags)
        index_fd = os.open(os.path.join(own, INDEX_DIR), flags)
    except BaseException:
        for fd in lock_fds:
            os.close(fd)
        if made:
            shutil.rmtree(resolved, ignore_errors=True)
        raise
    return Workdir(path=resolved, staging_fd=staging_fd, index_fd=index_fd, lock_fds=lock_fds)


def _sweep_staging(staging: str) -> None:
    """What is in staging was half-made by a mount that ended without finishing it."""
    try:
        leftovers = os.listdir(staging)
    except FileNotFoundError:
        leftovers = []
    if leftovers:
        log.info("sweeping what an earlier mount left in %s (%d entries)", staging,
                 len(leftovers))
        shutil.rmtree(staging)
    os.makedirs(staging, mode=0o700, exist_ok=True)


def _open_layer(role: str, path: str, *, writable: bool) -> Layer:
    resolved = os.path.realpath(path)
    try:
        fd = os.open(resolved, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LayoutError(f"{role} {path} does not exist") from None
    except NotADirectoryError:
        raise LayoutError(f"{role} {path} is not a directory") from None
    except OSError as exc:
        raise LayoutError(f"{role} {path} cannot be opened: {exc.strerror}") from None
    st = os.fstat(fd)
    if writable and not os.access(_at.fd_path(fd), os.W_OK, effective_ids=True):
        os.close(fd)
        raise LayoutError(f"{role} {path} is not writable")
    return Layer(path=resolved, fd=fd, st_dev=st.st_dev, st_ino=st.st_ino, writable=writable)


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _ancestry(path: str) -> tuple[tuple[int, int], ...]:
    """(st_dev, st_ino) of *path* and each of its parents up to /, nearest first."""
    chain = []
    current = os.path.realpath(path)
    while True:
        chain.append(_identity(current))
        parent = os.path.dirname(current)
        if parent == current:
            return tuple(chain)
        current = parent


def _check_disjoint(places: list[_Place]) -> None:
    """No path may be another, or lie inside another: a layer would then see itself."""
    for index, place in enumerate(places):
        for other_index, other in enumerate(places):
            identity = other.ancestry[0]
            if other_index == index or identity is None:   # nothing is inside what is not
                continue
            if place.ancestry[0] == identity and other_index < index:
                raise LayoutError(f"{place.role} {place.path} is given twice (also as "
                                  f"{other.role} {other.path})")
            if identity in place.ancestry[1:]:
                raise LayoutError(f"{place.role} {place.path} is inside {other.role} "
                                  f"{other.path}")


@dataclasses.dataclass(frozen=True)
class MountInfo:
    device: str       # major:minor
    mountpoint: str
    fstype: str


def read_mountinfo() -> list[MountInfo]:
    """The mounts of this mount namespace (proc(5), /proc/self/mountinfo)."""
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            separator = fields.index("-")
            mounts.append(MountInfo(device=fields[2], mountpoint=_unescape_mountinfo(fields[4]),
                                    fstype=fields[separator + 1]))
    return mounts


def _unescape_mountinfo(field: str) -> str:
    r"""mountinfo writes space, tab, newline and backslash as octal escapes (\040)."""
    if "\\" not in field:
        return field
    raw = field.encode("utf-8", "surrogateescape")
    out = bytearray()
    index = 0
    while index < len(raw):
        if raw[index] == 0x5C and raw[index + 1:index + 4].isdigit() and index + 4 <= len(raw):
            out.append(int(raw[index + 1:index + 4], 8))
            index += 4
        else:
            out.append(raw[index])
            index += 1
    return out.decode("utf-8", "surrogateescape")


def check_mountpoint(stack: LayerStack, mountpoint: str, *, nonempty: bool = False) -> str:
    """Validate where the merged view of an open stack goes; returns its resolved path.

    A mount checks before its workdir is made: `open_stack(..., mountpoint=)`.
    """
    places = _layer_places(stack)
    if stack.work is not None:
        places.append(_Place("workdir", stack.work.path, _ancestry(stack.work.path)))
    return _check_mountpoint(places, mountpoint, nonempty=nonempty)


def _check_mountpoint(places: list[_Place], mountpoint: str, *, nonempty: bool) -> str:
    resolved = os.path.realpath(mountpoint)
    if not os.path.exists(resolved):
        raise LayoutError(f"mount point {mountpoint} does not exist")
    if not os.path.isdir(resolved):
        raise LayoutError(f"mount point {mountpoint} is not a directory")
    if any(mount.mountpoint == resolved for mount in read_mountinfo()):
        raise LayoutError(f"mount point {mountpoint} is busy: something is mounted there")
    mount_ancestry = _ancestry(resolved)
    for place in places:
        if place.ancestry[0] == mount_ancestry[0]:
            raise LayoutError(f"mount point {mountpoint} is {place.role} {place.path}")
        if place.ancestry[0] in mount_ancestry[1:]:
            raise LayoutError(f"mount point {mountpoint} is inside {place.role} {place.path}")
        if mount_ancestry[0] in place.ancestry[1:]:
            raise LayoutError(f"{place.role} {place.path} is inside mount point {mountpoint}")
    if not nonempty and os.listdir(resolved):
        raise LayoutError(f"mount point {mountpoint} is not empty (-o nonempty mounts over it)")
    return resolved


def unmount(mountpoint: str, *, lazy: bool = False, wait: bool = True) -> None:
    """Unmount a FUSE mount: as root with umount2, else with `fusermount3 -u`, which may
    unmount what its caller mounted (a program less to start as root: 3 ms of each `cowfs
    run`); lazily: detach now, finish when no longer busy. Raises OSError with the reason.
    *wait* False: the caller waits for the daemon itself (the library's handle, by pid)."""
    resolved = os.path.realpath(mountpoint)
    daemons = [] if lazy or not wait else _daemon_pidfds(resolved)
    try:
        if os.geteuid() == 0:
            try:
                _libc.umount2(resolved, _libc.UMOUNT_NOFOLLOW | (_libc.MNT_DETACH if lazy else 0))
            except OSError as exc:
                raise OSError(os.strerror(exc.errno or 0)) from None
        else:
            command = ["fusermount3", "-u", *(["-z"] if lazy else []), mountpoint]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                lines = result.stderr.strip().splitlines()
                raise OSError(f"{lines[-1] if lines else 'fusermount3 failed'}")
        # As with the kernel's overlay, the upper is free once the unmount returns: wait for
        # the daemon, which holds its lock, to end (it does at once once unmounted).
        if daemons:
            import select
            select.select(daemons, [], [], DAEMON_EXIT_TIMEOUT)
    finally:
        for pidfd in daemons:
            os.close(pidfd)


DAEMON_EXIT_TIMEOUT = 5.0


def daemon_title(mountpoint: str) -> str:
    """What a mount's daemon calls itself in ps, and how an unmount finds it."""
    return f"cowfs daemon {mountpoint}"


def _daemon_pidfds(mountpoint: str) -> list[int]:
    """pidfds of this user's cowfs daemons that name themselves for *mountpoint*."""
    title = daemon_title(mountpoint).encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as cmdline:
                if cmdline.read().split(b"\0")[0] != title:
                    continue
            if os.stat(f"/proc/{name}").st_uid != os.geteuid():
                continue
            found.append(os.pidfd_open(int(name)))
        except OSError:
            continue
    return found
