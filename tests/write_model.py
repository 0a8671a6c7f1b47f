"""The write oracle's parts: small layer stacks, random file operations, tree snapshots.

test_write_oracle.py applies the same operations through two mounts of identical stacks (the
kernel's overlayfs and cowfs) and compares every call's result and the whole merged tree after
every step. Everything here is plain data and plain syscalls by path, so the two sides cannot
differ by anything but the filesystem under them.
"""

import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import hashlib
import os
import stat
import subprocess
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from conftest import unmount_quietly
from hypothesis import strategies as st
from layer_model import (
    USER_XATTRS,
    Dir,
    Fifo,
    File,
    HardLink,
    Node,
    Opacity,
    Stack,
    Symlink,
    Whiteout,
    read_all,
    user_xattrs,
    walk,
    write_stack,
)

# -- stacks: 2-3 small lower layers whose names collide ---------------------------------------

# Per directory level, the (min, max) names a directory draws its children from. Small pools
# make the same path turn up in several layers as different things.
POOL_SIZES = ((3, 5), (1, 3), (1, 2))
# Spaces and colons (the lowerdir separator), a comma (the option separator), non-ASCII.
LOWER_NAMES = ("a", "b", "a b", "c:d", "x:y z", " lead", "e,f", "ü", "d", "f")
# Names no lower layer has: the operations add them beside the pool names.
FRESH_NAMES = ("new", "n:w x")
# Names that would mark a whiteout or an opaque directory in a layer's OCI dialect: made
# through the mount, cowfs refuses them (EINVAL) where the kernel makes an ordinary file. The
# oracle never makes them (see marker_refusal).
MARKER_NAMES = (".wh.a", ".wh..wh..opq")
SYMLINK_TARGETS = ("/etc/passwd", "nowhere", "../a", "a b", "c:d/x", ".")
OWNERS = (0, 1000, 65534)
INTERESTING_MODES = (0o644, 0o755, 0o600, 0o444, 0o000, 0o4755, 0o2755, 0o6711, 0o1777)

# COWFS_WRITE_ORACLE_LOWER_HARD_LINKS=0 leaves them out of the stacks, so that a difference
# there does not hide all others while it is being fixed (test_lower_hard_links_stay_one_inode
# still covers them).
LOWER_HARD_LINKS = os.environ.get("COWFS_WRITE_ORACLE_LOWER_HARD_LINKS", "1") != "0"

# Every lower entry gets an mtime before this (deterministic, from its path), and so does
# every utime the operations make; nothing a filesystem stamps by itself is this old. An mtime
# this old on either side must be the same on the other: copy-up keeps it, a change replaces it.
DISTINCT_MTIME_BEFORE_NS = 946_684_800 * 10**9   # 2000-01-01

modes = st.one_of(st.sampled_from(INTERESTING_MODES), st.integers(0, 0o7777))
directory_modes = st.one_of(st.just(0o755), modes)
owners = st.sampled_from(OWNERS)
xattr_maps = st.dictionaries(st.sampled_from(USER_XATTRS), st.binary(max_size=6), max_size=2)
contents = st.one_of(
    st.binary(max_size=24),
    # Over a page: copy-up and writes cross page boundaries.
    st.tuples(st.binary(min_size=1, max_size=4), st.integers(1100, 2500)).map(
        lambda pattern_count: pattern_count[0] * pattern_count[1]),
)


@st.composite
def _leaf(draw: st.DrawFn, kind: str) -> Node:
    match kind:
        case "file":
            return File(draw(contents), draw(modes), draw(owners), draw(owners),
                        draw(xattr_maps))
        case "symlink":
            return Symlink(draw(st.sampled_from(SYMLINK_TARGETS)), draw(owners), draw(owners))
        case "fifo":
            return Fifo(draw(modes), draw(owners), draw(owners))
        case "whiteout":
            return Whiteout()
    raise ValueError(kind)


@st.composite
def _directory(draw: st.DrawFn, pools: list[list[str]], depth: int,
               opacities: list[Opacity]) -> Dir:
    directory = Dir(draw(directory_modes), draw(owners), draw(owners), draw(xattr_maps),
                    draw(st.sampled_from(opacities)))
    # Weighted by repetition: mostly files and directories (which merge across layers).
    kinds = ["file", "file", "file", "symlink", "fifo", "whiteout", "whiteout"]
    if depth + 1 < len(POOL_SIZES):
        kinds += ["dir"] * (5 if depth == 0 else 3)
    # No xattr whiteouts: in a directory that is not merged the kernel lists one as a file and
    # hides it from lookup only once it has met an opaque=x directory of that layer, so its
    # answers depend on history. The read oracle covers them where they are defined.
    # A layer root has at least three entries: a near-empty stack is seldom worth a sequence.
    for name in draw(st.lists(st.sampled_from(pools[depth]), unique=True,
                              min_size=3 if depth == 0 else 0)):
        kind = draw(st.sampled_from(kinds))
        if kind == "dir":
            directory.children[name] = draw(
                _directory(pools, depth + 1, ["", "", "", "", "y", "y", "x"]))
        else:
            directory.children[name] = draw(_leaf(kind))
    return directory


