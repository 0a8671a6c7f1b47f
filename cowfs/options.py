"""The `-o` vocabulary: cowfs's own options, fuse-overlayfs's, the kernel overlay's and mount(8)'s.

Container tools call a mount program with fuse-overlayfs's options, and mount(8) through
mount.fuse3 adds its own, so cowfs accepts all of them: each is either honoured, or ignored
(cowfs always works that way, or the option tunes something cowfs does not have), with a debug
log. Anything else is refused with a one-line error, so a typo never passes silently.
"""

import dataclasses
from collections.abc import Sequence

from cowfs import durability, whiteout
from cowfs.daemon import MountOptions
from cowfs.idmap import IdMap, MappingError, parse_mapping

# Honoured options that take a value, and what the value looks like.
VALUED = {"lowerdir": "DIRS", "upperdir": "DIR", "workdir": "DIR", "fsname": "NAME",
          "fsync": "strict|batch|volatile", "uidmapping": "A:B:N[:A:B:N...]",
          "gidmapping": "A:B:N[:A:B:N...]", "squash_to_uid": "UID", "squash_to_gid": "GID",
          "metacopy": "on|off", "redirect_dir": "on|follow|off|nofollow", "index": "on|off",
          "kernel_caches": "on|off", "readdirplus": "yes|auto", "writeback": "0|1",
          "passthrough": "on|off", "request_poll": "on|off"}
# Honoured flags.
FLAGS = {"nonempty", "ro", "userxattr", "volatile", "debug", "squash_to_root", "watch"}
# Passed on to the kernel as mount flags.
KERNEL_FLAGS = {"nosuid", "nodev", "noexec", "noatime", "sync", "dirsync"}
# Accepted and ignored: cowfs always mounts this way, or has nothing the option would tune.
IGNORED_FLAGS = {
    "default_permissions", "allow_other", "allow_root", "rw", "suid", "dev", "exec", "atime",
    "relatime", "norelatime", "strictatime", "nostrictatime", "diratime", "nodiratime",
    "lazytime", "nolazytime", "async", "defaults", "auto", "noauto", "user", "nouser", "users",
    "owner", "group", "nofail", "_netdev", "static_nlink", "noacl", "auto_unmount"}
IGNORED_VALUED = {
    # fuse-overlayfs: its caches, threads, plugins and xattr handling
    "timeout", "threaded", "fast_ino", "noxattrs", "plugins", "xattr_permissions",
    # SELinux labels (cowfs passes xattrs through)
    "context", "fscontext", "defcontext", "rootcontext",
    # the kernel overlay's inode-number and export schemes (cowfs numbers inodes its own way)
    "xino", "nfs_export", "uuid",
    # libfuse's tuning
    "max_read", "blksize", "subtype"}


class OptionError(ValueError):
    """A malformed or unknown option; the message names it."""


@dataclasses.dataclass
class ParsedOptions:
    lowerdir: str | None = None
    upperdir: str | None = None
    workdir: str | None = None
    nonempty: bool = False
    userxattr: bool = False
    debug: bool = False
    mount: MountOptions = dataclasses.field(default_factory=MountOptions)
    ignored: list[str] = dataclasses.field(default_factory=list)
    format: whiteout.FormatOptions = dataclasses.field(default_factory=whiteout.FormatOptions)


