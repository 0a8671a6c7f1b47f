"""The on-disk format: whiteouts, opaque directories and overlay's private xattrs, every dialect.

Read side of the kernel overlayfs format (notes/kernel-format.md) and of the OCI/aufs one:

- whiteout: a character device 0/0; an empty regular file carrying `overlay.whiteout` in a
  directory marked `overlay.opaque=x`; an OCI `.wh.NAME` file beside where NAME would be.
- opaque directory: `overlay.opaque=y`, or an OCI `.wh..wh..opq` file inside it.

`overlay.` xattrs are read under both `trusted.` (the kernel's default) and `user.` (the kernel's
`userxattr` mode, used by unprivileged mounts).
"""

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
LINK_COUNT = "cowfs.nlink"   # the merged view's link count of an indexed file


class Opacity(enum.Enum):
    """What a layer's directory says about the layers below it."""

    MERGED = "merged"          # lower layers show through
    OPAQUE = "opaque"          # lower layers are hidden
    XWHITEOUTS = "xwhiteouts"  # lower layers show through; holds xattr whiteouts (opaque=x)


def is_oci_name(name: str) -> bool:
    """Names of the OCI dialect's markers, never shown in the merged view."""
    return name.startswith(OCI_WHITEOUT_PREFIX)


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


def directory_opacity(fd: int) -> Opacity:
    """Read the opaque markers of the directory open as *fd* (an O_PATH fd is enough)."""
    value = read_overlay_xattr(fd, None, OPAQUE)
    if value == b"y":
        return Opacity.OPAQUE
    if _at.exists(fd, OCI_OPAQUE_MARKER):
        return Opacity.OPAQUE
    if value == b"x":
        return Opacity.XWHITEOUTS
    return Opacity.MERGED


def is_private_xattr(attribute: str) -> bool:
    """overlay's bookkeeping, hidden from users (its escaped form is shown, see below)."""
    return attribute.startswith(OVERLAY_XATTR_PREFIXES)


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


def own_xattr_prefix() -> str:
    """Where cowfs writes overlay xattrs: `trusted.` as root, as the kernel does; `user.` else."""
    return OVERLAY_XATTR_PREFIXES[0] if os.geteuid() == 0 else OVERLAY_XATTR_PREFIXES[1]


def read_origin_ino(dir_fd: int, name: str | None) -> int | None:
    """The inode number recorded at copy-up in an upper copy, if any."""
    value = read_overlay_xattr(dir_fd, name, ORIGIN_INO)
    try:
        return int(value) if value else None
    except ValueError:
        return None


def is_metacopy(dir_fd: int, name: str) -> bool:
    """An upper file that holds metadata only: its data is in the lower copy."""
    return read_overlay_xattr(dir_fd, name, METACOPY) is not None


def set_metacopy(dir_fd: int, name: str) -> None:
    os.setxattr(_at.fd_path(dir_fd, name), own_xattr_prefix() + METACOPY, b"",
                follow_symlinks=False)


def clear_metacopy(dir_fd: int, name: str) -> None:
    for attribute in (own_xattr_prefix() + METACOPY, own_xattr_prefix() + REDIRECT):
        try:
            os.removexattr(_at.fd_path(dir_fd, name), attribute, follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise


def make_whiteout(dir_fd: int, name: str) -> None:
    """A character device 0/0: the one whiteout dialect every overlay reader knows."""
    os.mknod(name, stat.S_IFCHR | 0o000, 0, dir_fd=dir_fd)


def set_opaque(dir_fd: int, name: str | None) -> None:
    os.setxattr(_at.fd_path(dir_fd, name), own_xattr_prefix() + OPAQUE, b"y",
                follow_symlinks=name is None)


def record_origin_ino(dir_fd: int, name: str | None, ino: int) -> None:
    os.setxattr(_at.fd_path(dir_fd, name), own_xattr_prefix() + ORIGIN_INO, str(ino).encode(),
                follow_symlinks=name is None)


def read_link_count(dir_fd: int, name: str) -> int | None:
    value = read_overlay_xattr(dir_fd, name, LINK_COUNT)
    try:
        return int(value) if value else None
    except ValueError:
        return None


def write_link_count(dir_fd: int, name: str, count: int) -> None:
    os.setxattr(_at.fd_path(dir_fd, name), own_xattr_prefix() + LINK_COUNT, str(count).encode(),
                follow_symlinks=False)