@st.composite
def _layer(draw: st.DrawFn, pools: list[list[str]], hard_links: bool) -> Dir:
    # The kernel ignores opaque=y on a layer root, so a root is never marked so.
    root = draw(_directory(pools, 0, ["", "", "x"]))
    entries = list(walk(root))
    files = ["/".join(path) for path, node in entries if isinstance(node, File)]
    directories = [(path, node) for path, node in entries if isinstance(node, Dir)]
    # A hard link in one layer of five; none is the simplest (hypothesis shrinks towards 0).
    if files and draw(st.integers(0, 4)) == 4:
        target = draw(st.sampled_from(files))
        path, directory = draw(st.sampled_from(directories))
        free = [name for name in pools[len(path)] if name not in directory.children]
        if free:
            name = draw(st.sampled_from(free))
            # Turned off, the same choices are drawn: saved examples still replay.
            if hard_links:
                directory.children[name] = HardLink(target)
    return root


@dataclasses.dataclass
class WriteStack:
    """The lower layers (top first) and the names the operations pick from."""

    lowers: Stack
    names: list[str]

    def __repr__(self) -> str:
        return self.lowers.describe()

    def _repr_pretty_(self, printer: object, cycle: bool) -> None:
        printer.text("\n" + self.lowers.describe())  # type: ignore[attr-defined]


@st.composite
def write_stacks(draw: st.DrawFn, *, lower_hard_links: bool = True) -> WriteStack:
    """2 or 3 lower layers over the same small pools of names."""
    pools = [draw(st.lists(st.sampled_from(LOWER_NAMES), min_size=low, max_size=high,
                           unique=True)) for low, high in POOL_SIZES]
    count = draw(st.integers(2, 3))
    hard_links = lower_hard_links and LOWER_HARD_LINKS
    lowers = Stack("kernel", [draw(_layer(pools, hard_links)) for _ in range(count)])
    names = list(dict.fromkeys(name for pool in pools for name in pool))
    return WriteStack(lowers, names + [name for name in FRESH_NAMES if name not in names])


def has_lower_hard_links(stack: WriteStack) -> bool:
    return any(isinstance(node, HardLink)
               for root in stack.lowers.layers for _, node in walk(root))


def lower_mtime_ns(layer: int, relative: str) -> int:
    """A distinct old mtime for each lower entry, the same for both copies of a stack."""
    seed = zlib.crc32(f"{layer}/{relative}".encode())
    return 500_000_000 * 10**9 + seed * 10**6 + seed % 10**6


def build_lowers(stack: WriteStack, base: Path) -> list[Path]:
    """Write the lower layers under *base* (top first), every entry with a distinct old mtime.

    Called once per side: both sides get the same stack, char-device whiteouts and
    trusted.overlay.* xattrs included, which copying a built tree would not preserve.
    """
    base.mkdir()
    layers = []
    for index, path in enumerate(write_stack(stack.lowers, base)):
        # Layer paths with a colon (lowerdir's separator), a comma and a space: both mount
        # commands must escape them.
        layers.append(path.rename(path.with_name(f"layer {index}:a,b")))
    for index, layer in enumerate(layers):
        paths = [os.path.join(directory, name)
                 for directory, subdirectories, files in os.walk(layer)
                 for name in [*subdirectories, *files]]
        # Deepest first (making the entries stamped their directory), in an order that does
        # not depend on readdir, since hard links share one mtime.
        for path in sorted(paths, key=lambda path: (-path.count("/"), path)):
            mtime = lower_mtime_ns(index, os.path.relpath(path, layer))
            os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
    return layers


# -- mounting the kernel's overlayfs with an upper ----------------------------------------------


def escape_layer_path(path: Path) -> str:
    return str(path).replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def _mount_kernel_overlay(options: list[str], merged: Path) -> Iterator[Path]:
    joined = ",".join(option for option in options if option)
    result = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", joined, str(merged)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"mount -t overlay -o {joined} {merged}: {result.stderr.strip()}")
    try:
        yield merged
    finally:
        unmount_quietly(merged)


@contextlib.contextmanager
def mounted_kernel_overlay(lowers: list[Path], upper: Path, workdir: Path, merged: Path, *,
                           options: str) -> Iterator[Path]:
    """The kernel's writable overlayfs with *options*; always unmounted (umount, then -l)."""
    yield from _mount_kernel_overlay([
        "lowerdir=" + ":".join(escape_layer_path(path) for path in lowers),
        f"upperdir={escape_layer_path(upper)}",
        f"workdir={escape_layer_path(workdir)}",
        options,
    ], merged)


@contextlib.contextmanager
def mounted_kernel_layers(layers: list[Path], merged: Path, *, options: str) -> Iterator[Path]:
    """The kernel's read-only overlayfs over *layers* (top first): an upper stacked as a lower."""
    yield from _mount_kernel_overlay(
        ["lowerdir=" + ":".join(escape_layer_path(path) for path in layers), options], merged)


