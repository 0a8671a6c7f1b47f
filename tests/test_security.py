"""Hostile layers and unprivileged callers: the daemon is root, the layers and users are not."""

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import mounted_cowfs

pytestmark = pytest.mark.mounts


def fingerprint(root: Path) -> dict[str, tuple]:
    """Everything about a tree that a stray write, chmod, chown or xattr would change."""
    seen = {}
    for directory, subdirectories, files in os.walk(root):
        for name in [".", *subdirectories, *files]:
            path = Path(directory, name)
            st = os.lstat(path)
            digest = hashlib.sha256(path.read_bytes()).hexdigest() \
                if stat.S_ISREG(st.st_mode) else None
            xattrs = tuple(sorted(os.listxattr(path, follow_symlinks=False)))
            seen[str(path)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                               st.st_mtime_ns, st.st_nlink, digest, xattrs)
    return seen


def test_no_operation_reaches_outside_the_layers(tmp_path: Path, layer_dirs) -> None:
    """Symlinks in a lower layer are data: the daemon never follows one."""
    lower, upper, merged, outside = layer_dirs("lower", "upper", "merged", "outside")
    (outside / "sentinel").write_text("host file")
    (outside / "dir").mkdir()
    (lower / "relative").symlink_to("../outside/sentinel")
    (lower / "absolute").symlink_to(outside / "sentinel")
    (lower / "escape").symlink_to("../../../../../../../..")
    (lower / "dirlink").symlink_to(outside / "dir")
    (lower / "new\nline").write_text("odd name")
    os.mknod(lower / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    before = fingerprint(outside)
    with mounted_cowfs([lower], merged, upper=upper,
                       extra=("--workdir", str(tmp_path / "work"))):
        for name in ("relative", "absolute", "escape", "dirlink"):
            link = merged / name
            os.chown(link, 4242, 4242, follow_symlinks=False)
            os.utime(link, ns=(1, 2), follow_symlinks=False)
            os.setxattr(link, "trusted.cowfs-test", b"x", follow_symlinks=False)
            os.link(link, merged / f"{name}-hard", follow_symlinks=False)
            os.rename(link, merged / f"{name}-moved")
            assert os.readlink(merged / f"{name}-moved") == os.readlink(lower / name)
            os.unlink(merged / f"{name}-moved")
        with pytest.raises(OSError):
            os.open(merged / "escape", os.O_RDONLY | os.O_NOFOLLOW)
        os.chmod(merged / "null", 0o600)
        assert os.lstat(merged / "null").st_rdev == os.makedev(1, 3)
        (merged / "new\nline").write_text("changed")
    assert fingerprint(outside) == before
    assert os.lstat(upper / "relative-hard").st_uid == 4242


def run_as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), user=65534, group=65534, capture_output=True,
                          text=True, check=False)


def test_unprivileged_callers_get_what_the_modes_allow(world_readable_dirs: Path) -> None:
    lower, upper, merged = (world_readable_dirs / name for name in ("lower", "upper", "merged"))
    for path in (lower, upper, merged):
        path.mkdir(mode=0o755)
    (lower / "root-file").write_text("root's")
    (lower / "open-file").write_text("anyone's")
    os.chmod(lower / "open-file", 0o666)
    (lower / "root-dir").mkdir(mode=0o755)
    (lower / "open-dir").mkdir()
    os.chmod(lower / "open-dir", 0o1777)
    with mounted_cowfs([lower], merged, upper=upper,
                       extra=("--workdir", str(world_readable_dirs / "work"))):
        refused = {
            "write a 0644 root file": ["sh", "-c", f"echo x >> '{merged}/root-file'"],
            "create in a 0755 root dir": ["touch", f"{merged}/root-dir/new"],
            "remove from a 0755 root dir": ["rm", "-f", f"{merged}/root-file"],
            "chmod a root file": ["chmod", "777", f"{merged}/root-file"],
        }
        for what, command in refused.items():
            result = run_as_nobody(*command)
            assert result.returncode != 0, what
            assert "Permission denied" in result.stderr or "not permitted" in result.stderr, what
        assert run_as_nobody("sh", "-c", f"echo more >> '{merged}/open-file'").returncode == 0
        assert (merged / "open-file").read_text() == "anyone'smore\n"
        assert os.lstat(merged / "open-file").st_uid == 0, "a copy-up keeps the owner"
        assert run_as_nobody("mkdir", f"{merged}/open-dir/mine").returncode == 0
        assert run_as_nobody("touch", f"{merged}/open-dir/mine/file").returncode == 0
        for path in (merged / "open-dir" / "mine", merged / "open-dir" / "mine" / "file"):
            assert (os.lstat(path).st_uid, os.lstat(path).st_gid) == (65534, 65534)
        assert (lower / "open-file").read_text() == "anyone's"


