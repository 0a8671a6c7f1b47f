"""The kernel-cache extensions: kernel features pyfuse3 3.5.0 cannot ask for, reached by a C
library of cowfs's own (`_fuse_extensions.c`) that interposes a few libfuse calls.

It must be loaded before pyfuse3 is imported (pyfuse3 binds libfuse's symbols at import), so
the daemon calls `load` first. Anything that keeps it from working (not built, another pyfuse3
version, pyfuse3 imported already, a session it did not see) leaves the mount correct and only
slower, and `features()` says which extensions are active and why the others are not.
docs/ARCHITECTURE.md says why this and not a patched pyfuse3.
"""

import dataclasses
import importlib.machinery
import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)

# The pyfuse3 whose libfuse calls the library knows: which calls create the session, reply to
# opendir and fail a request. Another version runs without the extensions.
KNOWN_PYFUSE3 = "3.5.0"
# The control functions' version in _fuse_extensions.c (EXTENSIONS_ABI).
EXTENSIONS_ABI = 1
# libfuse's FUSE_CAP_CACHE_SYMLINKS: the kernel keeps symlink targets in the page cache.
CAP_CACHE_SYMLINKS = 1 << 23
# FOPEN_CACHE_DIR came with FUSE protocol 7.28 (Linux 4.20); older kernels ignore the flag.
CACHE_DIR_PROTOCOL_MINOR = 28

# Counter indices in _fuse_extensions.c (enum counter).
SESSIONS_WRAPPED, INIT_CALLS, PROTOCOL_MINOR, CAPABLE, GRANTED, OPENDIRS_SEEN, \
    CACHED_LISTING_REPLIES = range(7)


@dataclasses.dataclass(frozen=True)
class KernelFeatures:
    """Which kernel caches a mount uses beyond what pyfuse3 offers, and why not, if not."""

    cache_listings: bool = False    # directory listings kept across opens (FOPEN_CACHE_DIR)
    cache_symlinks: bool = False    # symlink targets kept (FUSE_CAP_CACHE_SYMLINKS)
    reason: str | None = None       # why the extensions are off, when they are

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> "KernelFeatures":
        return cls(cache_listings=bool(values.get("cache_listings")),
                   cache_symlinks=bool(values.get("cache_symlinks")),
                   reason=values.get("reason") or None)    # type: ignore[arg-type]


class _Library:
    def __init__(self, library: Any) -> None:     # a ctypes.CDLL
        import ctypes
        self.library = library
        library.cowfs_extensions_counter.restype = ctypes.c_ulonglong
        library.cowfs_extensions_counter.argtypes = [ctypes.c_int]
        library.cowfs_extensions_configure.argtypes = [ctypes.c_int, ctypes.c_uint]

    def counter(self, which: int) -> int:
        return int(self.library.cowfs_extensions_counter(which))


_library: _Library | None = None
_reason: str | None = "not loaded"


def library_path() -> str | None:
    """Where the built library is, if it was built (an optional part of the install)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, "_fuse_extensions" + suffix)
        if os.path.exists(path):
            return path
    return None


def _why_not_loadable() -> str | None:
    import importlib.metadata  # here, not at import: `cowfs run` starts without it
    if "pyfuse3" in sys.modules:
        return "pyfuse3 was imported before cowfs could load them"
    try:
        version = importlib.metadata.version("pyfuse3")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if version != KNOWN_PYFUSE3:
        return f"they know pyfuse3 {KNOWN_PYFUSE3}, not {version}"
    if library_path() is None:
        return "they were not built (install needs gcc, pkg-config and libfuse3-dev)"
    return None


def load(*, enabled: bool = True) -> None:
    """Load the library into the process so pyfuse3 binds to it; call before importing pyfuse3.

    Says once why the mount runs without the extensions, if it does."""
    global _library, _reason
    if _library is not None:
        return
    _reason = "turned off (-o kernel_caches=off)" if not enabled else _why_not_loadable()
    if _reason is None:
        import ctypes
        path = library_path()
        assert path is not None
        try:
            library = ctypes.CDLL(path, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
            if library.cowfs_extensions_abi() != EXTENSIONS_ABI:
                raise OSError(f"{path} is from another cowfs version: reinstall cowfs")
        except (OSError, AttributeError) as exc:
            _reason = f"cannot load them: {exc}"
        else:
            _library = _Library(library)
            library.cowfs_extensions_configure(1, CAP_CACHE_SYMLINKS)
    if _reason is None:
        log.debug("kernel-cache extensions loaded")
    elif enabled:
        log.warning("running without the kernel-cache extensions: %s", _reason)
    else:
        log.info("running without the kernel-cache extensions: %s", _reason)


def check_session() -> None:
    """After pyfuse3.init: the session must have been made through the library, else say so."""
    global _library, _reason
    if _library is not None and _library.counter(SESSIONS_WRAPPED) == 0:
        _library, _reason = None, "pyfuse3 made its session past them"
        log.warning("running without the kernel-cache extensions: %s", _reason)


def features() -> KernelFeatures:
    """What this process's mount uses; complete once the kernel's INIT has been answered."""
    if _library is None:
        return KernelFeatures(reason=_reason)
    if _library.counter(INIT_CALLS) == 0:
        return KernelFeatures(reason="the kernel has not started the session yet")
    listings = _library.counter(PROTOCOL_MINOR) >= CACHE_DIR_PROTOCOL_MINOR
    symlinks = bool(_library.counter(GRANTED) & CAP_CACHE_SYMLINKS)
    missing = [name for name, active in (("cached listings", listings),
                                         ("cached symlinks", symlinks)) if not active]
    return KernelFeatures(listings, symlinks,
                          f"the kernel does not offer {' and '.join(missing)}" if missing
                          else None)


def counters() -> dict[str, int]:
    """The library's own counts, for the statistics: opendirs seen and answered cached."""
    if _library is None:
        return {}
    return {"opendirs_seen": _library.counter(OPENDIRS_SEEN),
            "cached_listing_replies": _library.counter(CACHED_LISTING_REPLIES)}