# -- the merged tree as seen through the VFS -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Seen:
    """One entry of a mounted tree: what must be the same on both sides.

    Not compared: st_ino and st_dev, atime and ctime, directory sizes and link counts (all
    legitimately differ). mtime only when one side shows a distinct old stamp (see above).
    """

    mode: int
    uid: int
    gid: int
    size: int | None               # not of directories
    nlink: int | None              # not of directories
    mtime_ns: int
    content: bytes | None          # regular files
    target: str | None             # symlinks
    xattrs: tuple[tuple[str, bytes], ...]   # user.* only, sorted

    @property
    def is_directory(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def is_regular(self) -> bool:
        return stat.S_ISREG(self.mode)


Tree = dict[str, Seen]


def snapshot(root: Path) -> tuple[Tree, list[str]]:
    """Every entry under *root* by "/"-joined path ("" is the root), and the names readdir
    listed that a lookup then did not find.

    The kernel lists the whiteouts of a directory that exists in one layer only, and a
    whiteout in an upper directory with nothing below it, yet its lookup of those names fails:
    they are not in its tree. Symlinks are never followed; fifos are never opened.
    """
    tree: Tree = {}
    vanished: list[str] = []
    pending = [""]
    while pending:
        relative = pending.pop()
        path = os.path.join(root, relative) if relative else str(root)
        try:
            st_ = os.lstat(path)
        except FileNotFoundError:
            vanished.append(relative)
            continue
        is_directory = stat.S_ISDIR(st_.st_mode)
        tree[relative] = Seen(
            mode=st_.st_mode, uid=st_.st_uid, gid=st_.st_gid,
            size=None if is_directory else st_.st_size,
            nlink=None if is_directory else st_.st_nlink,
            mtime_ns=st_.st_mtime_ns,
            content=read_all(path) if stat.S_ISREG(st_.st_mode) else None,
            target=os.readlink(path) if stat.S_ISLNK(st_.st_mode) else None,
            xattrs=user_xattrs(path),
        )
        if is_directory:
            pending.extend(f"{relative}/{name}" if relative else name
                           for name in os.listdir(path))
    return tree, sorted(vanished)


def show(value: object) -> str:
    """A short form of a value for a failure message: long bytes as length and digest."""
    if isinstance(value, bytes) and len(value) > 48:
        return f"<{len(value)} bytes {value[:16]!r}... sha1 {hashlib.sha1(value).hexdigest()[:10]}>"
    if isinstance(value, tuple):
        return "(" + ", ".join(show(item) for item in value) + ")"
    return repr(value)


def tree_differences(expected: Tree, actual: Tree, *, expected_name: str,
                     actual_name: str) -> list[tuple[str, str]]:
    """(path, line) for each path missing, extra, or with a field that differs."""
    found = []
    for path in sorted(expected.keys() - actual.keys()):
        found.append((path, f"{path!r}: missing in {actual_name}: {expected_name} shows "
                            f"{expected[path]}"))
    for path in sorted(actual.keys() - expected.keys()):
        found.append((path, f"{path!r}: only {actual_name} shows it: {actual[path]}"))
    for path in sorted(expected.keys() & actual.keys()):
        want, got = expected[path], actual[path]
        for field in dataclasses.fields(Seen):
            if field.name == "mtime_ns" and (
                    want.mtime_ns >= DISTINCT_MTIME_BEFORE_NS
                    and got.mtime_ns >= DISTINCT_MTIME_BEFORE_NS):
                continue
            want_value, got_value = getattr(want, field.name), getattr(got, field.name)
            if want_value != got_value:
                if field.name == "mode":
                    want_value, got_value = f"{want_value:#o}", f"{got_value:#o}"
                else:
                    want_value, got_value = show(want_value), show(got_value)
                found.append((path, f"{path!r}: {field.name}: {expected_name} {want_value}, "
                                    f"{actual_name} {got_value}"))
    return found


# -- operations ---------------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc.renameat2.restype = ctypes.c_int
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_FLAGS = {0: "0", RENAME_NOREPLACE: "NOREPLACE", RENAME_EXCHANGE: "EXCHANGE"}


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) == -1:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error), old)


# Every open: never follow a symlink out of the mount, never block on a fifo.
OPEN_SAFE = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
OPEN_FLAG_NAMES = {os.O_EXCL: "O_EXCL", os.O_TRUNC: "O_TRUNC", os.O_APPEND: "O_APPEND", 0: "0"}
XATTR_FLAG_NAMES = {0: "0", os.XATTR_CREATE: "XATTR_CREATE", os.XATTR_REPLACE: "XATTR_REPLACE"}


def _write_all(fd: int, data: bytes, offset: int | None = None) -> int:
    written = 0
    while written < len(data):
        chunk = data[written:]
        count = (os.write(fd, chunk) if offset is None
                 else os.pwrite(fd, chunk, offset + written))
        if count == 0:
            break
        written += count
    return written


def _stat_summary(st_: os.stat_result) -> object:
    is_directory = stat.S_ISDIR(st_.st_mode)
    return (f"{st_.st_mode:#o}", st_.st_uid, st_.st_gid,
            None if is_directory else st_.st_size, None if is_directory else st_.st_nlink)


def op_stat(root: str, path: str) -> object:
    """lstat(2): a lookup after the changes (a stale cached entry or attribute shows here)."""
    return _stat_summary(os.lstat(os.path.join(root, path)))


def op_create(root: str, path: str, flags: int, mode: int, data: bytes) -> object:
    """open(O_CREAT | flags), write, close."""
    fd = os.open(os.path.join(root, path), os.O_WRONLY | os.O_CREAT | OPEN_SAFE | flags, mode)
    try:
        return _write_all(fd, data)
    finally:
        os.close(fd)


