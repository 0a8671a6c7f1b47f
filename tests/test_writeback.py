"""The kernel's writeback cache (`-o writeback=1`): writes gather in the page cache and reach
the daemon later, as page runs. Each sequence runs on cowfs with it and on the kernel's
overlayfs over the same lower, and both must end alike (content, size, mode), also as the
upper holds it after the data was made durable; the request counts show the cache was on."""

import json
import mmap
import os
from pathlib import Path

import pytest
from test_extra_operations import Pair, chattr

pytestmark = pytest.mark.mounts

KIB = 1 << 10
WRITEBACK = ("-o", "writeback=1")


def requests(root: Path) -> dict[str, int]:
    return json.loads(os.getxattr(root, "trusted.cowfs.stats"))["requests"]


def seen(path: Path) -> tuple[bytes, int, int]:
    st = os.lstat(path)
    return path.read_bytes(), st.st_size, st.st_mode


def append_twice(root: Path) -> None:
    for text in (b"one\n", b"two\n"):
        fd = os.open(root / "log", os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, text)
        finally:
            os.close(fd)


def append_through_two_handles(root: Path) -> None:
    first = os.open(root / "log", os.O_WRONLY | os.O_APPEND)
    second = os.open(root / "log", os.O_RDWR | os.O_APPEND)
    try:
        os.write(first, b"A" * 5000)
        os.write(second, b"B" * 3)
        os.write(first, b"C")
        os.pwrite(second, b"D", 0)      # pwrite on O_APPEND appends too (Linux)
        os.fsync(second)
    finally:
        os.close(first)
        os.close(second)


def mmap_write(root: Path) -> None:
    fd = os.open(root / "data", os.O_RDWR)
    try:
        with mmap.mmap(fd, 0) as mapped:
            mapped[10:20] = b"0123456789"
            mapped[-1:] = b"!"
            mapped.flush()
    finally:
        os.close(fd)


def truncate_dirty(root: Path) -> None:
    fd = os.open(root / "data", os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * (100 * KIB), 0)
        os.ftruncate(fd, 10)             # pages still dirty in the cache
        os.pwrite(fd, b"tail", 50 * KIB)  # a hole between
        os.truncate(root / "data", 40 * KIB)
        os.pwrite(fd, b"end", 40 * KIB - 1)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_only_partial_pages(root: Path) -> None:
    """O_WRONLY writes of part of a page: the cache must read the rest of the page in."""
    fd = os.open(root / "data", os.O_WRONLY)
    try:
        os.pwrite(fd, b"ab", 4097)
        os.pwrite(fd, b"cd", 100)
    finally:
        os.close(fd)


def reader_sees_writer(root: Path) -> bytes:
    """A reader of the lower copy, a writer that copies it up: the reader sees the writes."""
    reader = os.open(root / "data", os.O_RDONLY)
    try:
        before = os.pread(reader, 8, 0)
        writer = os.open(root / "data", os.O_WRONLY)
        try:
            os.pwrite(writer, b"WRITTEN!", 0)
        finally:
            os.close(writer)
        return before + os.pread(reader, 8, 0)
    finally:
        os.close(reader)


