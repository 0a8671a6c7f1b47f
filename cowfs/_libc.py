"""The few libc calls `os` lacks, through ctypes. Every failure is an OSError with its errno."""

import contextlib
import ctypes
import os
import struct
import threading
from collections.abc import Iterator

# The C library this interpreter runs on, already loaded: no ldconfig run to find it.
_libc = ctypes.CDLL(None, use_errno=True)

# renameat2(2) flags
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

# ioctl(2) requests
FICLONE = 0x40049409          # _IOW(0x94, 9, int): share the source's extents (reflink)

_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc.renameat2.restype = ctypes.c_int


def _check(result: int, call: str, name: str | None = None) -> None:
    if result == -1:
        error = ctypes.get_errno()
        raise OSError(error, f"{call}: {os.strerror(error)}", name)


# fallocate(2) modes; the FUSE kernel passes only KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE on.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20

# The inode-flag ioctls (lsattr, chattr, xfs_io's fsxattr); payload sizes as the kernel's
# FUSE passes them: an unsigned int, a struct fsxattr.
FS_IOC_GETFLAGS = 0x80086601      # _IOR('f', 1, long)
FS_IOC_SETFLAGS = 0x40086602      # _IOW('f', 2, long)
FS_IOC_FSGETXATTR = 0x801C581F    # _IOR('X', 31, struct fsxattr)
FS_IOC_FSSETXATTR = 0x401C5820    # _IOW('X', 32, struct fsxattr)
FS_IMMUTABLE_FL = 0x10            # in FS_IOC_SETFLAGS's flags
FS_APPEND_FL = 0x20
FS_XFLAG_APPEND = 0x10            # in struct fsxattr's fsx_xflags

_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none and hides the errno)."""
    _check(_libc.fallocate(fd, mode, offset, length), "fallocate")


def release_free_memory() -> None:
    """Give the pages malloc holds free back to the system (glibc's malloc_trim; elsewhere
    nothing)."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def syncfs(fd: int) -> None:
    """Write back everything of the filesystem *fd* is on (not only one file, as fsync)."""
    _check(_libc.syncfs(fd), "syncfs")


def renameat2(old_dir_fd: int, old_name: str, new_dir_fd: int, new_name: str,
              flags: int = 0) -> None:
    """rename(2) between directory fds, with RENAME_NOREPLACE, _EXCHANGE or _WHITEOUT."""
    _check(_libc.renameat2(old_dir_fd, os.fsencode(old_name), new_dir_fd,
                           os.fsencode(new_name), flags), "renameat2", old_name)


# File handles (name_to_handle_at(2)): what the kernel's overlay.origin records.
AT_EMPTY_PATH = 0x1000
_MAX_HANDLE_BYTES = 128
FS_IOC_GETFSUUID = 0x80111500     # _IOR(0x15, 0, struct fsuuid2): a filesystem's uuid


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * _MAX_HANDLE_BYTES)]


def name_to_handle_at(dir_fd: int, name: str | None) -> tuple[int, bytes]:
    """(handle type, handle bytes) of (dir_fd, name), not following a symlink (its default);
    with no name, of what *dir_fd* holds (AT_EMPTY_PATH)."""
    handle = _FileHandle(handle_bytes=_MAX_HANDLE_BYTES)
    mount_id = ctypes.c_int()
    flags = AT_EMPTY_PATH if name is None else 0
    _check(_libc.name_to_handle_at(dir_fd, os.fsencode(name or ""), ctypes.byref(handle),
                                   ctypes.byref(mount_id), flags), "name_to_handle_at", name)
    return handle.handle_type, bytes(handle.f_handle[:handle.handle_bytes])


def open_by_handle_at(mount_fd: int, handle_type: int, handle_bytes: bytes, flags: int) -> int:
    """An fd on the file a handle names, on the filesystem *mount_fd* is on (needs
    CAP_DAC_READ_SEARCH)."""
    handle = _FileHandle(handle_bytes=len(handle_bytes), handle_type=handle_type)
    ctypes.memmove(handle.f_handle, handle_bytes, len(handle_bytes))
    fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(handle), flags)
    _check(fd, "open_by_handle_at")
    return fd


