"""The operations pyfuse3 does not route, served through the kernel-cache extensions:
fallocate, lseek with SEEK_DATA/SEEK_HOLE, copy_file_range, the inode-flag ioctls (lsattr,
chattr), and no FLUSH at close. Each is compared with the kernel's overlayfs on the same
layers; if the mechanism silently stops, fallocate fails with EOPNOTSUPP and these fail."""

import contextlib
import errno
import fcntl
import functools
import json
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import kernel_overlay, mounted_cowfs, paths_under

from cowfs import _libc

pytestmark = pytest.mark.mounts

KIB = 1 << 10
MIB = 1 << 20
# cowfs's defaults, which the kernel needs spelled out.
KERNEL_OPTIONS = "redirect_dir=on,metacopy=on"
FS_IOC_GETVERSION = 0x80087601      # an ioctl neither implementation serves
FS_IMMUTABLE_FL = 0x10
FS_APPEND_FL = 0x20
FSXATTR = struct.Struct("=IIIII8x")  # fsx_xflags, extsize, nextents, projid, cowextsize


class Pair:
    """cowfs and the kernel's overlayfs over one lower, each with its own upper."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.lower = base / "lower"
        self.lower.mkdir()

    def upper(self, name: str) -> Path:
        return self.base / f"{name}-upper"

    def root(self, name: str) -> Path:
        return self.base / name

    @contextlib.contextmanager
    def mounted(self, *extra: str) -> Iterator[dict[str, Path]]:
        for name in ("cowfs", "kernel"):
            self.upper(name).mkdir()
            self.root(name).mkdir()
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(kernel_overlay([self.lower], self.root("kernel"),
                                                   self.upper("kernel"), KERNEL_OPTIONS))
                mount = stack.enter_context(mounted_cowfs([self.lower], self.root("cowfs"),
                                                          self.upper("cowfs"), extra))
                yield {"cowfs": self.root("cowfs"), "kernel": self.root("kernel")}
                assert "Traceback" not in mount.log(), mount.log()   # a handler's bug
                for name in ("cowfs", "kernel"):
                    clear_protection(self.root(name))   # so the uppers can be removed
        finally:
            for name in ("cowfs", "kernel"):
                clear_protection(self.upper(name))


def clear_protection(root: Path) -> None:
    """Take chattr +a/+i off everything under *root*; never raises (used in finally)."""
    for directory, _, files in os.walk(root):
        for path in [directory, *(os.path.join(directory, name) for name in files)]:
            with contextlib.suppress(OSError):
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
                try:
                    flags = inode_flags(fd)
                    if flags & (FS_IMMUTABLE_FL | FS_APPEND_FL):
                        fcntl.ioctl(fd, _libc.FS_IOC_SETFLAGS, struct.pack(
                            "I", flags & ~(FS_IMMUTABLE_FL | FS_APPEND_FL)))
                finally:
                    os.close(fd)


def inode_flags(fd: int) -> int:
    answer = bytearray(4)
    fcntl.ioctl(fd, _libc.FS_IOC_GETFLAGS, answer)
    return struct.unpack("I", answer)[0]


def flags_of(path: Path) -> int | str:
    """What lsattr reads (FS_IOC_GETFLAGS), or the errno name."""
    def read() -> int:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            return inode_flags(fd)
        finally:
            os.close(fd)
    return outcome(read)  # type: ignore[return-value]


def outcome(action: Callable[..., object], *arguments: object) -> object:
    """What *action* returned, or the name of its errno."""
    try:
        return action(*arguments)
    except OSError as exc:
        return errno.errorcode[exc.errno]


def statistics(merged: Path) -> dict:
    return json.loads(os.getxattr(merged, "trusted.cowfs.stats"))


def requests_during(merged: Path, action: Callable[[], object]) -> dict[str, int]:
    """The requests cowfs served while *action* ran (the statistics reads not counted)."""
    before = statistics(merged)["requests"]
    action()
    after = statistics(merged)["requests"]
    counts = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    counts["getxattr"] -= 2
    return {name: count for name, count in counts.items() if count}


def pattern(size: int) -> bytes:
    return bytes(range(251)) * (size // 251) + bytes(range(size % 251))


def make_sparse(path: Path) -> None:
    """Data at 0-64 KiB and 1-1.25 MiB, a hole between, and one at the end: 2 MiB."""
    with open(path, "wb") as file:
        file.write(pattern(64 * KIB))
        file.seek(MIB)
        file.write(pattern(256 * KIB))
        file.truncate(2 * MIB)


def shape(path: Path) -> tuple[int, int, bytes]:
    """Size, blocks and a digest-sized view of the content (the whole of it: files are small)."""
    st = os.stat(path)
    return st.st_size, st.st_blocks, path.read_bytes()


# fallocate modes (the FUSE kernel passes KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE on), each on its
# own lower file of 256 KiB: (mode, offset, length).
FALLOCATE_CASES = {
    "default": (0, 128 * KIB, 512 * KIB),
    "keep-size": (_libc.FALLOC_FL_KEEP_SIZE, 128 * KIB, 512 * KIB),
    "punch-hole": (_libc.FALLOC_FL_PUNCH_HOLE | _libc.FALLOC_FL_KEEP_SIZE, 64 * KIB, 64 * KIB),
    "punch-without-keep-size": (_libc.FALLOC_FL_PUNCH_HOLE, 64 * KIB, 64 * KIB),
    "zero-range": (_libc.FALLOC_FL_ZERO_RANGE, 192 * KIB, 128 * KIB),
    "zero-range-keep-size": (_libc.FALLOC_FL_ZERO_RANGE | _libc.FALLOC_FL_KEEP_SIZE,
                             192 * KIB, 128 * KIB),
}
# Refused by the FUSE kernel itself before the daemon sees them (fs/fuse/file.c), where the
# kernel's overlay passes them to ext4: a limit of every FUSE filesystem.
REFUSED_BY_FUSE = {
    "collapse-range": (_libc.FALLOC_FL_COLLAPSE_RANGE, 64 * KIB, 64 * KIB),
    "insert-range": (_libc.FALLOC_FL_INSERT_RANGE, 64 * KIB, 64 * KIB),
}


def allocate(path: Path, mode: int, offset: int, length: int) -> str:
    fd = os.open(path, os.O_RDWR)
    try:
        _libc.fallocate(fd, mode, offset, length)
    finally:
        os.close(fd)
    return "ok"


def test_fallocate_in_every_mode_as_the_kernel(tmp_path: Path) -> None:
    """A first fallocate on a lower file copies it up and gives what the kernel's overlay
    gives: result, size, blocks, content."""
    pair = Pair(tmp_path)
    for name in [*FALLOCATE_CASES, *REFUSED_BY_FUSE]:
        (pair.lower / name).write_bytes(pattern(256 * KIB))
    with pair.mounted() as roots:
        for name, (mode, offset, length) in FALLOCATE_CASES.items():
            results = {implementation: outcome(allocate, root / name, mode, offset, length)
                       for implementation, root in roots.items()}
            assert results["cowfs"] == results["kernel"], name
            assert shape(roots["cowfs"] / name) == shape(roots["kernel"] / name), name
            assert (pair.upper("cowfs") / name).exists() == \
                (pair.upper("kernel") / name).exists(), name
        assert outcome(allocate, roots["cowfs"] / "default", 0, 0, 1) == "ok"
        for name, (mode, offset, length) in REFUSED_BY_FUSE.items():
            assert outcome(allocate, roots["kernel"] / name, mode, offset, length) == "ok"
            asked = requests_during(roots["cowfs"], functools.partial(
                outcome, allocate, roots["cowfs"] / name, mode, offset, length))
            assert "fallocate" not in asked, asked
            assert outcome(allocate, roots["cowfs"] / name, mode, offset, length) \
                == errno.errorcode[errno.EOPNOTSUPP], name
        assert statistics(roots["cowfs"])["requests"]["fallocate"] >= len(FALLOCATE_CASES)


def holes_of(fd: int) -> list[object]:
    """SEEK_DATA and SEEK_HOLE from every 64 KiB step and past the end (ENXIO)."""
    return [outcome(os.lseek, fd, offset, whence)
            for offset in range(0, 2 * MIB + 128 * KIB, 64 * KIB)
            for whence in (os.SEEK_DATA, os.SEEK_HOLE)]


def holes(path: Path) -> list[object]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return holes_of(fd)
    finally:
        os.close(fd)


def test_seek_data_and_hole_find_the_holes_the_kernel_finds(tmp_path: Path) -> None:
    """A lower file's holes as the kernel's overlay shows them; after a copy-up, the upper
    copy's (the kernel's copy-up fills some holes that cowfs's keeps), also through a reader
    that opened the lower copy before."""
    pair = Pair(tmp_path)
    make_sparse(pair.lower / "sparse")
    make_sparse(pair.lower / "copied")
    with pair.mounted() as roots:
        assert holes(roots["cowfs"] / "sparse") == holes(roots["kernel"] / "sparse")
        assert holes(roots["cowfs"] / "sparse")[:4] == [0, 64 * KIB, MIB, 64 * KIB]
        readers = {name: os.open(root / "copied", os.O_RDONLY) for name, root in roots.items()}
        try:
            for root in roots.values():
                with open(root / "copied", "r+b") as file:
                    file.seek(1536 * KIB)
                    file.write(b"new data in the hole")
                    file.flush()
                    os.fsync(file.fileno())
            for name, fd in readers.items():
                upper_copy = holes(pair.upper(name) / "copied")
                assert holes_of(fd) == upper_copy, name
                assert holes(roots[name] / "copied") == upper_copy, name
        finally:
            for fd in readers.values():
                os.close(fd)
        for name, root in roots.items():
            subprocess.run(["cp", "--sparse=always", root / "sparse", tmp_path / f"{name}.cp"],
                           check=True)
        assert shape(tmp_path / "cowfs.cp") == shape(tmp_path / "kernel.cp")
        assert os.stat(tmp_path / "cowfs.cp").st_blocks * 512 <= 512 * KIB
        assert statistics(roots["cowfs"])["requests"]["lseek"] > 0


def copy_range(source: Path, target: Path, length: int, source_offset: int = 0,
               target_offset: int = 0) -> int:
    source_fd = os.open(source, os.O_RDONLY)
    target_fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        return os.copy_file_range(source_fd, target_fd, length, source_offset, target_offset)
    finally:
        os.close(source_fd)
        os.close(target_fd)


def copy_everything(source: Path, target: Path) -> int:
    """Loop on short counts, as cp does; the number of calls it took."""
    size, calls, done = os.stat(source).st_size, 0, 0
    while done < size:
        done += copy_range(source, target, size - done, done, done)
        calls += 1
    return calls


def test_copy_file_range_is_done_by_the_kernel_as_the_kernels_overlay(tmp_path: Path) -> None:
    """Lower to upper and upper to upper, with no READ or WRITE reaching the daemon; a copy
    longer than one request's bound comes back short, and a loop finishes it."""
    pair = Pair(tmp_path)
    (pair.lower / "small").write_bytes(pattern(100 * KIB))
    (pair.lower / "big").write_bytes(pattern(20 * MIB))
    with pair.mounted() as roots:
        for root in roots.values():
            (root / "upper-file").write_bytes(pattern(10 * KIB)[::-1])
        cowfs = roots["cowfs"]
        for root in roots.values():
            assert copy_range(root / "small", root / "from-lower", 100 * KIB) == 100 * KIB
            assert copy_range(root / "small", root / "upper-file", 50 * KIB, 7, 4 * KIB) \
                == 50 * KIB
            assert copy_range(root / "upper-file", root / "between-uppers", 60 * KIB) \
                == 4 * KIB + 50 * KIB
            assert copy_range(root / "small", root / "past-end", 10, 200 * KIB) == 0
        for name in ("from-lower", "upper-file", "between-uppers", "past-end"):
            assert shape(cowfs / name) == shape(roots["kernel"] / name), name
        asked = requests_during(cowfs, lambda: copy_everything(cowfs / "big", cowfs / "copy"))
        assert asked.get("copy_file_range", 0) >= 2 and "read" not in asked \
            and "write" not in asked, asked
        assert copy_range(cowfs / "big", cowfs / "short", 20 * MIB) < 20 * MIB
        copy_everything(roots["kernel"] / "big", roots["kernel"] / "copy")
        assert (cowfs / "copy").read_bytes() == (roots["kernel"] / "copy").read_bytes()
        assert (pair.lower / "small").read_bytes() == pattern(100 * KIB)


