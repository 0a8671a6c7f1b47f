"""The few libc calls `os` lacks, through ctypes. Every failure is an OSError with its errno."""

import ctypes
import ctypes.util
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)

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


def renameat2(old_dir_fd: int, old_name: str, new_dir_fd: int, new_name: str,
              flags: int = 0) -> None:
    """rename(2) between directory fds, with RENAME_NOREPLACE, _EXCHANGE or _WHITEOUT."""
    _check(_libc.renameat2(old_dir_fd, os.fsencode(old_name), new_dir_fd,
                           os.fsencode(new_name), flags), "renameat2", old_name)
