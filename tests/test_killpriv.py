"""FUSE_HANDLE_KILLPRIV_V2 on libfuse 3.17 (opt-in: tests/libfuse317.py): cowfs kills suid and
sgid itself, as the kernel's VFS would, and the kernel stops asking security.capability
before every write.

The oracle is the kernel's overlayfs over the same layers: each change, by an unprivileged
user or by root, must leave the same mode, owner and security.capability on the same files.
"""

import contextlib
import errno
import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import kernel_overlay, mounted_cowfs
from libfuse317 import REQUIRED, launcher

pytestmark = REQUIRED

USER = 1000
AS_USER = ["setpriv", "--reuid", str(USER), "--regid", str(USER), "--clear-groups"]
CAPABILITY_XATTR = "security.capability"
# cap_net_raw in the permitted and effective sets (struct vfs_cap_data, revision 2).
CAPABILITY = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)

# name: mode, owner, group, whether it has a file capability. All writable by the user; the
# user (no supplementary groups) is in group USER only.
FILES = {
    "setuid": (0o4777, 0, 0, False),
    "setgid-group-exec": (0o2777, 0, 0, False),
    "setgid": (0o2666, 0, 0, False),                 # no group-execute, not the user's group
    "setgid-users-group": (0o2666, 0, USER, False),  # no group-execute, the user's group
    "setuid-setgid-users": (0o6777, USER, 0, False),  # the user's own: it may chgrp it
    "capability": (0o777, 0, 0, True),
    "capability-setuid-users": (0o4777, USER, 0, True),
    "plain": (0o666, 0, 0, False),
}

# The change each case makes to every file, run in a child (as the user or as root); errors
# are part of the result (the user may chgrp only its own files).
CHANGES = {
    "write": "fd = os.open(path, os.O_WRONLY); os.write(fd, b'changed'); os.close(fd)",
    # More than a page: a request libfuse may splice into a pipe (where its kill flag could
    # not be read) unless splicing is off, as cowfs turns it with killpriv_v2.
    "write-large": "fd = os.open(path, os.O_WRONLY); os.write(fd, bytes(65536)); os.close(fd)",
    "ftruncate": "fd = os.open(path, os.O_WRONLY); os.ftruncate(fd, 3); os.close(fd)",
    "truncate": "os.truncate(path, 2)",
    "open-truncate": "os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))",
    "chgrp": f"os.chown(path, -1, {USER})",
    "chown": f"os.chown(path, {USER}, {USER})",
}
CHILD = """
import json, os, sys
errors = {}
for name in sys.argv[2:]:
    path = os.path.join(sys.argv[1], name)
    try:
        CHANGE
    except OSError as exc:
        errors[name] = exc.errno
print(json.dumps(errors))
"""


def make_files(directory: Path) -> None:
    for name, (mode, uid, gid, capability) in FILES.items():
        path = directory / name
        path.write_bytes(b"#!/bin/sh\nexit 0\n")
        os.chown(path, uid, gid)
        os.chmod(path, mode)
        if capability:     # last: a chown would remove it
            os.setxattr(path, CAPABILITY_XATTR, CAPABILITY)


def capability_of(path: Path) -> bytes | None:
    try:
        return os.getxattr(path, CAPABILITY_XATTR, follow_symlinks=False)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise
        return None


def describe(directory: Path) -> dict[str, tuple[int, int, int, int, bytes | None] | None]:
    """What the change must leave alike: mode, owner, size and file capability of each file
    (None: not there, as a file in an upper layer that was never copied up)."""
    shown: dict[str, tuple[int, int, int, int, bytes | None] | None] = {}
    for name in FILES:
        try:
            st = os.lstat(directory / name)
        except FileNotFoundError:
            shown[name] = None
            continue
        shown[name] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                       capability_of(directory / name))
    return shown


def change(merged: Path, case: str, *, as_user: bool) -> dict[str, int]:
    code = CHILD.replace("CHANGE", CHANGES[case])
    command = [*(AS_USER if as_user else []), sys.executable, "-c", code, str(merged), *FILES]
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
    return json.loads(result.stdout)


def statistics(merged: Path) -> dict:
    return json.loads(os.getxattr(merged, "trusted.cowfs.stats"))


@contextlib.contextmanager
def layers(root: Path, kind: str, placed: str) -> Iterator[tuple[Path, Path, Path]]:
    """lower, upper and merged under *root*/*kind*, the files in the *placed* layer."""
    lower, upper, merged = (root / kind / name for name in ("lower", "upper", "merged"))
    for path in (lower, upper, merged):
        path.mkdir(parents=True, mode=0o755)
    (root / kind).chmod(0o755)
    make_files(lower if placed == "lower" else upper)
    yield lower, upper, merged