# unshare(2) / clone(2) flags
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# mount(2) flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

# prctl(2) options
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_KEEPCAPS = 8
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
KEYCTL_JOIN_SESSION_KEYRING = 1

# Syscalls glibc does not wrap, by architecture (see syscall(2)).
_SYSCALL_NUMBERS = {
    "x86_64": {"pivot_root": 155, "capset": 126, "keyctl": 250,
               "getxattrat": 464, "listxattrat": 465},
    "aarch64": {"pivot_root": 41, "capset": 91, "keyctl": 219,
                "getxattrat": 464, "listxattrat": 465},
}
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def unshare(flags: int) -> None:
    """See unshare(2)."""
    _check(_libc.unshare(flags), "unshare")


def mount(source: str, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    """See mount(2)."""
    _check(_libc.mount(os.fsencode(source), os.fsencode(target),
                       os.fsencode(fstype) if fstype else None, ctypes.c_ulong(flags),
                       os.fsencode(data) if data else None), "mount", target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(os.fsencode(target), flags), "umount2", target)


def _syscall_number(name: str) -> int:
    machine = os.uname().machine
    try:
        return _SYSCALL_NUMBERS[machine][name]
    except KeyError:
        raise OSError(38, f"{name}: no syscall number known for {machine}") from None


# getxattrat(2) and listxattrat(2), Linux 6.13: xattrs of a name relative to a directory fd,
# without the walk through /proc/self/fd that otherwise reaches it (a few us a call).
AT_SYMLINK_NOFOLLOW = 0x100
XATTR_SIZE_MAX = 65536


class _XattrArgs(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint64), ("size", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class _XattrBuffer(threading.local):
    """A buffer per thread that holds any xattr value or name list (copy-ups run in threads)."""

    def __init__(self) -> None:
        self.data = ctypes.create_string_buffer(XATTR_SIZE_MAX)
        self.arguments = _XattrArgs(ctypes.addressof(self.data), XATTR_SIZE_MAX, 0)


_xattr_buffer = _XattrBuffer()
# -1 where the number is not known: the call fails with ENOSYS, as on an older kernel.
_GETXATTRAT, _LISTXATTRAT = (_SYSCALL_NUMBERS.get(os.uname().machine, {}).get(name, -1)
                             for name in ("getxattrat", "listxattrat"))


def getxattrat(dir_fd: int, name: str, attribute: str) -> bytes:
    """The value of *attribute* on *name* in *dir_fd*, not followed if a symlink. ENOSYS
    before Linux 6.13 (and EBADF for an empty name on an O_PATH fd: fgetxattr's rule)."""
    buffer = _xattr_buffer
    size = _libc.syscall(_GETXATTRAT, dir_fd, os.fsencode(name), AT_SYMLINK_NOFOLLOW,
                         os.fsencode(attribute), ctypes.byref(buffer.arguments),
                         ctypes.c_size_t(ctypes.sizeof(_XattrArgs)))
    _check(size, "getxattrat", attribute)
    return ctypes.string_at(buffer.data, size)


def listxattrat(dir_fd: int, name: str) -> list[str]:
    """The xattr names on *name* in *dir_fd*, not followed if a symlink; ENOSYS before Linux
    6.13."""
    buffer = _xattr_buffer
    size = _libc.syscall(_LISTXATTRAT, dir_fd, os.fsencode(name), AT_SYMLINK_NOFOLLOW,
                         buffer.data, ctypes.c_size_t(XATTR_SIZE_MAX))
    _check(size, "listxattrat", name)
    if not size:
        return []
    return [os.fsdecode(item) for item in ctypes.string_at(buffer.data, size - 1).split(b"\0")]


def pivot_root(new_root: str, put_old: str) -> None:
    """See pivot_root(2); glibc has no wrapper."""
    _check(_libc.syscall(_syscall_number("pivot_root"), os.fsencode(new_root),
                         os.fsencode(put_old)), "pivot_root", new_root)


def prctl(option: int, argument: int = 0, argument3: int = 0) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(argument), ctypes.c_ulong(argument3),
                       ctypes.c_ulong(0), ctypes.c_ulong(0)), "prctl")