def create_and_rename_over(root: Path) -> None:
    """dpkg's way: write a new file, fsync, rename it over the old one, held open."""
    held = os.open(root / "data", os.O_RDONLY)
    try:
        fd = os.open(root / "data.new", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
        try:
            os.write(fd, b"new content" * 1000)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(root / "data.new", root / "data")
        assert os.pread(held, 4, 0) == bytes(range(4))     # the old file, still open
    finally:
        os.close(held)    # the kernel hands back the replaced file's times: no EIO here


SEQUENCES = {"append twice": append_twice,
             "append through two handles": append_through_two_handles, "mmap write": mmap_write,
             "truncate dirty pages": truncate_dirty,
             "write-only partial pages": write_only_partial_pages,
             "create and rename over": create_and_rename_over}


def make_lower(lower: Path) -> None:
    (lower / "log").write_bytes(b"zero\n")
    (lower / "data").write_bytes(bytes(range(256)) * 64)


@pytest.mark.parametrize("sequence", SEQUENCES)
def test_writeback_ends_as_the_kernel(tmp_path: Path, sequence: str) -> None:
    pair = Pair(tmp_path)
    make_lower(pair.lower)
    with pair.mounted(*WRITEBACK) as roots:
        results = {}
        for name, root in roots.items():
            try:
                SEQUENCES[sequence](root)
                results[name] = "ok"
            except OSError as exc:
                results[name] = os.strerror(exc.errno or 0)
        assert results["cowfs"] == results["kernel"]
        for file in ("log", "data"):
            assert seen(roots["cowfs"] / file) == seen(roots["kernel"] / file), file
        os.sync()
    # After the unmount every page is in the upper.
    for file in ("log", "data"):
        cowfs, kernel = pair.upper("cowfs") / file, pair.upper("kernel") / file
        assert cowfs.exists() == kernel.exists(), file
        if kernel.exists():
            assert seen(cowfs) == seen(kernel), file


def test_a_reader_sees_what_a_writer_wrote_after_copy_up(tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    make_lower(pair.lower)
    with pair.mounted(*WRITEBACK) as roots:
        assert reader_sees_writer(roots["cowfs"]) == reader_sees_writer(roots["kernel"])


def test_fsync_puts_the_data_in_the_upper_and_writes_gather(tmp_path: Path) -> None:
    """The cache is on (4 KiB writes reach the daemon as a few large ones), and fsync hands
    the daemon every page: the upper file holds them before the unmount."""
    pair = Pair(tmp_path)
    make_lower(pair.lower)
    with pair.mounted(*WRITEBACK) as roots:
        before = requests(roots["cowfs"])
        fd = os.open(roots["cowfs"] / "big", os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            for number in range(256):
                os.write(fd, bytes([number]) * (4 * KIB))
            os.fsync(fd)
            upper = (pair.upper("cowfs") / "big").read_bytes()
            assert upper == b"".join(bytes([number]) * (4 * KIB) for number in range(256))
        finally:
            os.close(fd)
        writes = requests(roots["cowfs"]).get("write", 0) - before.get("write", 0)
        assert 0 < writes < 64, writes
        st = os.stat(roots["cowfs"] / "big")
        assert st.st_size == 1024 * KIB
        assert st.st_mtime_ns == os.stat(pair.upper("cowfs") / "big").st_mtime_ns


def test_an_append_only_file_appends_with_the_cache_on(tmp_path: Path) -> None:
    pair = Pair(tmp_path)
    make_lower(pair.lower)
    with pair.mounted(*WRITEBACK) as roots:
        for root in roots.values():
            if chattr("+a", root / "log") != "ok":
                pytest.skip("the upper's filesystem has no append-only flag")
            append_twice(root)
            with pytest.raises(PermissionError):
                os.open(root / "log", os.O_WRONLY)
        assert seen(roots["cowfs"] / "log") == seen(roots["kernel"] / "log")
        for root in roots.values():
            chattr("-a", root / "log")


def test_a_truncate_to_the_size_a_file_has_changes_nothing(tmp_path: Path) -> None:
    """truncate(2) by path that keeps the size: the FUSE kernel keeps the file's mtime (it
    stamps one only when the size changes) and never takes the daemon's, so cowfs changes
    nothing either: the view holds still, the upper gets no copy, a later mount shows the
    same. The kernel's overlay stamps mtime here (a deliberate difference, ARCHITECTURE.md)."""
    pair = Pair(tmp_path)
    make_lower(pair.lower)
    old = 1_500_000_000_123_456_789
    os.utime(pair.lower / "data", ns=(old, old))
    size = os.stat(pair.lower / "data").st_size
    with pair.mounted(*WRITEBACK) as roots:
        merged = roots["cowfs"]
        os.truncate(merged / "data", size)
        assert os.stat(merged / "data").st_mtime_ns == old
        assert not (pair.upper("cowfs") / "data").exists()
        os.truncate(merged / "data", size - 1)     # a change of size is stamped and copied up
        assert os.stat(merged / "data").st_mtime_ns != old
        assert os.stat(pair.upper("cowfs") / "data").st_size == size - 1
        fd = os.open(merged / "data", os.O_RDWR)   # ftruncate stamps, even to the same size
        try:
            os.utime(fd, ns=(old, old))
            os.ftruncate(fd, size - 1)
            assert os.fstat(fd).st_mtime_ns != old
        finally:
            os.close(fd)