def test_copy_file_range_between_filesystems_falls_back_in_the_daemon(tmp_path: Path) -> None:
    """A lower on tmpfs and the upper on the disk: the backing copy_file_range says EXDEV,
    and the daemon copies in the kernel another way."""
    lower = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="cowfs-test-"))
    try:
        (lower / "source").write_bytes(pattern(300 * KIB))
        upper, merged = tmp_path / "upper", tmp_path / "merged"
        upper.mkdir()
        merged.mkdir()
        with mounted_cowfs([lower], merged, upper):
            (merged / "target").write_bytes(b"")
            asked = requests_during(merged, lambda: copy_everything(merged / "source",
                                                                    merged / "target"))
            assert asked.get("copy_file_range", 0) >= 1 and "write" not in asked, asked
            assert (merged / "target").read_bytes() == pattern(300 * KIB)
    finally:
        shutil.rmtree(lower)


def fsxattr_flags(path: Path) -> int | str:
    def read() -> int:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            answer = bytearray(FSXATTR.size)
            fcntl.ioctl(fd, _libc.FS_IOC_FSGETXATTR, answer)
            return FSXATTR.unpack(answer)[0]
        finally:
            os.close(fd)
    return outcome(read)  # type: ignore[return-value]


def other_ioctl(path: Path) -> object:
    fd = os.open(path, os.O_RDONLY)
    try:
        return fcntl.ioctl(fd, FS_IOC_GETVERSION, bytearray(8))
    finally:
        os.close(fd)