def op_write(root: str, path: str, flags: int, offset: int | None, data: bytes,
             sync: bool, read_back: bool) -> object:
    """open an existing name for write (O_TRUNC, O_APPEND, or pwrite at *offset*), write,
    fsync maybe, read the whole file back through the same fd maybe (regular files only)."""
    access = os.O_RDWR if read_back else os.O_WRONLY
    fd = os.open(os.path.join(root, path), access | OPEN_SAFE | flags)
    try:
        results: list[object] = [_write_all(fd, data, offset)]
        if sync:
            os.fsync(fd)
        if read_back:
            results.append(os.pread(fd, 1 << 20, 0))
        return tuple(results)
    finally:
        os.close(fd)


def op_ftruncate(root: str, path: str, size: int) -> object:
    fd = os.open(os.path.join(root, path), os.O_WRONLY | OPEN_SAFE)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return None


def op_truncate(root: str, path: str, size: int) -> object:
    """truncate(2) by path: it follows symlinks, so it is only drawn for non-symlinks."""
    os.truncate(os.path.join(root, path), size)
    return None


def op_chmod(root: str, path: str, mode: int) -> object:
    """chmod(2) follows symlinks (and Linux has no lchmod): only drawn for non-symlinks."""
    os.chmod(os.path.join(root, path), mode)
    return None


def op_chown(root: str, path: str, uid: int, gid: int) -> object:
    os.chown(os.path.join(root, path), uid, gid, follow_symlinks=False)
    return None


def op_utime(root: str, path: str, times_ns: tuple[int, int] | None) -> object:
    """utime(2) with both stamps to the ns, or None: now."""
    if times_ns is None:
        os.utime(os.path.join(root, path), follow_symlinks=False)
    else:
        os.utime(os.path.join(root, path), ns=times_ns, follow_symlinks=False)
    return None


def op_mknod(root: str, path: str, mode: int) -> object:
    os.mknod(os.path.join(root, path), stat.S_IFIFO | mode)
    return None


def op_mkdir(root: str, path: str, mode: int) -> object:
    os.mkdir(os.path.join(root, path), mode)
    return None


def op_symlink(root: str, target: str, path: str) -> object:
    os.symlink(target, os.path.join(root, path))
    return None


def op_link(root: str, source: str, path: str) -> object:
    os.link(os.path.join(root, source), os.path.join(root, path), follow_symlinks=False)
    return None


def op_unlink(root: str, path: str) -> object:
    os.unlink(os.path.join(root, path))
    return None


def op_rmdir(root: str, path: str) -> object:
    os.rmdir(os.path.join(root, path))
    return None


def op_rename(root: str, source: str, path: str, flags: int) -> object:
    renameat2(os.path.join(root, source), os.path.join(root, path), flags)
    return None


def op_setxattr(root: str, path: str, attribute: str, value: bytes, flags: int) -> object:
    os.setxattr(os.path.join(root, path), attribute, value, flags, follow_symlinks=False)
    return None


def op_removexattr(root: str, path: str, attribute: str) -> object:
    os.removexattr(os.path.join(root, path), attribute, follow_symlinks=False)
    return None


def op_forget(root: str) -> object:
    """Drop every unused dentry and inode (both mounts' and the system's): the next call looks
    its names up afresh, and cowfs gets FORGET for nodes the kernel no longer holds."""
    with open("/proc/sys/vm/drop_caches", "w") as control:
        control.write("2")
    return None


OPERATIONS: dict[str, Callable[..., object]] = {
    "stat": op_stat, "create": op_create, "write": op_write, "ftruncate": op_ftruncate,
    "truncate": op_truncate, "chmod": op_chmod, "chown": op_chown, "utime": op_utime,
    "mknod": op_mknod, "mkdir": op_mkdir, "symlink": op_symlink, "link": op_link,
    "unlink": op_unlink, "rmdir": op_rmdir, "rename": op_rename, "setxattr": op_setxattr,
    "removexattr": op_removexattr, "forget": op_forget,
}
# forget changes the caches of both mounts at once: the subject's call would do nothing new.
GLOBAL_OPERATIONS = {"forget"}


# -- descriptors held open across steps -----------------------------------------------------

SLOTS = 3
OPEN_MODES = {
    "read": os.O_RDONLY, "write": os.O_RDWR, "truncate": os.O_RDWR | os.O_TRUNC,
    "directory": os.O_RDONLY | os.O_DIRECTORY,
}


FILE_MODES = ("read", "write", "truncate")
WRITABLE_MODES = ("write", "truncate")


class Handles:
    """One side's descriptors that stay open across steps, by slot: unlink, rename and
    rename-over of their names must not change which file they reach."""

    def __init__(self) -> None:
        self.fds: dict[int, int] = {}
        self.modes: dict[int, str] = {}
        # The oracle's held directories seen with an upper copy (see cowfs_answer).
        self.upper_copies: set[int] = set()

    def note_upper_copies(self, merged: Path, upper: Path) -> None:
        """Before each call on the oracle: which held directories have an upper copy now."""
        for slot, fd in self.fds.items():
            if self.modes[slot] != "directory" or slot in self.upper_copies:
                continue
            path = os.readlink(f"/proc/self/fd/{fd}")
            if path.endswith(" (deleted)"):
                continue
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                if stat.S_ISDIR(os.lstat(upper / os.path.relpath(path, merged)).st_mode):
                    self.upper_copies.add(slot)

    def fd(self, slot: int) -> int:
        """The slot's descriptor: EBADF when nothing is open there."""
        if slot not in self.fds:
            raise OSError(errno.EBADF, "nothing open in this slot")
        return self.fds[slot]

    def close(self, slot: int) -> None:
        self.modes.pop(slot, None)
        self.upper_copies.discard(slot)
        fd = self.fds.pop(slot, None)
        if fd is not None:
            os.close(fd)

    def close_all(self) -> None:
        """Before the unmount: an open descriptor would keep the mount busy."""
        for slot in list(self.fds):
            self.close(slot)