def test_setuid_and_setgid_bits_are_cleared_on_write_and_chown(world_readable_dirs: Path) -> None:
    lower, upper, merged = (world_readable_dirs / name for name in ("lower", "upper", "merged"))
    for path in (lower, upper, merged):
        path.mkdir(mode=0o755)
    for name in ("written", "chowned"):
        (lower / name).write_text("#!/bin/sh\n")
        os.chown(lower / name, 65534, 65534)
        os.chmod(lower / name, 0o6775)
    with mounted_cowfs([lower], merged, upper=upper,
                       extra=("--workdir", str(world_readable_dirs / "work"))):
        assert run_as_nobody("sh", "-c", f"echo x >> '{merged}/written'").returncode == 0
        assert stat.S_IMODE(os.lstat(merged / "written").st_mode) == 0o775
        os.chown(merged / "chowned", 1000, 1000)
        assert stat.S_IMODE(os.lstat(merged / "chowned").st_mode) & 0o6000 == 0
        assert run_as_nobody("chmod", "777", f"{merged}/chowned").returncode != 0


def test_an_unprivileged_user_cannot_hide_roots_file_behind_a_marker_name(
        world_readable_dirs: Path) -> None:
    """Issue 10: `touch M/tmp/.wh.rootfile` by uid 1000 hid root's file in a sticky directory,
    which `rm` by that user cannot do. Such names are refused, also after a remount."""
    lower, upper, merged = (world_readable_dirs / name for name in ("L", "U", "M"))
    (lower / "tmp").mkdir(parents=True)
    os.chmod(lower / "tmp", 0o1777)
    (lower / "tmp" / "rootfile").write_text("data\n")
    upper.mkdir()
    merged.mkdir()
    as_user = ["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups"]

    def run_as_user(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*as_user, *command], capture_output=True, text=True, check=False)

    for _ in range(2):                                  # and again after a remount
        with mounted_cowfs([lower], merged, upper=upper):
            assert run_as_user("touch", f"{merged}/tmp/mine").returncode == 0
            for command in (("touch", f"{merged}/tmp/.wh.rootfile"),
                            ("mkdir", f"{merged}/tmp/.wh..wh..opq"),
                            ("ln", "-s", "rootfile", f"{merged}/tmp/.wh.rootfile")):
                result = run_as_user(*command)
                assert result.returncode != 0 and "Invalid argument" in result.stderr, command
            # mv reads rename's EINVAL as "a subdirectory of itself"; it fails all the same.
            assert run_as_user("mv", f"{merged}/tmp/mine",
                               f"{merged}/tmp/.wh.rootfile").returncode != 0
            assert run_as_user("rm", "-f", f"{merged}/tmp/rootfile").returncode != 0
            listed = run_as_user("ls", "-A", f"{merged}/tmp")
            assert listed.stdout.split() == ["mine", "rootfile"]
            assert (merged / "tmp" / "rootfile").read_text() == "data\n"
    assert os.listdir(upper / "tmp") == ["mine"]
