"""The kernel-cache extensions: kernel features pyfuse3 3.5.0 cannot ask for, reached by a C
library of cowfs's own (`_fuse_extensions.c`) that interposes a few libfuse calls.

It must be loaded before pyfuse3 is imported (pyfuse3 binds libfuse's symbols at import), so
the daemon calls `load` first. Anything that keeps it from working (not built, another pyfuse3
version, pyfuse3 imported already, a session it did not see) leaves the mount correct and only
slower, and `features()` says which extensions are active and why the others are not.
docs/ARCHITECTURE.md says why this and not a patched pyfuse3.
"""

import dataclasses
import errno
import functools
import importlib.machinery
import logging
import os
import sys
from typing import Any, Protocol

log = logging.getLogger(__name__)

# The pyfuse3 whose libfuse calls the library knows: which calls create the session, reply to
# opendir and fail a request. Another version runs without the extensions.
KNOWN_PYFUSE3 = "3.5.0"
# The control functions' version in _fuse_extensions.c (EXTENSIONS_ABI).
EXTENSIONS_ABI = 4
# libfuse's FUSE_CAP_CACHE_SYMLINKS: the kernel keeps symlink targets in the page cache.
CAP_CACHE_SYMLINKS = 1 << 23
# libfuse's FUSE_CAP_READDIRPLUS_AUTO: plain READDIR where no entry's attributes are wanted.
CAP_READDIRPLUS_AUTO = 1 << 14
# libfuse >= 3.17's FUSE_CAP_HANDLE_KILLPRIV_V2: the daemon kills suid/sgid, and the kernel
# stops asking security.capability before every write.
CAP_HANDLE_KILLPRIV_V2 = 1 << 21
# FOPEN_CACHE_DIR came with FUSE protocol 7.28 (Linux 4.20); older kernels ignore the flag.
CACHE_DIR_PROTOCOL_MINOR = 28
# FUSE_TMPFILE came with protocol 7.37 (Linux 6.1): older kernels serve no O_TMPFILE on FUSE.
TMPFILE_PROTOCOL_MINOR = 37
# The name a TMPFILE request reaches Operations.create under (_fuse_extensions.c routes it to
# pyfuse3's create handler): no CREATE can carry it, a name is one path component.
TMPFILE_NAME = b"/"

# Counter indices in _fuse_extensions.c (enum counter).
SESSIONS_WRAPPED, INIT_CALLS, PROTOCOL_MINOR, CAPABLE, GRANTED, OPENDIRS_SEEN, \
    CACHED_LISTING_REPLIES, NOFLUSH_REPLIES, EXTRA_REQUESTS, PLAIN_READDIRS, \
    PASSTHROUGH_GRANTED, PASSTHROUGH_OPENS, CONFLICTING_OPENS, BACKING_FILES_OPENED, \
    TMPFILE_ROUTED, TMPFILE_REQUESTS, KILL_REQUESTS = range(17)

# The extra operations' codes in _fuse_extensions.c (enum extra_operation).
EXTRA_FALLOCATE, EXTRA_LSEEK, EXTRA_COPY_FILE_RANGE, EXTRA_IOCTL = 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class KernelFeatures:
    """Which kernel caches a mount uses beyond what pyfuse3 offers, and why not, if not."""

    cache_listings: bool = False    # directory listings kept across opens (FOPEN_CACHE_DIR)
    cache_symlinks: bool = False    # symlink targets kept (FUSE_CAP_CACHE_SYMLINKS)
    reason: str | None = None       # why the extensions are off, when they are
    # Requests pyfuse3 does not route, served through the library: fallocate, lseek with
    # SEEK_DATA/SEEK_HOLE, copy_file_range, the inode-flag ioctls (lsattr, chattr).
    fallocate: bool = False
    lseek: bool = False
    copy_file_range: bool = False
    fileattr_ioctls: bool = False
    noflush: bool = False           # no FLUSH request at close (FOPEN_NOFLUSH)
    # Listings without every entry's attributes where none are wanted (READDIRPLUS_AUTO).
    plain_listings: bool = False
    # File data read and written by the kernel in the backing file (FUSE passthrough,
    # libfuse >= 3.17, `-o passthrough=on`).
    passthrough: bool = False
    # open(dir, O_TMPFILE): unnamed files, which linkat may name (libfuse >= 3.17's tmpfile).
    tmpfile: bool = False
    # cowfs kills suid/sgid, told by the kernel per request (FUSE_HANDLE_KILLPRIV_V2, libfuse
    # >= 3.17): no security.capability request before every write.
    killpriv_v2: bool = False

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> "KernelFeatures":
        flags = {field.name: bool(values.get(field.name)) for field in dataclasses.fields(cls)
                 if field.name != "reason"}
        return cls(**flags, reason=values.get("reason") or None)    # type: ignore[arg-type]


