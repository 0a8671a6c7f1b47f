"""open(dir, O_TMPFILE) and linkat of the unnamed file, on libfuse 3.17 (opt-in:
tests/libfuse317.py says how), compared with the kernel's overlayfs on the same lower.

The same steps run on both mounts and what they see must match: fstat of the unnamed file
(nlink 0, mode, owner), its data, linkat through AT_EMPTY_PATH and through /proc/self/fd, the
link over a deleted lower name, O_EXCL's refusal, and the upper each leaves (an unlinked file
leaves nothing). cowfs's upper must then show the same tree under the kernel's overlay.
"""

import contextlib
import ctypes
import errno
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from conftest import kernel_overlay, mounted_cowfs
from libfuse317 import REQUIRED, launcher

pytestmark = REQUIRED

# cowfs's defaults, which the kernel needs spelled out.
KERNEL_OPTIONS = "redirect_dir=on,metacopy=on"
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_FOLLOW = 0x400
NOBODY = 65534

_libc = ctypes.CDLL(None, use_errno=True)


def linkat(source_fd: int, source: bytes, target: Path, flags: int) -> None:
    # Not os.link: without a dir_fd it calls link(2), which links /proc's magic link itself.
    if _libc.linkat(source_fd, source, AT_FDCWD, os.fsencode(target), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(target))


def link_empty_path(fd: int, target: Path) -> None:
    """linkat(fd, "", AT_FDCWD, target, AT_EMPTY_PATH): needs CAP_DAC_READ_SEARCH."""
    linkat(fd, b"", target, AT_EMPTY_PATH)


def link_proc(fd: int, target: Path) -> None:
    """linkat of /proc/self/fd/N with AT_SYMLINK_FOLLOW: any user may."""
    linkat(AT_FDCWD, f"/proc/self/fd/{fd}".encode(), target, AT_SYMLINK_FOLLOW)


def outcome(action: Callable[[], object]) -> object:
    try:
        return action()
    except OSError as exc:
        return errno.errorcode[exc.errno or 0]