def chattr(change: str, path: Path) -> str:
    result = subprocess.run(["chattr", change, str(path)], capture_output=True, text=True)
    return "ok" if result.returncode == 0 else "failed"


def test_lsattr_and_chattr_as_the_kernel(tmp_path: Path) -> None:
    """+a and +i on lower and upper files and directories: the flags read back, what they
    forbid, a lower entry copied up by its first chattr; other ioctls are ENOTTY."""
    pair = Pair(tmp_path)
    for name in ("lower-file", "lower-immutable"):
        (pair.lower / name).write_text("lower data\n")
    (pair.lower / "lower-dir").mkdir()
    (pair.lower / "lower-dir" / "inside").write_text("inside\n")
    with pair.mounted() as roots:
        for root in roots.values():
            (root / "upper-file").write_text("upper data\n")
            (root / "upper-dir").mkdir()
        names = ["lower-file", "lower-immutable", "lower-dir", "upper-file", "upper-dir", ""]
        for name in names:
            assert flags_of(roots["cowfs"] / name) == flags_of(roots["kernel"] / name), name
        steps = [("+a", "lower-file"), ("+i", "lower-immutable"), ("+a", "lower-dir"),
                 ("+i", "upper-file"), ("+i", "upper-dir")]
        for change, name in steps:
            assert chattr(change, roots["cowfs"] / name) == chattr(change, roots["kernel"] / name)
            for shown in names:
                assert flags_of(roots["cowfs"] / shown) == flags_of(roots["kernel"] / shown), \
                    (change, name, shown)
                assert fsxattr_flags(roots["cowfs"] / shown) == \
                    fsxattr_flags(roots["kernel"] / shown), (change, name, shown)
        for name in ("lower-file", "lower-immutable", "lower-dir"):
            assert (pair.upper("cowfs") / name).exists(), name   # copied up, as the kernel
        attempts: list[tuple[str, Callable[[Path], object]]] = [
            ("append", lambda root: (root / "lower-file").open("a").write("more\n")),
            ("overwrite", lambda root: (root / "lower-file").write_text("over")),
            ("write immutable", lambda root: (root / "lower-immutable").open("a").write("x")),
            ("chmod immutable", lambda root: os.chmod(root / "upper-file", 0o600)),
            ("unlink immutable", lambda root: os.unlink(root / "upper-file")),
            ("create in +i dir", lambda root: (root / "upper-dir" / "new").write_text("")),
            ("create in +a dir", lambda root: (root / "lower-dir" / "new").write_text("")),
            ("unlink in +a dir", lambda root: os.unlink(root / "lower-dir" / "inside")),
            ("other ioctl", lambda root: other_ioctl(root / "upper-file")),
        ]
        for what, attempt in attempts:
            assert outcome(attempt, roots["cowfs"]) == outcome(attempt, roots["kernel"]), what
        assert (roots["cowfs"] / "lower-file").read_text() == \
            (roots["kernel"] / "lower-file").read_text() == "lower data\nmore\n"
        for change, name in steps:
            undo = change.replace("+", "-")
            assert chattr(undo, roots["cowfs"] / name) == chattr(undo, roots["kernel"] / name)
            assert flags_of(roots["cowfs"] / name) == flags_of(roots["kernel"] / name), name
        assert statistics(roots["cowfs"])["requests"]["ioctl"] > 0