class _Library:
    def __init__(self, library: Any) -> None:     # a ctypes.CDLL
        import ctypes
        self.library = library
        library.cowfs_extensions_counter.restype = ctypes.c_ulonglong
        library.cowfs_extensions_counter.argtypes = [ctypes.c_int]
        library.cowfs_extensions_configure.argtypes = [ctypes.c_int, ctypes.c_uint]
        library.cowfs_extensions_plain_listing.argtypes = [ctypes.c_uint64]
        self.plain_listing = library.cowfs_extensions_plain_listing
        library.cowfs_extensions_set_handler.argtypes = [
            ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint), ctypes.c_uint, ctypes.c_int]
        library.cowfs_extensions_set_kill_handler.argtypes = [ctypes.c_void_p]
        # The C function pointers must live as long as the library may call them.
        self.handler: Any = None
        self.kill_handler: Any = None
        self.noflush = False
        self.plain_listings = False     # READDIRPLUS_AUTO asked for
        self.passthrough = False        # asked for, from a library that can
        library.cowfs_extensions_offer_backing.argtypes = [
            ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int]
        self.offer_backing = library.cowfs_extensions_offer_backing

    def counter(self, which: int) -> int:
        return int(self.library.cowfs_extensions_counter(which))

    def route(self, operations: "ExtraOperations", noflush: bool) -> None:
        import ctypes
        request_type = ctypes.POINTER(_extra_request_type())
        self.handler = ctypes.CFUNCTYPE(ctypes.c_int, request_type)(
            functools.partial(_serve_extra_request, operations))
        self.noflush = noflush
        ioctls = (ctypes.c_uint * len(operations.IOCTL_COMMANDS))(*operations.IOCTL_COMMANDS)
        self.library.cowfs_extensions_set_handler(
            ctypes.cast(self.handler, ctypes.c_void_p), ioctls, len(ioctls), int(noflush))


    def route_kills(self, operations: "KillOperations") -> None:
        import ctypes
        u32, u64 = ctypes.c_uint32, ctypes.c_uint64
        self.kill_handler = ctypes.CFUNCTYPE(None, u32, u64, u64, u32, u32, u32)(
            functools.partial(_tell_kill_request, operations))
        self.library.cowfs_extensions_set_kill_handler(
            ctypes.cast(self.kill_handler, ctypes.c_void_p))


@functools.cache
def _extra_request_type() -> Any:
    """struct extra_request of _fuse_extensions.c, built on first use (ctypes loads late)."""
    import ctypes

    class ExtraRequest(ctypes.Structure):
        _fields_ = [("operation", ctypes.c_int32), ("flags", ctypes.c_uint32),
                    ("fh", ctypes.c_uint64), ("fh_out", ctypes.c_uint64),
                    ("offset", ctypes.c_int64), ("offset_out", ctypes.c_int64),
                    ("length", ctypes.c_int64), ("mode", ctypes.c_int64),
                    ("input", ctypes.c_void_p), ("in_size", ctypes.c_uint64),
                    ("output", ctypes.c_void_p), ("out_size", ctypes.c_uint64),
                    ("result", ctypes.c_int64)]
    return ExtraRequest


