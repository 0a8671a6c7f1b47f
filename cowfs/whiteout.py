"""The on-disk format: whiteouts, opaque directories and overlay's private xattrs, every dialect.

Read side of the kernel overlayfs format (notes/kernel-format.md) and of the OCI/aufs one:

- whiteout: a character device 0/0; an empty regular file carrying `overlay.whiteout` in a
  directory marked `overlay.opaque=x`; an OCI `.wh.NAME` file beside where NAME would be.
- opaque directory: `overlay.opaque=y`, or an OCI `.wh..wh..opq` file inside it.

The OCI names are read in lower layers only. The writable upper holds the kernel's dialect alone
(cowfs and the kernel write nothing else there), so a `.wh.` name found in it is an ordinary file,
as the kernel shows it; and no name made through the mount may start with `.wh.`
(`check_new_name`), so a user's file never turns into a marker in a later layer or an export.

`overlay.` xattrs are read under both `trusted.` (the kernel's default) and `user.` (the kernel's
`userxattr` mode, used by unprivileged mounts).
"""

import dataclasses
import enum
import errno
import os
import stat

from cowfs import _at

OCI_WHITEOUT_PREFIX = ".wh."
OCI_OPAQUE_MARKER = ".wh..wh..opq"

OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
OPAQUE = "opaque"
WHITEOUT = "whiteout"
REDIRECT = "redirect"
METACOPY = "metacopy"
METACOPY_MIN_SIZE = 4        # a non-empty mark: version, length, flags, padding
LINK_COUNT = "cowfs.nlink"   # the merged view's link count of an indexed file


class Opacity(enum.Enum):
    """What a layer's directory says about the layers below it."""

    MERGED = "merged"          # lower layers show through
    OPAQUE = "opaque"          # lower layers are hidden
    XWHITEOUTS = "xwhiteouts"  # lower layers show through; holds xattr whiteouts (opaque=x)


def is_oci_name(name: str) -> bool:
    """Names of the OCI dialect's markers: never shown from a lower layer, never made anew."""
    return name.startswith(OCI_WHITEOUT_PREFIX)


def check_new_name(name: str) -> None:
    """Refuse a new name that a lower layer or a layer tar would read as a marker.

    Stored as a file, `.wh.passwd` would hide `passwd` once the upper is committed, exported or
    stacked as a lower, and `.wh..wh..opq` would empty its directory: anyone allowed to create a
    name could delete what they may not. The kernel allows such names; cowfs refuses them (EINVAL)
    before anything is created or copied up.
    """
    if is_oci_name(name):
        raise OSError(errno.EINVAL, f"{OCI_WHITEOUT_PREFIX} names are whiteout markers", name)


def oci_whiteout_name(name: str) -> str:
    return OCI_WHITEOUT_PREFIX + name


def is_device_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def read_overlay_xattr(dir_fd: int, name: str | None, key: str) -> bytes | None:
    """`trusted.overlay.KEY`, else `user.overlay.KEY`, of (dir_fd, name)."""
    for prefix in OVERLAY_XATTR_PREFIXES:
        value = _at.get_xattr(dir_fd, name, prefix + key)
        if value is not None:
            return value
    return None


def is_whiteout(dir_fd: int, name: str, st: os.stat_result, *, xwhiteouts: bool) -> bool:
    """Whether (dir_fd, name), whose lstat is *st*, hides *name* in the layers below.

    *xwhiteouts* says the directory is marked opaque=x: only then is an empty file with the
    whiteout xattr a whiteout, as in the kernel (it checks no xattr on other files).
    """
    if is_device_whiteout(st):
        return True
    if xwhiteouts and stat.S_ISREG(st.st_mode) and st.st_size == 0:
        return read_overlay_xattr(dir_fd, name, WHITEOUT) is not None
    return False


def is_oci_whiteout_present(dir_fd: int, name: str) -> bool:
    """Whether the directory holds `.wh.NAME`; a name too long for the marker has none."""
    marker = oci_whiteout_name(name)
    if len(os.fsencode(marker)) > _at.NAME_MAX:
        return False
    return _at.exists(dir_fd, marker)


def directory_opacity(fd: int, *, oci: bool = True) -> Opacity:
    """Read the opaque markers of the directory open as *fd* (an O_PATH fd is enough).

    *oci* False (the upper layer) leaves `.wh..wh..opq` out: there it is an ordinary file.
    """
    value = read_overlay_xattr(fd, None, OPAQUE)
    if value == b"y":
        return Opacity.OPAQUE
    if oci and _at.exists(fd, OCI_OPAQUE_MARKER):
        return Opacity.OPAQUE
    if value == b"x":
        return Opacity.XWHITEOUTS
    return Opacity.MERGED