def parse(values: Sequence[str], *, is_root: bool = True) -> ParsedOptions:
    """`-o a,b=c` (repeatable; empty elements allowed, as containers-storage writes them)."""
    settings: dict[str, str] = {}
    flags: set[str] = set()
    parsed = ParsedOptions()
    for value in values:
        for item in value.split(","):
            if not item:
                continue
            key, has_value, argument = item.partition("=")
            if key in VALUED and has_value:
                settings[key] = argument
            elif key in FLAGS | KERNEL_FLAGS and not has_value:
                flags.add(key)
            elif (key in IGNORED_FLAGS and not has_value) or key in IGNORED_VALUED \
                    or key.startswith("x-"):
                parsed.ignored.append(item)
            elif key in VALUED or key in FLAGS | KERNEL_FLAGS:
                form = f"{key}={VALUED[key]}" if key in VALUED else key
                raise OptionError(f"malformed mount option {item!r}: expected {form}")
            else:
                raise OptionError(f"unknown mount option {item!r}")
    parsed.lowerdir = settings.get("lowerdir")
    parsed.upperdir = settings.get("upperdir")
    parsed.workdir = settings.get("workdir")
    parsed.nonempty = "nonempty" in flags
    parsed.userxattr = "userxattr" in flags
    parsed.debug = "debug" in flags
    parsed.format = _format_options(settings)
    parsed.mount = MountOptions(
        readonly="ro" in flags, fsname=settings.get("fsname") or "cowfs",
        fsync=_fsync_mode(settings.get("fsync"), volatile="volatile" in flags),
        uids=_id_map(settings, "uid", squash_to_root="squash_to_root" in flags),
        gids=_id_map(settings, "gid", squash_to_root="squash_to_root" in flags),
        kernel_flags=frozenset(_kernel_flags(flags, is_root=is_root)),
        kernel_caches=_switch(settings, "kernel_caches", ("on", "off"), "on", default=True),
        plain_listings=_switch(settings, "readdirplus", ("yes", "auto"), "auto",
                               default=False),
        writeback_cache=_switch(settings, "writeback", ("0", "1"), "1", default=False),
        passthrough=_switch(settings, "passthrough", ("on", "off"), "on", default=False),
        request_poll=_switch(settings, "request_poll", ("on", "off"), "on", default=True),
        watch="watch" in flags)
    if conflict := parsed.mount.conflict():
        raise OptionError(conflict)
    return parsed


def _switch(settings: dict[str, str], key: str, spelled: tuple[str, str], on: str, *,
            default: bool) -> bool:
    """A two-valued option, spelled as where it comes from spells it: cowfs's
    `kernel_caches=on|off`, libfuse's `readdirplus=yes|auto` (auto: plain listings where the
    kernel wants no attributes; docs/ARCHITECTURE.md says why yes is the default),
    fuse-overlayfs's `writeback=0|1`."""
    if key not in settings:
        return default
    if settings[key] not in spelled:
        raise OptionError(f"malformed mount option '{key}={settings[key]}': expected "
                          f"{key}={spelled[0]}|{spelled[1]}")
    return settings[key] == on


def _fsync_mode(value: str | None, *, volatile: bool) -> str:
    if volatile:
        return durability.VOLATILE
    if value is None:
        return durability.BATCH
    # fuse-overlayfs's fsync=0 skips every fsync, as volatile does; fsync=1 is its default.
    mode = {"0": durability.VOLATILE, "1": durability.BATCH}.get(value, value)
    if mode not in durability.MODES:
        raise OptionError(f"malformed mount option 'fsync={value}': "
                          f"expected fsync=strict|batch|volatile")
    return mode


def _format_options(settings: dict[str, str]) -> whiteout.FormatOptions:
    def on_off(key: str) -> bool | None:
        if key not in settings:
            return None
        if settings[key] not in ("on", "off"):
            raise OptionError(f"malformed mount option '{key}={settings[key]}': "
                              f"expected {key}=on|off")
        return settings[key] == "on"

    redirect = settings.get("redirect_dir")
    if redirect is not None and redirect not in whiteout.REDIRECT_MODES:
        raise OptionError(f"malformed mount option 'redirect_dir={redirect}': "
                          f"expected redirect_dir={VALUED['redirect_dir']}")
    try:
        return whiteout.FormatOptions.from_options(
            metacopy=on_off("metacopy"), redirect_dir=redirect, index=on_off("index"))
    except ValueError as exc:
        raise OptionError(str(exc)) from None


def _id_map(settings: dict[str, str], kind: str, *, squash_to_root: bool) -> IdMap:
    option = f"{kind}mapping"
    try:
        ranges = parse_mapping(settings[option], option) if option in settings else ()
    except MappingError as exc:
        raise OptionError(str(exc)) from None
    squash_option = f"squash_to_{kind}"
    squash: int | None = 0 if squash_to_root else None
    if squash_option in settings:
        try:
            squash = int(settings[squash_option])
        except ValueError:
            raise OptionError(f"malformed mount option "
                              f"'{squash_option}={settings[squash_option]}': "
                              f"expected {squash_option}={kind.upper()}") from None
    return IdMap(ranges, squash)


def _kernel_flags(flags: set[str], *, is_root: bool) -> set[str]:
    """The flags for the kernel; as root, set-user-id files and devices work as on the
    kernel's overlay (libfuse's default is nosuid,nodev) unless asked otherwise."""
    chosen = flags & KERNEL_FLAGS
    if is_root:
        chosen |= {"suid"} if "nosuid" not in chosen else set()
        chosen |= {"dev"} if "nodev" not in chosen else set()
    return chosen