def _serve_extra_request(operations: "ExtraOperations", pointer: Any) -> int:
    """The library's callback: one request, answered with 0 (result filled in) or an errno.

    Nothing may escape: an exception out of a ctypes callback is printed and 0 returned,
    which would reply success with no result."""
    import ctypes
    try:
        request = pointer.contents
        if request.operation == EXTRA_FALLOCATE:
            operations.fallocate(request.fh, request.mode, request.offset, request.length)
            request.result = 0
        elif request.operation == EXTRA_LSEEK:
            request.result = operations.lseek(request.fh, request.offset, request.mode)
        elif request.operation == EXTRA_COPY_FILE_RANGE:
            request.result = operations.copy_file_range(
                request.fh, request.offset, request.fh_out, request.offset_out,
                request.length, request.mode)
        elif request.operation == EXTRA_IOCTL:
            data = ctypes.string_at(request.input, request.in_size) if request.in_size else b""
            result, output = operations.ioctl(request.fh, request.mode & 0xFFFFFFFF,
                                              request.flags, data, request.out_size)
            ctypes.memmove(request.output, output, min(len(output), request.out_size))
            request.result = result
        else:
            return errno.ENOSYS
        return 0
    except OSError as exc:
        return exc.errno or errno.EIO
    except BaseException:
        log.exception("extra operation failed")
        return errno.EIO


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


def load(*, enabled: bool = True, plain_listings: bool = False, passthrough: bool = False
         ) -> None:
    """Load the library into the process so pyfuse3 binds to it; call before importing pyfuse3.
    *plain_listings* asks for READDIRPLUS_AUTO, *passthrough* for FUSE passthrough. A process
    that loaded it before (a warm start forks its daemons from one) only configures it again:
    a library once loaded cannot be turned off.

    Says once why the mount runs without the extensions, if it does."""
    global _library, _reason
    if _library is not None:
        _configure(_library, plain_listings, passthrough)
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
            _configure(_library, plain_listings, passthrough)
    if _reason is None:
        log.debug("kernel-cache extensions loaded")
    elif enabled:
        log.warning("running without the kernel-cache extensions: %s", _reason)
    else:
        log.info("running without the kernel-cache extensions: %s", _reason)


def _configure(library: _Library, plain_listings: bool, passthrough: bool) -> None:
    library.plain_listings = plain_listings
    library.library.cowfs_extensions_configure(
        1, CAP_CACHE_SYMLINKS | (CAP_READDIRPLUS_AUTO if plain_listings else 0))
    can = bool(library.library.cowfs_extensions_configure_passthrough(int(passthrough)))
    library.passthrough = passthrough and can
    if passthrough and not library.passthrough:
        log.warning("no passthrough: the extensions were built against libfuse < 3.17")


def loaded() -> bool:
    """Whether this process has the library loaded (a warm start's process has)."""
    return _library is not None


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
    plain = bool(_library.counter(GRANTED) & CAP_READDIRPLUS_AUTO)
    killpriv = bool(_library.counter(GRANTED) & CAP_HANDLE_KILLPRIV_V2)
    missing = [name for name, active in (("cached listings", listings),
                                         ("cached symlinks", symlinks)) if not active]
    routed = _library.handler is not None
    return KernelFeatures(listings, symlinks,
                          f"the kernel does not offer {' and '.join(missing)}" if missing
                          else None,
                          fallocate=routed, lseek=routed, copy_file_range=routed,
                          fileattr_ioctls=routed, noflush=_library.noflush,
                          plain_listings=plain,
                          passthrough=bool(_library.counter(PASSTHROUGH_GRANTED)),
                          tmpfile=_serves_tmpfile(_library), killpriv_v2=killpriv)


def _serves_tmpfile(library: _Library) -> bool:
    """Whether TMPFILE requests reach Operations.create: the library filled libfuse's tmpfile
    entry (built against 3.17's headers) and the kernel sends them."""
    return bool(library.counter(TMPFILE_ROUTED)) and \
        library.counter(PROTOCOL_MINOR) >= TMPFILE_PROTOCOL_MINOR


