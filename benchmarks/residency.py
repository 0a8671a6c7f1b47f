"""Was a warm measurement really warm? Page residency (mincore) and cowfs's request counters.

This machine's page cache is sometimes dropped from outside (a freshly read 64 MiB file went to
no resident pages within a second), and the drop takes the dentries and inodes, so the kernel's
cached listings, with it. A warm row timed across such a drop is a cold row mislabelled. A
canary file, read before the timed pass and not held open, shows the drop: `echo 1` takes its
pages, `echo 2` evicts its unused inode and the pages with it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path

CANARY_BYTES = 256 * 1024

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
MAP_FAILED = ctypes.c_void_p(-1).value


def resident_pages(path: Path) -> tuple[int, int]:
    """(pages in the page cache, pages in the file), without reading the file (mincore).

    Mapping the file does not fault anything in: mincore only looks at the page cache.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0, 0
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap of {path}: {os.strerror(ctypes.get_errno())}")
        try:
            vector = ctypes.create_string_buffer(pages)
            if _libc.mincore(address, size, vector) != 0:
                error = ctypes.get_errno()
                raise OSError(error, f"mincore of {path}: {os.strerror(error)}")
            return sum(byte & 1 for byte in vector.raw), pages
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)


def is_resident(path: Path) -> bool:
    """Every page of *path* is in the page cache."""
    resident, pages = resident_pages(path)
    return pages > 0 and resident == pages


def drop_file_cache(path: Path) -> None:
    """Evict *path*'s clean pages (POSIX_FADV_DONTNEED): what a cache drop does to one file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class Canary:
    """A file read into the page cache before a warm pass; resident after it if nothing
    dropped the caches in between."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "wb") as file:
            file.write(os.urandom(CANARY_BYTES))
            file.flush()
            os.fsync(file.fileno())

    def warm(self) -> None:
        with open(self.path, "rb") as file:
            while file.read(1 << 16):
                pass

    def still_warm(self) -> bool:
        return is_resident(self.path)


# Counters of /proc/vmstat that move when the kernel drops or reclaims caches: a drop_caches
# write (from anyone), or reclaim of page cache and of dentries and inodes (shrinkers).
RECLAIM_COUNTERS = ("drop_pagecache", "drop_slab", "slabs_scanned", "pgsteal_kswapd",
                    "pgsteal_direct", "pginodesteal", "kswapd_inodesteal")


def reclaim_counters() -> dict[str, int]:
    values: dict[str, int] = {}
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, _, value = line.partition(" ")
        if name in RECLAIM_COUNTERS:
            values[name] = int(value)
    return values


def reclaim_between(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The reclaim counters that moved, and by how much."""
    return {name: after[name] - before.get(name, 0) for name in after
            if after[name] != before.get(name, 0)}