def _seen_fd(fd: int) -> object:
    """What fstat(2) and the fd's xattrs show, compared as the trees' entries are.

    The link count of a file whose names are all gone is not compared: the kernel's overlay
    shows the count of what still links its copy (the lower file; its index entry, until the
    file is closed), cowfs the names left in the merged view (0), as a plain filesystem.
    """
    st_ = os.fstat(fd)
    is_directory = stat.S_ISDIR(st_.st_mode)
    nlink: object = None if is_directory else st_.st_nlink
    if not is_directory and os.readlink(f"/proc/self/fd/{fd}").endswith(" (deleted)"):
        nlink = "no names"
    xattrs = tuple((name, os.getxattr(fd, name))
                   for name in sorted(os.listxattr(fd)) if name.startswith("user."))
    return (f"{st_.st_mode:#o}", st_.st_uid, st_.st_gid,
            None if is_directory else st_.st_size, nlink,
            st_.st_mtime_ns if st_.st_mtime_ns < DISTINCT_MTIME_BEFORE_NS else "recent", xattrs)


def fd_open(handles: Handles, root: str, slot: int, path: str, how: str) -> object:
    """open(2) into *slot*, closing what was there (also when the open fails).

    A fifo is closed at once ("fifo"), never held: changed through a descriptor once its
    lower name is gone, the kernel's overlay copies it up to that name again, and the deleted
    fifo is back in the tree; cowfs answers EEXIST, as both do for a regular file.
    """
    handles.close(slot)
    fd = os.open(os.path.join(root, path), OPEN_MODES[how] | OPEN_SAFE)
    if stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        return "fifo"
    handles.fds[slot] = fd
    handles.modes[slot] = how
    return None


def fd_close(handles: Handles, root: str, slot: int) -> object:
    handles.fd(slot)
    handles.close(slot)
    return None


def fd_read(handles: Handles, root: str, slot: int, offset: int) -> object:
    return os.pread(handles.fd(slot), 1 << 20, offset)


def fd_write(handles: Handles, root: str, slot: int, offset: int, data: bytes) -> object:
    return _write_all(handles.fd(slot), data, offset)


def fd_stat(handles: Handles, root: str, slot: int) -> object:
    return _seen_fd(handles.fd(slot))


def fd_truncate(handles: Handles, root: str, slot: int, size: int) -> object:
    os.ftruncate(handles.fd(slot), size)
    return None


def fd_chmod(handles: Handles, root: str, slot: int, mode: int) -> object:
    os.fchmod(handles.fd(slot), mode)
    return None


def fd_chown(handles: Handles, root: str, slot: int, uid: int, gid: int) -> object:
    os.fchown(handles.fd(slot), uid, gid)
    return None


def fd_utime(handles: Handles, root: str, slot: int, times_ns: tuple[int, int] | None) -> object:
    if times_ns is None:
        os.utime(handles.fd(slot))
    else:
        os.utime(handles.fd(slot), ns=times_ns)
    return None


def fd_setxattr(handles: Handles, root: str, slot: int, attribute: str, value: bytes) -> object:
    os.setxattr(handles.fd(slot), attribute, value)
    return None


def fd_sync(handles: Handles, root: str, slot: int) -> object:
    os.fsync(handles.fd(slot))
    return None


def fd_list(handles: Handles, root: str, slot: int) -> object:
    """The names a held directory lists that its lookup finds (see snapshot: the kernel lists
    names it cannot look up), with what each is."""
    fd = handles.fd(slot)
    found = []
    for name in sorted(os.listdir(fd)):
        try:
            found.append((name, f"{os.lstat(name, dir_fd=fd).st_mode:#o}"))
        except FileNotFoundError:
            continue
    return tuple(found)