def counters() -> dict[str, int]:
    """The library's own counts, for the statistics: opendirs seen and answered cached."""
    if _library is None:
        return {}
    return {"opendirs_seen": _library.counter(OPENDIRS_SEEN),
            "cached_listing_replies": _library.counter(CACHED_LISTING_REPLIES),
            "noflush_replies": _library.counter(NOFLUSH_REPLIES),
            "extra_requests": _library.counter(EXTRA_REQUESTS),
            "plain_readdirs": _library.counter(PLAIN_READDIRS),
            "passthrough_opens": _library.counter(PASSTHROUGH_OPENS),
            "conflicting_opens": _library.counter(CONFLICTING_OPENS),
            "backing_files_opened": _library.counter(BACKING_FILES_OPENED),
            "backing_file_error": _library.library.cowfs_extensions_passthrough_error(),
            "tmpfile_requests": _library.counter(TMPFILE_REQUESTS),
            "kill_requests": _library.counter(KILL_REQUESTS)}


def is_plain_listing(fh: int) -> bool:
    """Whether the readdir now served for directory handle *fh* is a plain READDIR: its
    entries need a name, an inode number and a type, and the kernel counts no lookup."""
    # Asked only where plain listings were asked for: a readdir costs no call into C else.
    return _library is not None and _library.plain_listings and bool(_library.plain_listing(fh))


def offer_backing(fh: int, inode: int, fd: int) -> None:
    """File handle *fh* of *inode* reads and writes *fd*: its open or create reply, sent next,
    may name that file as the backing file the kernel reads and writes itself (passthrough;
    the library decides per open, by the kernel's rules: docs/ARCHITECTURE.md). With *fd* -1
    the open is cached, and counted: with passthrough on, every file open is offered."""
    if _library is not None and _library.passthrough:
        _library.offer_backing(fh, inode, fd)


# -- the operations pyfuse3 does not route ------------------------------------------------


class ExtraOperations(Protocol):
    """What serves the requests pyfuse3 does not route. Called synchronously on pyfuse3's
    trio thread, inside libfuse's processing of the request: no awaiting, nothing that may
    block for long. An OSError becomes its errno."""

    # The ioctl commands `ioctl` serves: the library answers every other one ENOTTY itself.
    IOCTL_COMMANDS: tuple[int, ...]

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None: ...

    def lseek(self, fh: int, offset: int, whence: int) -> int: ...

    def copy_file_range(self, fh_in: int, offset_in: int, fh_out: int, offset_out: int,
                        length: int, flags: int) -> int: ...

    def ioctl(self, fh: int, command: int, flags: int, data: bytes, out_size: int
              ) -> tuple[int, bytes]: ...


def route_extra_operations(operations: ExtraOperations, *, noflush: bool = True) -> None:
    """Have the library hand fallocate, lseek, copy_file_range and ioctl requests to
    *operations*, and (with *noflush*) ask for no FLUSH at close; call before pyfuse3.init.
    Without the library nothing happens and those requests fail as under plain pyfuse3."""
    if _library is not None:
        _library.route(operations, noflush)


# -- killing suid and sgid: FUSE_HANDLE_KILLPRIV_V2 ----------------------------------------

# The opcodes of the requests that may ask for it (the FUSE protocol's).
KILL_ON_SETATTR, KILL_ON_OPEN, KILL_ON_WRITE = 4, 14, 16


class KillOperations(Protocol):
    """What is told of each request that asks to kill suid/sgid, before its handler runs.
    Called synchronously on pyfuse3's trio thread, inside libfuse's processing of the
    request: nothing may block or await; exceptions are logged and dropped."""

    def note_kill_request(self, opcode: int, node_id: int, fh: int, uid: int, gid: int,
                          pid: int) -> None: ...


def _tell_kill_request(operations: KillOperations, opcode: int, node_id: int, fh: int,
                       uid: int, gid: int, pid: int) -> None:
    """The library's callback. Nothing may escape a ctypes callback (it would be printed and
    the request served without its kill)."""
    try:
        operations.note_kill_request(opcode, node_id, fh, uid, gid, pid)
    except BaseException:
        log.exception("kill request %d for node %d failed", opcode, node_id)


def route_kill_requests(operations: KillOperations) -> None:
    """Ask for FUSE_HANDLE_KILLPRIV_V2 and have the library tell *operations* of the requests
    that ask to kill suid/sgid; call before pyfuse3.init. Granted only where the library was
    built against libfuse >= 3.17 and the kernel offers it (`features().killpriv_v2`);
    elsewhere the kernel kills them itself and nothing is told."""
    if _library is not None:
        _library.route_kills(operations)