def run_case(root: Path, package: Path, case: str, placed: str, *, as_user: bool
             ) -> tuple[dict, dict]:
    """The change on cowfs and on the kernel's overlay: what each shows, merged and in its
    upper layer after unmounting, and cowfs's statistics."""
    results = {}
    stats: dict = {}
    for kind in ("cowfs", "overlay"):
        with layers(root, kind, placed) as (lower, upper, merged):
            mount = (mounted_cowfs([lower], merged, upper, launcher=launcher(package))
                     if kind == "cowfs" else kernel_overlay([lower], merged, upper))
            with mount:
                errors = change(merged, case, as_user=as_user)
                shown = describe(merged)
                if kind == "cowfs":
                    stats = statistics(merged)
            results[kind] = {"errors": errors, "merged": shown, "upper": describe(upper)}
    return results, stats


@pytest.mark.parametrize("placed", ["lower", "upper"])
@pytest.mark.parametrize("case", ["write", "write-large", "ftruncate", "truncate",
                                  "open-truncate", "chgrp"])
def test_an_unprivileged_change_kills_what_the_kernel_kills(
        world_readable_dirs: Path, package_317: Path, case: str, placed: str) -> None:
    results, stats = run_case(world_readable_dirs, package_317, case, placed, as_user=True)
    assert results["cowfs"] == results["overlay"]
    assert stats["kernel_features"]["killpriv_v2"], stats["kernel_features"]
    # The kernel told cowfs, and cowfs itself removed bits: the comparison is not the
    # kernel's own kill passing twice.
    assert stats["kill_requests"] >= 1 and stats["privileges_killed"] >= 1, stats
    if case != "chgrp":
        # A file without group-execute keeps sgid in the writer's group, loses it outside.
        assert results["cowfs"]["merged"]["setgid-users-group"][0] & 0o2000
        assert not results["cowfs"]["merged"]["setgid"][0] & 0o2000
        assert not results["cowfs"]["merged"]["setuid"][0] & 0o4000


@pytest.mark.parametrize("placed", ["lower", "upper"])
@pytest.mark.parametrize("case", ["write", "truncate", "open-truncate", "chown"])
def test_roots_change_kills_what_the_kernel_kills(
        world_readable_dirs: Path, package_317: Path, case: str, placed: str) -> None:
    """Root has CAP_FSETID: its writes and truncates keep suid and sgid (the kernel sends no
    kill), its chown does not (the kernel always asks)."""
    results, stats = run_case(world_readable_dirs, package_317, case, placed, as_user=False)
    assert results["cowfs"] == results["overlay"]
    setuid_kept = bool(results["cowfs"]["merged"]["setuid"][0] & 0o4000)
    if case == "chown":
        assert not setuid_kept and stats["kill_requests"] >= len(FILES)
    else:
        assert setuid_kept and stats["kill_requests"] == 0, stats


WRITES = 50


def write_often(merged: Path) -> dict[str, int]:
    """WRITES write(2) calls to one new file: the requests they cost."""
    before = statistics(merged)["requests"]
    with open(merged / "often", "wb", buffering=0) as file:
        for _ in range(WRITES):
            file.write(b"x" * 100)
    after = statistics(merged)["requests"]
    return {name: after.get(name, 0) - before.get(name, 0) for name in after}


def test_writes_no_longer_ask_for_the_capability_each(package_317: Path, layer_dirs) -> None:
    """On 3.14 every write(2) costs a getxattr of security.capability; with killpriv_v2 the
    kernel asks once per file (SB_NOSEC)."""
    lower, upper, merged = layer_dirs("lower", "upper", "merged")
    with mounted_cowfs([lower], merged, upper, launcher=launcher(package_317)):
        assert statistics(merged)["kernel_features"]["killpriv_v2"]
        with_v2 = write_often(merged)
    (upper / "often").unlink()
    with mounted_cowfs([lower], merged, upper):           # libfuse 3.14: no killpriv_v2
        assert not statistics(merged)["kernel_features"]["killpriv_v2"]
        without = write_often(merged)
    assert with_v2["write"] >= WRITES and without["write"] >= WRITES, (with_v2, without)
    # One getxattr is the statistics read itself.
    assert without["getxattr"] >= WRITES, without
    assert with_v2["getxattr"] <= 3, with_v2