# capabilities(7), in kernel order: a name's index is its number.
CAPABILITY_NAMES = (
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid", "setuid",
    "setpcap", "linux_immutable", "net_bind_service", "net_broadcast", "net_admin", "net_raw",
    "ipc_lock", "ipc_owner", "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace",
    "sys_pacct", "sys_admin", "sys_boot", "sys_nice", "sys_resource", "sys_time",
    "sys_tty_config", "mknod", "lease", "audit_write", "audit_control", "setfcap",
    "mac_override", "mac_admin", "syslog", "wake_alarm", "block_suspend", "audit_read",
    "perfmon", "bpf", "checkpoint_restore")


def capability_number(name: str) -> int:
    """`CAP_NET_BIND_SERVICE`, `net_bind_service` -> 10."""
    key = name.lower().removeprefix("cap_")
    try:
        return CAPABILITY_NAMES.index(key)
    except ValueError:
        raise ValueError(f"unknown capability {name!r}") from None


def bounding_set() -> frozenset[int]:
    """The capabilities this process can still have (its bounding set, from /proc)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapBnd:"):
                mask = int(line.split()[1], 16)
                return frozenset(number for number in range(mask.bit_length())
                                 if mask >> number & 1)
    return frozenset()


def set_capabilities(numbers: frozenset[int] = frozenset(),
                     inheritable: frozenset[int] = frozenset()) -> None:
    """Set this thread's effective and permitted sets to *numbers*, its inheritable set to
    *inheritable* (capset(2)); an ambient capability must be in both."""
    def words(chosen: frozenset[int]) -> tuple[int, int]:
        return (sum(1 << number for number in chosen if number < 32),
                sum(1 << (number - 32) for number in chosen if number >= 32))

    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    (low, high), (inheritable_low, inheritable_high) = words(numbers), words(inheritable)
    data = (ctypes.c_uint32 * 6)(low, low, inheritable_low, high, high, inheritable_high)
    _check(_libc.syscall(_syscall_number("capset"), header, data), "capset")


class _SockFilterProgram(ctypes.Structure):
    _fields_ = [("length", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_seccomp_filter(program: bytes) -> None:
    """Install a BPF *program* (struct sock_filter[]) on this thread; needs no_new_privs."""
    buffer = ctypes.create_string_buffer(program, len(program))
    header = _SockFilterProgram(len(program) // 8, ctypes.addressof(buffer))
    _check(_libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER),
                       ctypes.byref(header), ctypes.c_ulong(0), ctypes.c_ulong(0)),
           "seccomp")


def join_session_keyring() -> None:
    """Leave the caller's session keyring for a new, empty one (keyctl(2))."""
    _check(_libc.syscall(_syscall_number("keyctl"), KEYCTL_JOIN_SESSION_KEYRING, None),
           "keyctl")


@contextlib.contextmanager
def file_ids(uid: int, gid: int) -> Iterator[None]:
    """Create files as *uid*:*gid* for a while (setfsuid(2), setfsgid(2): this thread only,
    and the capabilities for files go with a non-zero fsuid until it is 0 again)."""
    old_gid = _libc.setfsgid(gid)
    old_uid = _libc.setfsuid(uid)
    try:
        yield
    finally:
        _libc.setfsuid(old_uid)
        _libc.setfsgid(old_gid)


# inotify(7): what `-o watch` asks to hear of a lower directory.
IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_INOTIFY_EVENT = struct.Struct("iIII")      # wd, mask, cookie, length of the name

_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


def inotify_init(flags: int) -> int:
    fd = _libc.inotify_init1(flags)
    _check(fd, "inotify_init1")
    return fd


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    watch = _libc.inotify_add_watch(fd, os.fsencode(path), mask)
    _check(watch, "inotify_add_watch", path)
    return watch


def inotify_events(data: bytes) -> Iterator[tuple[int, int, str]]:
    """(watch, mask, name) of each event in what one read of an inotify fd gave."""
    offset = 0
    while offset < len(data):
        watch, mask, _cookie, length = _INOTIFY_EVENT.unpack_from(data, offset)
        offset += _INOTIFY_EVENT.size
        name = data[offset:offset + length].rstrip(b"\0")
        offset += length
        yield watch, mask, os.fsdecode(name)