def visible_xattr_name(attribute: str) -> str | None:
    """The name a user sees for a stored xattr, or None when it is private.

    As the kernel does, a user's own `trusted.overlay.X` is stored escaped as
    `trusted.overlay.overlay.X`; it is shown unescaped and everything else under the prefix
    is hidden.
    """
    for prefix in OVERLAY_XATTR_PREFIXES:
        if attribute.startswith(prefix):
            escaped = prefix + "overlay."
            if attribute.startswith(escaped):
                return prefix + attribute[len(escaped):]
            return None
    return attribute


def stored_xattr_name(attribute: str) -> str:
    """The stored name for a user-visible xattr name (the escaping above, reversed)."""
    for prefix in OVERLAY_XATTR_PREFIXES:
        if attribute.startswith(prefix):
            return prefix + "overlay." + attribute[len(prefix):]
    return attribute


# cowfs's own bookkeeping, private like the kernel's (every `*.overlay.*` xattr is hidden).
ORIGIN_INO = "cowfs.ino"


def read_origin_ino(dir_fd: int, name: str | None) -> int | None:
    """The inode number recorded at copy-up in an upper copy, if any."""
    value = read_overlay_xattr(dir_fd, name, ORIGIN_INO)
    try:
        return int(value) if value else None
    except ValueError:
        return None


# The kernel's overlay.origin: the copied-up lower file's handle, so that the kernel shows the
# lower inode number for the copy. Layout (notes/kernel-format.md): version 0, magic 0xfb, the
# total length, flags (0: little-endian fid), the fid type; the filesystem's 16-byte uuid; the
# fid itself.
ORIGIN = "origin"
IMPURE = "impure"
_ORIGIN_MAGIC = 0xFB
_ORIGIN_HEADER_BYTES = 5
_UUID_BYTES = 16
_ORIGIN_FLAG_PATH_UPPER = 1 << 2    # a handle of an upper file: not a lower origin


def encode_origin(uuid: bytes, handle_type: int, handle: bytes) -> bytes:
    length = _ORIGIN_HEADER_BYTES + _UUID_BYTES + len(handle)
    return bytes([0, _ORIGIN_MAGIC, length, 0, handle_type]) + uuid + handle


def decode_origin(value: bytes | None) -> tuple[int, bytes] | None:
    """(fid type, fid) of an overlay.origin value; None when it is none or not understood."""
    if value is None or len(value) <= _ORIGIN_HEADER_BYTES + _UUID_BYTES:
        return None
    version, magic, length, flags, handle_type = value[:_ORIGIN_HEADER_BYTES]
    if version != 0 or magic != _ORIGIN_MAGIC or length != len(value) \
            or flags & _ORIGIN_FLAG_PATH_UPPER:
        return None
    return handle_type, bytes(value[_ORIGIN_HEADER_BYTES + _UUID_BYTES:])


def read_metacopy(dir_fd: int, name: str) -> bytes | None:
    """The `overlay.metacopy` mark of a file, None for none.

    Asked of every regular file a lookup meets, so one listxattr answers the usual "none". The
    mark is empty or the kernel's struct (version, length, flags, padding, then perhaps an
    fs-verity digest), at least METACOPY_MIN_SIZE bytes.
    """
    stored = _at.list_xattrs(dir_fd, name)
    for prefix in OVERLAY_XATTR_PREFIXES:
        if prefix + METACOPY in stored:
            return _at.get_xattr(dir_fd, name, prefix + METACOPY)
    return None


def make_whiteout(dir_fd: int, name: str) -> None:
    """A character device 0/0: the one whiteout dialect every overlay reader knows."""
    os.mknod(name, stat.S_IFCHR | 0o000, 0, dir_fd=dir_fd)


def read_link_count(dir_fd: int, name: str) -> int | None:
    value = read_overlay_xattr(dir_fd, name, LINK_COUNT)
    try:
        return int(value) if value else None
    except ValueError:
        return None


REDIRECT_MODES = ("on", "follow", "off", "nofollow")