def fd_create(handles: Handles, root: str, slot: int, name: str, flags: int,
              data: bytes) -> object:
    """openat(2) O_CREAT in a held directory, wherever its names have gone since."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | OPEN_SAFE | flags, 0o640,
                 dir_fd=handles.fd(slot))
    try:
        return _write_all(fd, data)
    finally:
        os.close(fd)


def fd_lookup(handles: Handles, root: str, slot: int, name: str) -> object:
    """fstatat(2) of a name in a held directory."""
    return _stat_summary(os.lstat(name, dir_fd=handles.fd(slot)))


FD_OPERATIONS: dict[str, Callable[..., object]] = {
    "open": fd_open, "close": fd_close, "fd_read": fd_read, "fd_write": fd_write,
    "fd_stat": fd_stat, "fd_truncate": fd_truncate, "fd_chmod": fd_chmod,
    "fd_chown": fd_chown, "fd_utime": fd_utime, "fd_setxattr": fd_setxattr,
    "fd_sync": fd_sync, "fd_list": fd_list, "fd_create": fd_create, "fd_lookup": fd_lookup,
}


def _show_argument(name: str, value: object) -> str:
    if name == "flags" and isinstance(value, int):
        return OPEN_FLAG_NAMES.get(value, f"{value:#x}")
    if name == "mode" and isinstance(value, int):
        return f"{value:#o}"
    if name == "slot":
        return f"#{value}"
    return show(value)


@dataclasses.dataclass(frozen=True)
class Operation:
    """One call, by path relative to the mount root or by a held descriptor's slot, as the
    failure report shows it."""

    name: str
    arguments: tuple[object, ...]

    def __repr__(self) -> str:
        if self.name == "rename":
            source, path, flags = self.arguments
            return f"rename({source!r}, {path!r}, {RENAME_FLAGS[flags]})"  # type: ignore[index]
        if self.name == "setxattr":
            path, attribute, value, flags = self.arguments
            return (f"setxattr({path!r}, {attribute!r}, {show(value)}, "
                    f"{XATTR_FLAG_NAMES[flags]})")  # type: ignore[index]
        if self.name in FD_OPERATIONS:
            function, skipped = FD_OPERATIONS[self.name], 2
        else:
            function, skipped = OPERATIONS[self.name], 1
        names = function.__code__.co_varnames[skipped:function.__code__.co_argcount]
        shown = ", ".join(_show_argument(name, value)
                          for name, value in zip(names, self.arguments, strict=True))
        return f"{self.name}({shown})"

    def _repr_pretty_(self, printer: object, cycle: bool) -> None:
        """Hypothesis prints each drawn operation with this: as the call reads."""
        printer.text(repr(self))  # type: ignore[attr-defined]

    def new_name(self) -> str | None:
        """The name this call would make (a path, or a name in a held directory), if any."""
        match self.name:
            case "create" | "mkdir" | "mknod":
                return str(self.arguments[0])
            case "symlink" | "link" | "rename":
                return str(self.arguments[1])
            case "fd_create":
                return str(self.arguments[1])
        return None

    def makes_marker(self) -> bool:
        name = self.new_name()
        return name is not None and os.path.basename(name).startswith(".wh.")

    def apply(self, root: Path, handles: Handles) -> tuple[str, object]:
        """("ok", what the call returned) or ("error", the errno's name)."""
        try:
            if self.name in FD_OPERATIONS:
                return "ok", FD_OPERATIONS[self.name](handles, str(root), *self.arguments)
            return "ok", OPERATIONS[self.name](str(root), *self.arguments)
        except OSError as exc:
            return "error", errno.errorcode.get(exc.errno or 0, str(exc.errno))


# Changes through a descriptor; see cowfs_answer for those of removed lower directories.
FD_CHANGES = {"fd_chmod", "fd_chown", "fd_utime", "fd_setxattr"}


def cowfs_answer(operation: Operation, root: Path, handles: Handles, *,
                 writeback: bool = False) -> tuple[str, object] | None:
    """What cowfs must answer where it deliberately differs from the kernel, which the
    oracle then does not do; None for every other call. *writeback*: cowfs runs with the
    kernel's writeback cache.

    - A name that would be a marker (.wh.*): see marker_refusal.
    - A change through a held directory that was removed with no upper copy: cowfs answers
      ENOENT. The kernel copies it up to its old name: to what stands there now (a
      directory made since gets the change, while its own stat shows none; over a whiteout,
      ENOTDIR), a change that reaches another file.
    - setxattr with XATTR_REPLACE of an attribute the file lacks (ENODATA), or XATTR_CREATE
      of one it has (EEXIST): the FUSE kernel answers it from a getxattr and never sends
      the setxattr, so cowfs copies nothing up; the kernel's overlay copies the file up
      first (a metacopy, whose later data copy-up stamps mtime).
    - Under the writeback cache, truncate(2) by path of a file to the size it has: the FUSE
      kernel keeps the file's times (it stamps them only when the size changes), so cowfs
      changes nothing; the kernel's overlay copies the file up and its upper stamps mtime.
    """
    if writeback and operation.name == "truncate" and _keeps_size(operation, root):
        return "ok", None
    if operation.makes_marker():
        return marker_refusal(operation, root, handles)
    if operation.name == "setxattr" and operation.arguments[3]:
        return _xattr_flag_refusal(operation, root)
    if operation.name in FD_CHANGES:
        slot = operation.arguments[0]
        if isinstance(slot, int) and _removed_lower_directory(handles, slot):
            return "error", "ENOENT"
    return None


def _keeps_size(operation: Operation, root: Path) -> bool:
    path, size = operation.arguments
    try:
        st_ = os.stat(os.path.join(root, str(path)))
    except OSError:
        return False
    return stat.S_ISREG(st_.st_mode) and st_.st_size == size


def _xattr_flag_refusal(operation: Operation, root: Path) -> tuple[str, object] | None:
    path, attribute, _, flags = operation.arguments
    full = os.path.join(root, str(path))
    try:
        mode = os.lstat(full).st_mode
        if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            return None                      # no user.* xattrs: EPERM from the VFS, as both
        os.getxattr(full, str(attribute), follow_symlinks=False)
        exists = True
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            return None
        exists = False
    if flags == os.XATTR_REPLACE and not exists:
        return "error", "ENODATA"
    if flags == os.XATTR_CREATE and exists:
        return "error", "EEXIST"
    return None


def _removed_lower_directory(handles: Handles, slot: int) -> bool:
    """A held directory removed (its path says deleted) that never had an upper copy."""
    fd = handles.fds.get(slot)
    return (fd is not None and handles.modes[slot] == "directory"
            and slot not in handles.upper_copies
            and os.readlink(f"/proc/self/fd/{fd}").endswith(" (deleted)"))


def marker_refusal(operation: Operation, root: Path, handles: Handles) -> tuple[str, object]:
    """What cowfs must answer to *operation*, which would make a marker name: the error the
    VFS gives before it asks the filesystem, else EINVAL. Probed on the oracle's mount, which
    the operation is not applied to (the kernel would make an ordinary file)."""
    def error(number: int) -> tuple[str, object]:
        return "error", errno.errorcode[number]

    try:
        if operation.name == "fd_create":
            fd = handles.fd(int(operation.arguments[0]))   # type: ignore[call-overload]
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                return error(errno.ENOTDIR)
            if os.readlink(f"/proc/self/fd/{fd}").endswith(" (deleted)"):
                return error(errno.ENOENT)    # a removed directory takes no new names
            return error(errno.EINVAL)
        new = os.path.join(root, str(operation.new_name()))
        if operation.name in ("link", "rename"):
            source = os.lstat(os.path.join(root, str(operation.arguments[0])))
        if not stat.S_ISDIR(os.stat(os.path.dirname(new)).st_mode):
            return error(errno.ENOTDIR)
        if operation.name == "link" and stat.S_ISDIR(source.st_mode):
            return error(errno.EPERM)
        if operation.name == "rename" and operation.arguments[2] == RENAME_EXCHANGE:
            return error(errno.ENOENT)        # nothing to exchange with
    except OSError as exc:
        return "error", errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return error(errno.EINVAL)


# -- drawing operations that collide with what is there -----------------------------------------

MAX_FRESH_DEPTH = 4      # no new entry deeper than this many components
UTIME_STAMPS_NS = (400_000_000 * 10**9 + 123_456_789, 300_000_000 * 10**9 + 1, 0)
write_data = st.one_of(
    st.binary(max_size=40),
    st.tuples(st.binary(min_size=1, max_size=3), st.integers(1000, 3000)).map(
        lambda pattern_count: pattern_count[0] * pattern_count[1]),
)
offsets = st.one_of(st.integers(0, 64), st.integers(4000, 9000))
sizes = st.one_of(st.integers(0, 40), st.integers(4000, 9000))
# "stat" comes first: hypothesis shrinks a step towards the first kind, and a failing sequence
# (of fixed length) then shows only the steps that change something.
OPERATION_WEIGHTS = {
    "stat": 2, "create": 3, "write": 4, "ftruncate": 1, "truncate": 1, "chmod": 2, "chown": 2,
    "utime": 2, "mknod": 1, "mkdir": 3, "symlink": 1, "link": 2, "unlink": 4, "rmdir": 3,
    "rename": 6, "setxattr": 2, "removexattr": 1, "forget": 1,
    # A held descriptor is used after what the path calls did to its names.
    "open": 4, "close": 1, "fd_read": 2, "fd_write": 2, "fd_stat": 2, "fd_truncate": 1,
    "fd_chmod": 1, "fd_chown": 1, "fd_utime": 1, "fd_setxattr": 1, "fd_sync": 1,
    "fd_list": 1, "fd_create": 1, "fd_lookup": 1,
}
WEIGHTED_OPERATIONS = [name for name, weight in OPERATION_WEIGHTS.items() for _ in range(weight)]


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


@st.composite
def operations(draw: st.DrawFn, tree: Tree, names: list[str],
               held: dict[int, str] | None = None) -> Operation:
    """One operation on paths of *tree* (the merged view now) or new names beside them, or on
    one of the descriptors *held* (slot: how it was opened).

    New names come from the stack's own pools, so they often fall on a whited-out or hidden
    lower entry, and now and then they are marker names. Calls that follow symlinks (truncate,
    chmod) get no symlink: a symlink's target may lie outside the mount.

    The choices hypothesis records have the same shape whatever the tree (a path is an index
    into a list, taken modulo its length; every argument is drawn even where unused): were
    the tree ever to differ on a replay, the choices still replay, and no
    FlakyStrategyDefinition cuts a shrink short.
    """
    existing = sorted(path for path in tree if path)
    directories = [path for path in sorted(tree) if tree[path].is_directory
                   and path.count("/") < MAX_FRESH_DEPTH - 1]
    fresh = [_join(parent, name) for parent in directories for name in names
             if _join(parent, name) not in tree]

    def path_from(candidates: list[str], fresh_share: int = 4) -> str:
        """One of *candidates* (the first is the simplest), or a new name one time in
        *fresh_share*."""
        wants_fresh = draw(st.integers(1, fresh_share)) == fresh_share
        index = draw(st.integers(0, 1 << 16))
        pool = fresh if (wants_fresh and fresh) or not candidates else candidates
        pool = pool or [FRESH_NAMES[0]]
        return pool[index % len(pool)]

    def new_path() -> str:
        """Where an entry is made: as often on a name in use as on a new one; one time in
        sixteen a marker name in an existing directory."""
        marker, index = draw(st.integers(0, 15)) == 15, draw(st.integers(0, 1 << 16))
        path = path_from(existing, fresh_share=2)
        if marker and directories:
            return _join(directories[index % len(directories)],
                         MARKER_NAMES[index % len(MARKER_NAMES)])
        return path

    held = held or {}

    def slot(*modes: str) -> int:
        """A slot holding a descriptor opened one of these ways, else any that holds one."""
        index = draw(st.integers(0, SLOTS - 1))
        fitting = sorted(slot for slot, how in held.items() if how in modes) or sorted(held)
        return fitting[index % len(fitting)] if fitting else index

    def free_slot() -> int:
        index = draw(st.integers(0, SLOTS - 1))
        free = [slot for slot in range(SLOTS) if slot not in held]
        return free[index % len(free)] if free else index

    no_symlinks = [path for path in existing if not tree[path].is_symlink]
    with_root = ["", *existing]
    name = draw(st.sampled_from(WEIGHTED_OPERATIONS))
    if name in FD_OPERATIONS and not held:
        name = "open"        # a call on a descriptor wants one
    match name:
        case "stat":
            arguments: tuple[object, ...] = (path_from(existing),)
        case "create":
            arguments = (
                new_path(),
                draw(st.sampled_from([0, os.O_EXCL, os.O_TRUNC, os.O_APPEND])),
                draw(modes), draw(write_data))
        case "write":
            path = path_from(existing)
            flags = draw(st.sampled_from([os.O_TRUNC, os.O_APPEND, 0]))
            offset, data, sync, read_back = (draw(offsets), draw(write_data),
                                             draw(st.booleans()), draw(st.booleans()))
            regular = path in tree and tree[path].is_regular
            arguments = (path, flags, None if flags else offset, data, sync,
                         regular and read_back)
        case "ftruncate":
            arguments = (path_from(existing), draw(sizes))
        case "truncate":
            arguments = (path_from(no_symlinks), draw(sizes))
        case "chmod":
            arguments = (path_from(["", *no_symlinks]), draw(modes))
        case "chown":
            arguments = (path_from(with_root), draw(st.sampled_from((-1, *OWNERS))),
                         draw(st.sampled_from((-1, *OWNERS))))
        case "utime":
            stamp = st.sampled_from(UTIME_STAMPS_NS)
            arguments = (path_from(with_root),
                         draw(st.one_of(st.tuples(stamp, stamp), st.none())))
        case "mknod" | "mkdir":
            arguments = (new_path(), draw(modes))
        case "symlink":
            arguments = (draw(st.sampled_from([*SYMLINK_TARGETS, *names])), new_path())
        case "link" | "rename":
            arguments = (path_from(existing), new_path())
            if name == "rename":
                arguments += (draw(st.sampled_from(list(RENAME_FLAGS))),)
        case "unlink" | "rmdir":
            arguments = (path_from(existing),)
        case "setxattr":
            arguments = (path_from(with_root), draw(st.sampled_from(USER_XATTRS)),
                         draw(st.binary(max_size=6)),
                         draw(st.sampled_from(list(XATTR_FLAG_NAMES))))
        case "removexattr":
            arguments = (path_from(with_root), draw(st.sampled_from(USER_XATTRS)))
        case "forget":
            arguments = ()
        case "open":
            how = draw(st.sampled_from(list(OPEN_MODES)))
            wanted = stat.S_ISDIR if how == "directory" else stat.S_ISREG
            candidates = [path for path in with_root if wanted(tree[path].mode)]
            arguments = (free_slot(), path_from(candidates, fresh_share=8), how)
        case "close" | "fd_stat" | "fd_sync":
            arguments = (slot(*OPEN_MODES),)
        case "fd_read":
            arguments = (slot(*FILE_MODES), draw(offsets))
        case "fd_write":
            arguments = (slot(*WRITABLE_MODES), draw(offsets), draw(write_data))
        case "fd_truncate":
            arguments = (slot(*WRITABLE_MODES), draw(sizes))
        case "fd_chmod":
            arguments = (slot(*OPEN_MODES), draw(modes))
        case "fd_chown":
            arguments = (slot(*OPEN_MODES), draw(st.sampled_from((-1, *OWNERS))),
                         draw(st.sampled_from((-1, *OWNERS))))
        case "fd_utime":
            stamp = st.sampled_from(UTIME_STAMPS_NS)
            arguments = (slot(*OPEN_MODES), draw(st.one_of(st.tuples(stamp, stamp), st.none())))
        case "fd_setxattr":
            arguments = (slot(*OPEN_MODES), draw(st.sampled_from(USER_XATTRS)),
                         draw(st.binary(max_size=6)))
        case "fd_list":
            arguments = (slot("directory"),)
        case "fd_create":
            arguments = (slot("directory"), draw(st.sampled_from([*names, *MARKER_NAMES])),
                         draw(st.sampled_from([0, os.O_EXCL])), draw(write_data))
        case "fd_lookup":
            arguments = (slot("directory"), draw(st.sampled_from(names)))
        case _:
            raise ValueError(name)
    return Operation(name, arguments)


@st.composite
def steps(draw: st.DrawFn, tree: Tree, names: list[str],
          held: dict[int, str]) -> tuple[Operation, ...]:
    """One step: mostly one operation, sometimes two or three drawn from the same view and
    made one after the other, with no look at the tree between them (so no lookup of every
    name in between, as the comparison after a step makes)."""
    count = draw(st.sampled_from([1, 1, 1, 2, 3]))
    return tuple(draw(operations(tree, names, held)) for _ in range(count))
