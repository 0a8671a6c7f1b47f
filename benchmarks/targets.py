"""The filesystems under test: how each one is mounted fresh and always unmounted.

Every measurement gets a fresh mount in a fresh directory (new upper and workdir), so a copy-up
never finds the work of an earlier one, and the kernel overlayfs never sees a reused workdir.
Mounts are recorded in ACTIVE_MOUNTS while they live; `unmount_all_active` (atexit, signals)
removes what an interrupted run leaves.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MOUNT_TIMEOUT_S = 30.0
STATS_XATTR = "trusted.cowfs.stats"

KINDS = ("native", "overlay", "fuse-overlayfs", "cowfs")
# Named targets: kind and mount options. `cowfs:OPTS` names any other cowfs variant.
NAMED_TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "native": ("native", ()),
    "overlay": ("overlay", ()),
    "overlay-metacopy": ("overlay", ("metacopy=on",)),
    "overlay-volatile": ("overlay", ("volatile",)),
    "fuse-overlayfs": ("fuse-overlayfs", ()),
    "cowfs": ("cowfs", ()),
    "cowfs-strict": ("cowfs", ("fsync=strict",)),
    "cowfs-batch": ("cowfs", ("fsync=batch",)),
    "cowfs-volatile": ("cowfs", ("fsync=volatile",)),
    # On libfuse 3.17 (scripts/cowfs-on-libfuse-3.17), with FUSE passthrough.
    "cowfs-passthrough": ("cowfs-3.17", ("passthrough=on",)),
}
# cowfs from this source tree on libfuse 3.17, built beside the machine's libfuse.
COWFS_ON_LIBFUSE_317 = (Path(__file__).resolve().parent.parent / "scripts"
                        / "cowfs-on-libfuse-3.17")
DEFAULT_TARGETS = ("native", "overlay", "overlay-metacopy", "overlay-volatile",
                   "fuse-overlayfs", "cowfs")
# Included by default only when this cowfs accepts its options (see probe_cowfs_options).
OPTIONAL_DEFAULT_TARGETS = ("cowfs-strict",)

ACTIVE_MOUNTS: set[str] = set()


@dataclass(frozen=True)
class Target:
    """One column of the results: a kind of filesystem and the options it is mounted with."""

    name: str
    kind: str
    options: tuple[str, ...] = ()
    on_libfuse_317: bool = False    # cowfs through scripts/cowfs-on-libfuse-3.17

    @property
    def is_native(self) -> bool:
        return self.kind == "native"


def parse_target(name: str) -> Target:
    """`overlay-metacopy`, `cowfs-strict`, ... or `cowfs:fsync=batch,OPT` for cowfs with -o OPTS
    (`cowfs-3.17:OPTS`: on libfuse 3.17)."""
    if name in NAMED_TARGETS:
        kind, options = NAMED_TARGETS[name]
    else:
        kind, _, listed = name.partition(":")
        options = tuple(option for option in listed.split(",") if option)
        if kind not in ("cowfs", "cowfs-3.17", "overlay", "fuse-overlayfs") or not options:
            known = ", ".join(NAMED_TARGETS)
            raise ValueError(f"unknown target {name!r} (known: {known}, or cowfs:OPTIONS, "
                             f"cowfs-3.17:OPTIONS)")
    if kind == "cowfs-3.17":
        return Target(name, "cowfs", options, on_libfuse_317=True)
    return Target(name, kind, options)


@dataclass
class Tools:
    """Where the programs the targets need are; None when missing."""

    cowfs: str | None
    fuse_overlayfs: str | None


def find_cowfs() -> str | None:
    """The `cowfs` script installed beside this interpreter (the .venv), else on PATH."""
    beside = Path(sys.executable).parent / "cowfs"
    if beside.exists():
        return str(beside)
    return shutil.which("cowfs")


def has_kernel_overlay() -> bool:
    if "overlay" not in Path("/proc/filesystems").read_text():
        subprocess.run(["modprobe", "overlay"], capture_output=True, check=False)
    return "overlay" in Path("/proc/filesystems").read_text()


def unavailable_reason(target: Target, tools: Tools) -> str | None:
    """Why *target* cannot run on this machine, or None."""
    if target.kind == "overlay" and not has_kernel_overlay():
        return "the kernel has no overlay filesystem"
    if target.kind == "fuse-overlayfs" and tools.fuse_overlayfs is None:
        return "fuse-overlayfs is not installed (scripts/install.sh installs it)"
    if target.kind == "cowfs" and tools.cowfs is None:
        return "the cowfs command is missing (run scripts/install.sh)"
    if (target.kind in ("overlay", "fuse-overlayfs", "cowfs")) and os.geteuid() != 0:
        return "mounting needs root"
    return None


def _decode_mountinfo_path(field_text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field_text)


def mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        return {_decode_mountinfo_path(line.split()[4]) for line in mountinfo}


def is_mounted(path: str | os.PathLike[str]) -> bool:
    return os.path.realpath(path) in mount_points()


def wait_mounted(path: Path, what: str) -> None:
    """Poll mountinfo: fuse-overlayfs may return before its mount shows."""
    deadline = time.monotonic() + MOUNT_TIMEOUT_S
    delay = 0.001
    while not is_mounted(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not mount at {path}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def unmount_quietly(path: str | os.PathLike[str], command: list[str] | None = None) -> None:
    """Unmount with *command* (else umount), then lazily if still busy; never raises."""
    attempts = [command] if command else []
    attempts += [["umount", str(path)], ["umount", "-l", str(path)]]
    for attempt in attempts:
        if not is_mounted(path):
            break
        subprocess.run(attempt, capture_output=True, check=False)
    ACTIVE_MOUNTS.discard(os.path.realpath(path))


def unmount_all_active() -> None:
    """Remove every mount this run still has (atexit, and after a signal)."""
    for path in sorted(ACTIVE_MOUNTS, reverse=True):
        unmount_quietly(path)


def daemon_pids(merged: Path) -> list[int]:
    """The FUSE daemons serving *merged*: processes with it on their command line."""
    needle = os.fsencode(merged)
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                arguments = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                if needle in arguments:
                    pids.append(int(entry))
    return pids


def wait_exited(pids: list[int]) -> None:
    """Wait for daemons to finish exiting after the unmount.

    A cowfs daemon still tearing down made the next measurement up to 5x slower (the native
    sequential read, always measured right after cowfs, seemed slower than overlayfs).
    """
    deadline = time.monotonic() + MOUNT_TIMEOUT_S
    for pid in pids:
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
                    break     # a zombie whose parent reaps it later: it has exited
            time.sleep(0.005)


def escape_lowers(lowers: list[Path], *, commas: bool) -> str:
    """`a:b` with `\\:` (and `\\,` inside a -o list) escaped, as overlayfs and cowfs read it."""
    def escape(path: Path) -> str:
        text = str(path).replace("\\", "\\\\").replace(":", "\\:")
        return text.replace(",", "\\,") if commas else text
    return ":".join(escape(path) for path in lowers)


@dataclass
class Mounted:
    """A live mount: the merged view, its upper (None for native), scratch space beside it."""

    target: Target
    merged: Path
    upper: Path | None
    scratch: Path
    tools: Tools

    def read_cowfs_stats(self) -> dict[str, object] | None:
        """The copy-up statistics cowfs exposes on its root, if this cowfs has them."""
        if self.target.kind != "cowfs":
            return None
        try:
            raw = os.getxattr(self.merged, STATS_XATTR)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                return None
            return {"error": str(exc)}
        try:
            stats = json.loads(raw)
        except ValueError:
            return {"error": f"not JSON: {raw[:80]!r}"}
        return stats if isinstance(stats, dict) else {"value": stats}


def _run_checked(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(f"{what} failed ({result.returncode}): "
                           f"{detail[-1] if detail else ''}")


def _mount_command(target: Target, tools: Tools, lowers: list[Path], upper: Path,
                   work: Path, merged: Path) -> tuple[list[str], list[str] | None]:
    """The command that mounts *target*, and the one that unmounts it."""
    if target.kind == "overlay":
        options = [f"lowerdir={escape_lowers(lowers, commas=True)}", f"upperdir={upper}",
                   f"workdir={work}", *target.options]
        return (["mount", "-t", "overlay", "overlay", "-o", ",".join(options), str(merged)],
                None)
    if target.kind == "fuse-overlayfs":
        assert tools.fuse_overlayfs
        options = [f"lowerdir={escape_lowers(lowers, commas=True)}", f"upperdir={upper}",
                   f"workdir={work}", *target.options]
        return ([tools.fuse_overlayfs, "-o", ",".join(options), str(merged)],
                ["fusermount3", "-u", str(merged)])
    if target.kind == "cowfs":
        assert tools.cowfs
        extra = ["-o", ",".join(target.options)] if target.options else []
        cowfs = str(COWFS_ON_LIBFUSE_317) if target.on_libfuse_317 else tools.cowfs
        return ([cowfs, "mount", *extra, "--workdir", str(work),
                 escape_lowers(lowers, commas=False), str(upper), str(merged)],
                [tools.cowfs, "umount", str(merged)])
    raise ValueError(f"not a mountable kind: {target.kind}")


@contextlib.contextmanager
def mounted(target: Target, tools: Tools, lowers: list[Path], native_tree: Path,
            base: Path) -> Iterator[Mounted]:
    """Mount *target* over *lowers* in a fresh directory under *base*; always unmounted.

    Native has nothing to mount: its merged view is *native_tree*, the flattened copy.
    """
    root = Path(tempfile.mkdtemp(prefix=f"{target.name.replace(':', '_')}-", dir=base))
    scratch = root / "scratch"
    scratch.mkdir()
    unmount_command: list[str] | None = None
    merged = native_tree
    daemons: list[int] = []
    try:
        if target.is_native:
            yield Mounted(target, native_tree, None, scratch, tools)
            return
        upper, work, merged = root / "upper", root / "work", root / "merged"
        for path in (upper, work, merged):
            path.mkdir()
        command, unmount_command = _mount_command(target, tools, lowers, upper, work, merged)
        ACTIVE_MOUNTS.add(os.path.realpath(merged))
        _run_checked(command, f"mounting {target.name}")
        wait_mounted(merged, target.name)
        daemons = daemon_pids(merged)
        yield Mounted(target, merged, upper, scratch, tools)
    finally:
        if not target.is_native:
            unmount_quietly(merged, unmount_command)
            wait_exited(daemons)
        shutil.rmtree(root, ignore_errors=True)


def probe_cowfs_options(target: Target, tools: Tools, base: Path) -> str | None:
    """Mount a one-file stack with the target's options: None if accepted, else why not."""
    if tools.cowfs is None:
        return "the cowfs command is missing"
    probe = Path(tempfile.mkdtemp(prefix="probe-", dir=base))
    try:
        lower = probe / "lower"
        lower.mkdir()
        (lower / "file").write_bytes(b"probe")
        with mounted(target, tools, [lower], lower, probe):
            return None
    except RuntimeError as exc:
        return str(exc)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