def test_close_sends_no_flush(tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    (pair.lower / "file").write_text("lower\n")
    with pair.mounted() as roots:
        cowfs = roots["cowfs"]

        def use() -> None:
            (cowfs / "file").read_text()
            (cowfs / "new").write_text("made\n")
            with open(cowfs / "file", "a") as file:
                file.write("more\n")
        asked = requests_during(cowfs, use)
        assert "flush" not in asked and asked["release"] == 3, asked
        # Python's open() asks isatty (TCGETS): the library answers ENOTTY without Python.
        assert "ioctl" not in asked, asked
        shown = statistics(cowfs)
        assert shown["noflush_replies"] >= 3
        features = shown["kernel_features"]
        assert all(features[name] for name in ("fallocate", "lseek", "copy_file_range",
                                               "fileattr_ioctls", "noflush")), features


def test_switched_off_the_operations_fail_as_under_plain_pyfuse3(tmp_path: Path) -> None:
    """The control: without the extensions fallocate is EOPNOTSUPP and close flushes."""
    pair = Pair(tmp_path)
    (pair.lower / "file").write_text("lower\n")
    with pair.mounted("-o", "kernel_caches=off") as roots:
        cowfs = roots["cowfs"]
        assert outcome(allocate, cowfs / "file", 0, 0, MIB) == errno.errorcode[errno.EOPNOTSUPP]
        assert requests_during(cowfs, lambda: (cowfs / "file").read_text())["flush"] == 1
        assert flags_of(cowfs / "file") == "ENOTTY"
        assert not statistics(cowfs)["kernel_features"]["fallocate"]


def test_tmpfile_fails_cleanly_without_libfuse_317(tmp_path: Path) -> None:
    """libfuse 3.14 has no tmpfile operation: it answers ENOSYS, the kernel fails O_TMPFILE
    with EOPNOTSUPP (for the rest of the mount), and nothing reaches cowfs or the upper.
    (tests/test_tmpfile.py serves it on 3.17.)"""
    lower, upper, merged = (tmp_path / name for name in ("lower", "upper", "merged"))
    for path in (lower / "dir", upper, merged):
        path.mkdir(parents=True)
    with mounted_cowfs([lower], merged, upper):
        if statistics(merged)["kernel_features"]["tmpfile"]:
            pytest.skip("this libfuse has a tmpfile operation")
        unnamed = functools.partial(os.open, merged / "dir", os.O_TMPFILE | os.O_RDWR, 0o600)
        assert [outcome(unnamed), outcome(unnamed)] == [errno.errorcode[errno.EOPNOTSUPP]] * 2
        assert os.listdir(merged / "dir") == []
        assert "create" not in statistics(merged)["requests"]
    assert paths_under(upper) == set()