def described(fd: int) -> tuple[str, int, int, int, int]:
    st = os.fstat(fd)
    return oct(st.st_mode), st.st_nlink, st.st_uid, st.st_gid, st.st_size


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Type and mode, owner, size and data of everything under *root*, whiteouts as devices."""
    seen: dict[str, tuple[object, ...]] = {}
    for directory, subdirectories, files in os.walk(root):
        for name in subdirectories + files:
            path = Path(directory, name)
            st = os.lstat(path)
            data = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
            seen[str(path.relative_to(root))] = (oct(st.st_mode), st.st_uid, st.st_gid,
                                                 st.st_nlink, data, st.st_rdev)
    return seen


def make_lower(lower: Path) -> None:
    (lower / "deep" / "dir").mkdir(parents=True)
    (lower / "deep" / "dir" / "old").write_text("old\n")
    (lower / "gone").mkdir()
    (lower / "gone" / "deleted").write_text("lower's\n")
    (lower / "gone" / "kept").write_text("kept\n")
    (lower / "unused").mkdir()
    (lower / "elsewhere").mkdir()
    (lower / "shared").mkdir()
    (lower / "shared").chmod(0o777)
    (lower / "exclusive").mkdir()


@contextlib.contextmanager
def both(base: Path, package_317: Path) -> Iterator[dict[str, Path]]:
    """The kernel's overlayfs and cowfs on libfuse 3.17 over one lower, uppers of their own;
    checks cowfs's log for a handler's traceback before unmounting."""
    lower = base / "lower"
    for name in ("kernel", "cowfs"):
        (base / f"{name}-upper").mkdir()
        (base / name).mkdir()
    with contextlib.ExitStack() as stack:
        stack.enter_context(kernel_overlay([lower], base / "kernel", base / "kernel-upper",
                                           KERNEL_OPTIONS))
        mount = stack.enter_context(mounted_cowfs([lower], base / "cowfs", base / "cowfs-upper",
                                                  launcher=launcher(package_317)))
        yield {"kernel": base / "kernel", "cowfs": base / "cowfs"}
        assert "Traceback" not in mount.log(), mount.log()


def unnamed(directory: Path, mode: int = 0o640, flags: int = os.O_RDWR) -> int:
    return os.open(directory, os.O_TMPFILE | flags, mode)


def steps_as_root(root: Path) -> dict[str, object]:
    """Every O_TMPFILE case a root caller meets; what each showed."""
    seen: dict[str, object] = {}

    fd = unnamed(root, 0o640)
    try:
        os.pwrite(fd, b"made in the root\n", 0)
        seen["root: unnamed"] = described(fd)
        seen["root: read"] = os.pread(fd, 100, 0)
        seen["root: listed"] = sorted(os.listdir(root))
        link_empty_path(fd, root / "named")
        seen["root: linked"] = described(fd)
        seen["root: by name"] = (root / "named").read_bytes()
        os.pwrite(fd, b"more\n", 17)
    finally:
        os.close(fd)
    seen["root: after close"] = (root / "named").read_bytes()

    # A lower-only directory: the parents are copied up for the unnamed file.
    fd = unnamed(root / "deep" / "dir", 0o600, os.O_WRONLY)
    try:
        os.write(fd, b"deep\n")
        seen["deep: unnamed"] = described(fd)
        seen["deep: read write-only"] = outcome(lambda: os.pread(fd, 10, 0))
        link_proc(fd, root / "deep" / "dir" / "new")
        seen["deep: linked"] = described(fd)
    finally:
        os.close(fd)
    seen["deep: listed"] = sorted(os.listdir(root / "deep" / "dir"))
    seen["deep: by name"] = (root / "deep" / "dir" / "new").read_bytes()

    # Linked over a deleted lower name: the whiteout there must give way.
    os.unlink(root / "gone" / "deleted")
    fd = unnamed(root / "gone", 0o644)
    try:
        os.write(fd, b"back again\n")
        link_proc(fd, root / "gone" / "deleted")
        seen["gone: linked"] = described(fd)
        seen["gone: over a name"] = outcome(lambda: link_proc(fd, root / "gone" / "kept"))
        # Once named, an ordinary file: another link, into a lower-only directory.
        link_empty_path(fd, root / "elsewhere" / "second")
        seen["gone: linked twice"] = described(fd)
    finally:
        os.close(fd)
    seen["gone: listed"] = sorted(os.listdir(root / "gone"))
    seen["gone: by name"] = (root / "gone" / "deleted").read_bytes()
    seen["gone: by its second name"] = (root / "elsewhere" / "second").read_bytes()

    # O_EXCL: never linkable; the VFS refuses before the filesystem is asked.
    fd = unnamed(root / "exclusive", 0o644, os.O_RDWR | os.O_EXCL)
    try:
        os.write(fd, b"excl\n")
        seen["exclusive: unnamed"] = described(fd)
        seen["exclusive: proc link"] = outcome(
            lambda: link_proc(fd, root / "exclusive" / "by-proc"))
        seen["exclusive: empty-path link"] = outcome(
            lambda: link_empty_path(fd, root / "exclusive" / "by-fd"))
    finally:
        os.close(fd)
    seen["exclusive: listed"] = sorted(os.listdir(root / "exclusive"))

    # Closed without a name: nothing stays, in the view or the upper.
    fd = unnamed(root / "unused", 0o644)
    try:
        os.write(fd, b"forgotten\n" * 1000)
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, 5)
        seen["unused: changed by fd"] = described(fd)
    finally:
        os.close(fd)
    seen["unused: listed"] = sorted(os.listdir(root / "unused"))
    seen["tree"] = tree(root)
    return seen


def steps_as_nobody(root: Path) -> object:
    """One O_TMPFILE as uid 65534 with umask 022, in a directory anyone may write: fstat, data,
    linkat through /proc (AT_EMPTY_PATH needs a capability nobody has). In a forked child, as
    the interpreter is not executable by nobody."""
    directory = root / "shared"
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the child: never returns
        status = 1
        try:
            os.close(reader)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.umask(0o022)
            fd = unnamed(directory, 0o666)
            os.write(fd, b"nobody's\n")
            before = described(fd)
            linked = outcome(lambda: link_proc(fd, directory / "mine"))
            os.write(writer, json.dumps([before, linked, described(fd)]).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, report
    return [json.loads(report), tree(directory)]


def statistics(root: Path) -> dict:
    return json.loads(os.getxattr(root, "trusted.cowfs.stats"))


def test_tmpfile_and_its_links_as_the_kernels_overlay(world_readable_dirs: Path,
                                                      package_317: Path) -> None:
    base = world_readable_dirs
    make_lower(base / "lower")
    with both(base, package_317) as roots:
        seen = {name: steps_as_root(root) for name, root in roots.items()}
        nobody = {name: steps_as_nobody(root) for name, root in roots.items()}
        final = {name: tree(root) for name, root in roots.items()}
        stats = statistics(roots["cowfs"])
    for key in seen["kernel"]:
        assert seen["cowfs"][key] == seen["kernel"][key], key
    assert nobody["cowfs"] == nobody["kernel"]
    assert final["cowfs"] == final["kernel"]

    # What was asserted is what O_TMPFILE should do, not only what both happen to do.
    kernel = seen["kernel"]
    assert kernel["root: unnamed"][1] == 0 and kernel["root: linked"][1] == 1
    assert kernel["gone: by name"] == b"back again\n"
    assert (kernel["gone: over a name"], kernel["gone: linked twice"][1]) == ("EEXIST", 2)
    assert kernel["exclusive: proc link"] == "ENOENT" == kernel["exclusive: empty-path link"]
    assert kernel["unused: listed"] == []
    [before, linked, after], _ = nobody["kernel"]
    assert (before[1:4], linked, after[1]) == ([0, NOBODY, NOBODY], None, 1)
    assert before[0] == oct(stat.S_IFREG | 0o644)

    assert stats["kernel_features"]["tmpfile"], stats["kernel_features"]
    assert stats["tmpfile_requests"] == 6, stats
    assert stats["requests"]["tmpfile"] == 6, stats["requests"]

    # The uppers: the same files, the same whiteouts, no trace of the unlinked ones.
    uppers = {name: tree(base / f"{name}-upper") for name in ("kernel", "cowfs")}
    assert uppers["cowfs"] == uppers["kernel"]
    assert "unused" in uppers["cowfs"] and "unused/" not in "".join(uppers["cowfs"])
    assert not [path for path in uppers["cowfs"] if path.startswith("exclusive/")]

    # cowfs's upper under the kernel's overlay: the view cowfs showed.
    view = base / "cowfs-upper-view"
    view.mkdir()
    with kernel_overlay([base / "lower"], view, base / "cowfs-upper", KERNEL_OPTIONS):
        assert tree(view) == final["cowfs"]


def test_tmpfile_in_a_removed_directory_fails_as_the_kernels(world_readable_dirs: Path,
                                                             package_317: Path) -> None:
    """An unnamed file in a directory removed while held open: the upper's filesystem
    decides, under both (ext4 refuses with EPERM, tmpfs makes it)."""
    base = world_readable_dirs
    (base / "lower").mkdir()
    with both(base, package_317) as roots:
        seen = {}
        for name, root in roots.items():
            (root / "doomed").mkdir()
            fd = os.open(root / "doomed", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.rmdir(root / "doomed")
                held = Path(f"/proc/self/fd/{fd}")
                seen[name] = outcome(lambda: os.close(unnamed(held)))  # noqa: B023 (called here)
            finally:
                os.close(fd)
    assert seen["cowfs"] == seen["kernel"], seen
    assert tree(base / "cowfs-upper") == tree(base / "kernel-upper") == {}