@dataclasses.dataclass(frozen=True)
class FormatOptions:
    """The kernel overlay's format options, with the kernel's meaning (its overlayfs.rst).

    metacopy: chmod, chown, utimes and xattr changes copy no data (a metacopy file), and
    metacopy files are read; off, one met is EPERM, as the kernel answers.
    redirect_dir: `on` writes redirects (a directory with lower copies may move) and follows
    them; `follow` and `off` follow them but write none (such a move is EXDEV: `off` is
    `follow` on a kernel with redirect_always_follow, its default); `nofollow` neither (a
    redirect met is EPERM).
    index: lower hard links stay one file once copied up (cowfs's own index in the workdir);
    off, none is kept and a copy-up of one name is a file of its own after remount.
    """

    metacopy: bool = True
    redirect_dir: str = "on"
    index: bool = True

    @property
    def writes_redirects(self) -> bool:
        return self.redirect_dir == "on"

    @property
    def follows_redirects(self) -> bool:
        return self.redirect_dir != "nofollow"

    def as_options(self) -> list[str]:
        """The `-o` options that choose this."""
        return [f"metacopy={'on' if self.metacopy else 'off'}",
                f"redirect_dir={self.redirect_dir}", f"index={'on' if self.index else 'off'}"]

    @classmethod
    def from_options(cls, *, metacopy: bool | None = None, redirect_dir: str | None = None,
                     index: bool | None = None) -> "FormatOptions":
        """The kernel's rules for what is left unsaid: metacopy needs redirect_dir=on, so
        redirect_dir given otherwise turns the default metacopy off, and both given so is a
        conflict (ValueError)."""
        if redirect_dir is not None and redirect_dir not in REDIRECT_MODES:
            raise ValueError(f"redirect_dir={redirect_dir}: expected one of "
                             f"{'|'.join(REDIRECT_MODES)}")
        if metacopy and redirect_dir not in (None, "on"):
            raise ValueError(f"conflicting options: metacopy=on,redirect_dir={redirect_dir}")
        if metacopy is None:
            metacopy = redirect_dir in (None, "on")
        return cls(metacopy=metacopy, redirect_dir=redirect_dir or "on",
                   index=True if index is None else index)


def default_xattr_prefix() -> str:
    """`trusted.overlay.` as root, as the kernel; `user.overlay.` (its `userxattr`) otherwise."""
    return OVERLAY_XATTR_PREFIXES[0] if os.geteuid() == 0 else OVERLAY_XATTR_PREFIXES[1]


class Marks:
    """Writes overlay's xattrs under one prefix, `trusted.overlay.` or `user.overlay.`.

    Readers accept both; a stack writes one. With `user.` the kernel (which then needs its
    `userxattr` option) cannot follow redirects or read metacopies, but no privilege is needed.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def _set(self, dir_fd: int, name: str | None, key: str, value: bytes) -> None:
        os.setxattr(_at.fd_path(dir_fd, name), self.prefix + key, value,
                    follow_symlinks=name is None)

    def set_opaque(self, dir_fd: int, name: str | None) -> None:
        self._set(dir_fd, name, OPAQUE, b"y")

    def set_redirect(self, dir_fd: int, name: str | None, path: str) -> None:
        self._set(dir_fd, name, REDIRECT, os.fsencode(path))

    def set_metacopy(self, dir_fd: int, name: str | None) -> None:
        self._set(dir_fd, name, METACOPY, b"")

    def clear_metacopy(self, dir_fd: int, name: str | None) -> None:
        """Drop the metacopy mark, and the redirect that pointed at the data."""
        for key in (METACOPY, REDIRECT):
            for prefix in OVERLAY_XATTR_PREFIXES:
                try:
                    os.removexattr(_at.fd_path(dir_fd, name), prefix + key,
                                   follow_symlinks=name is None)
                except OSError as exc:
                    if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                        raise

    def set_origin(self, dir_fd: int, name: str | None, value: bytes) -> None:
        self._set(dir_fd, name, ORIGIN, value)

    def set_impure(self, dir_fd: int) -> None:
        """The kernel's mark on a directory holding entries whose number is not their upper
        inode's (copies with an origin): its readdir then looks their numbers up."""
        if read_overlay_xattr(dir_fd, None, IMPURE) is None:
            self._set(dir_fd, None, IMPURE, b"y")

    def record_origin_ino(self, dir_fd: int, name: str | None, ino: int) -> None:
        self._set(dir_fd, name, ORIGIN_INO, str(ino).encode())

    def write_link_count(self, dir_fd: int, name: str, count: int) -> None:
        self._set(dir_fd, name, LINK_COUNT, str(count).encode())
