"""cowfs as a drop-in mount program: fuse-overlayfs's argument form, mount(8), fstab, id maps."""

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import cowfs_command, is_mounted, unmount_quietly, wait_until

pytestmark = pytest.mark.mounts

COWFS = os.path.join(os.path.dirname(sys.executable), "cowfs")


def mount_program(*arguments: str) -> subprocess.CompletedProcess[str]:
    """Run as containers-storage does: stdin and stdout /dev/null, stderr a pipe read to EOF
    (so a daemon that kept stderr open would hang this call)."""
    return subprocess.run(cowfs_command(*arguments), stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=60, check=False)


def daemon_of(merged: Path) -> int:
    title = f"cowfs daemon {merged}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == title:
                return int(pid)
    raise AssertionError(f"no daemon serves {merged}")


@contextlib.contextmanager
def unmounted_after(merged: Path) -> Iterator[None]:
    try:
        yield
    finally:
        unmount_quietly(merged)


@pytest.fixture
def layers(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("top", "bottom", "upper", "work", "merged")}
    for path in paths.values():
        path.mkdir()
    (paths["top"] / "file").write_text("top")
    (paths["bottom"] / "file").write_text("bottom")
    (paths["bottom"] / "only-bottom").write_text("bottom")
    # containers-storage names layers by symlinks: l/<id> -> ../<layer>/diff
    (tmp_path / "l").mkdir()
    (tmp_path / "l" / "TOPLINK").symlink_to("../top")
    return paths


def test_the_fuse_overlayfs_form_as_containers_storage_calls_it(layers: dict[str, Path]
                                                                 ) -> None:
    merged = layers["merged"]
    options = (f"lowerdir={layers['top'].parent / 'l' / 'TOPLINK'}:{layers['bottom']},"
               f"upperdir={layers['upper']},workdir={layers['work']},,volatile,"
               f"xattr_permissions=2,context=\"system_u:object_r:container_file_t:s0\",")
    with unmounted_after(merged):
        result = mount_program("-o", options, str(merged))
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert is_mounted(merged, "fuse.cowfs")
        assert (merged / "file").read_text() == "top"
        (merged / "only-bottom").write_text("changed")
        assert (layers["upper"] / "only-bottom").read_text() == "changed"
        daemon = daemon_of(merged)
        for fd in (0, 1, 2):
            assert os.readlink(f"/proc/{daemon}/fd/{fd}") == "/dev/null"
        assert os.getsid(daemon) == daemon, "the daemon detached into its own session"
        subprocess.run(["fusermount3", "-u", str(merged)], check=True)
        wait_until(lambda: not Path(f"/proc/{daemon}").exists(),
                   what="the daemon to end after fusermount3 -u")


def test_every_layer_is_open_before_the_command_returns(layers: dict[str, Path],
                                                        tmp_path: Path) -> None:
    """containers-storage may detach a layer's mount right after the mount program exits."""
    bound = tmp_path / "bound"
    bound.mkdir()
    subprocess.run(["mount", "--bind", str(layers["bottom"]), str(bound)], check=True)
    merged = layers["merged"]
    try:
        with unmounted_after(merged):
            result = mount_program("-o", f"lowerdir={layers['top']}:{bound}", str(merged))
            assert result.returncode == 0, result.stderr
            subprocess.run(["umount", "-l", str(bound)], check=True)
            assert (merged / "only-bottom").read_text() == "bottom"
    finally:
        unmount_quietly(bound)


def test_without_upperdir_the_mount_is_read_only(layers: dict[str, Path]) -> None:
    merged = layers["merged"]
    with unmounted_after(merged):
        result = mount_program("-o", f"lowerdir={layers['top']}:{layers['bottom']}",
                               str(merged))
        assert result.returncode == 0, result.stderr
        with pytest.raises(OSError, match="Read-only file system"):
            (merged / "new").write_text("no")


def test_the_foreground_form_serves_until_unmounted(layers: dict[str, Path]) -> None:
    merged = layers["merged"]
    process = subprocess.Popen(cowfs_command("-f", "-o", f"lowerdir={layers['top']}",
                                             str(merged)), stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: is_mounted(merged, "fuse.cowfs"), what="the foreground mount")
        assert (merged / "file").read_text() == "top"
        subprocess.run(["fusermount3", "-u", str(merged)], check=True)
        assert process.wait(timeout=30) == 0
    finally:
        unmount_quietly(merged)
        process.kill()
        process.wait(timeout=30)


@pytest.mark.parametrize(("options", "message"), [
    ("lowerdir={top},bogus", "unknown mount option 'bogus'"),
    ("lowerdir={top},uidmapping=0:100000", "uidmapping=0:100000: expected triples "
                                           "A:B:N[:A:B:N...]"),
    ("lowerdir={top},gidmapping=0:x:1", "gidmapping=0:x:1: expected numbers A:B:N[:A:B:N...]"),
    ("lowerdir={top},squash_to_uid=root", "malformed mount option 'squash_to_uid=root': "
                                          "expected squash_to_uid=UID"),
    ("upperdir={top}", "missing mount option lowerdir=DIRS"),
    ("lowerdir={top},workdir={top}", "workdir= needs upperdir="),
    ("lowerdir={top}:{missing}", "does not exist"),
])
def test_bad_options_get_one_line_and_exit_2(layers: dict[str, Path], options: str,
                                             message: str) -> None:
    text = options.format(top=layers["top"], missing=layers["top"].parent / "missing")
    result = mount_program("-o", text, str(layers["merged"]))
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not is_mounted(layers["merged"])


def test_version_is_answered() -> None:
    result = subprocess.run([COWFS, "--version"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.startswith("cowfs ")


def test_uid_and_gid_mappings(world_readable_dirs: Path) -> None:
    """Disk ids 0.. show as 100000..; what view id 100000 creates is owned by 0 on disk."""
    lower, upper, work, merged = (world_readable_dirs / name
                                  for name in ("lower", "upper", "work", "merged"))
    for path in (lower, upper, work, merged):
        path.mkdir()
    (lower / "owned-by-0").write_text("root's")
    (lower / "owned-by-5").write_text("five's")
    os.chown(lower / "owned-by-5", 5, 5)
    (lower / "owned-by-70000").write_text("unmapped")
    os.chown(lower / "owned-by-70000", 70000, 70000)
    mapping = "0:100000:65536"
    with unmounted_after(merged):
        result = mount_program("-o", f"lowerdir={lower},upperdir={upper},workdir={work},"
                               f"uidmapping={mapping},gidmapping=:{mapping}", str(merged))
        assert result.returncode == 0, result.stderr
        owners = {name: (os.stat(merged / name).st_uid, os.stat(merged / name).st_gid)
                  for name in ("owned-by-0", "owned-by-5", "owned-by-70000")}
        assert owners == {"owned-by-0": (100000, 100000), "owned-by-5": (100005, 100005),
                          "owned-by-70000": (65534, 65534)}
        created = subprocess.run(
            ["setpriv", "--reuid=100000", "--regid=100000", "--clear-groups", "sh", "-c",
             f"echo container > {merged}/made-by-container-root && "
             f"chown 100005:100005 {merged}/owned-by-0"],
            capture_output=True, text=True, check=False)
        assert created.returncode != 0 and "Operation not permitted" in created.stderr, \
            "a non-root caller may not chown"
        made = merged / "made-by-container-root"
        assert (os.stat(made).st_uid, os.stat(made).st_gid) == (100000, 100000)
        os.chown(merged / "owned-by-0", 100005, 100005)
        assert os.stat(merged / "owned-by-0").st_uid == 100005
    disk = os.stat(upper / "made-by-container-root")
    assert (disk.st_uid, disk.st_gid) == (0, 0)
    assert os.stat(upper / "owned-by-0").st_uid == 5


def test_squash_shows_every_owner_as_one(layers: dict[str, Path]) -> None:
    merged = layers["merged"]
    os.chown(layers["bottom"] / "only-bottom", 7, 8)
    with unmounted_after(merged):
        result = mount_program("-o", f"lowerdir={layers['top']}:{layers['bottom']},"
                               f"squash_to_uid=1000,squash_to_gid=1001", str(merged))
        assert result.returncode == 0, result.stderr
        for name in ("file", "only-bottom", "."):
            st = os.stat(merged / name)
            assert (st.st_uid, st.st_gid) == (1000, 1001)


def test_mount_t_fuse_and_fstab(layers: dict[str, Path], tmp_path: Path) -> None:
    """mount(8) runs mount.fuse3, which runs `cowfs SOURCE MERGED -o OPTIONS`."""
    merged = layers["merged"]
    options = f"lowerdir={layers['top']}:{layers['bottom']},upperdir={layers['upper']}," \
              f"workdir={layers['work']}"
    with unmounted_after(merged):
        subprocess.run(["mount", "-t", "fuse", f"{COWFS}#mylayers", str(merged), "-o", options],
                       check=True, timeout=60)
        (line,) = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()
                   if line.split()[4] == str(merged)]
        assert line[-3:-1] == ["fuse.cowfs", "mylayers"]
        assert (merged / "file").read_text() == "top"
        subprocess.run(["umount", str(merged)], check=True)
        fstab = tmp_path / "fstab"
        fstab.write_text(f"# a test fstab\n{COWFS}#fromfstab {merged} fuse "
                         f"{options},nofail,x-systemd.requires=local-fs.target 0 0\n")
        subprocess.run(["mount", "-a", "-T", str(fstab)], check=True, timeout=60)
        assert is_mounted(merged, "fuse.cowfs")
        assert (merged / "only-bottom").read_text() == "bottom"


def test_mount_t_fuse_cowfs_finds_cowfs_on_the_default_path(layers: dict[str, Path]) -> None:
    """`-t fuse.cowfs` needs `cowfs` where mount.fuse3's shell looks (mount(8) drops PATH)."""
    link = Path("/usr/local/bin/cowfs")
    if link.exists() and not (link.is_symlink() and os.readlink(link) == COWFS):
        pytest.skip(f"{link} is another cowfs; not replacing it")
    made_link = not link.exists()
    if made_link:
        link.symlink_to(COWFS)
    merged = layers["merged"]
    try:
        with unmounted_after(merged):
            subprocess.run(["mount", "-t", "fuse.cowfs", "cowfs", str(merged), "-o",
                            f"lowerdir={layers['top']},ro"], check=True, timeout=60)
            assert is_mounted(merged, "fuse.cowfs")
            assert (merged / "file").read_text() == "top"
    finally:
        if made_link:
            link.unlink()


def test_a_busy_daemon_ends_when_lazily_unmounted(layers: dict[str, Path]) -> None:
    merged = layers["merged"]
    result = mount_program("-o", f"lowerdir={layers['top']}", str(merged))
    assert result.returncode == 0, result.stderr
    daemon = daemon_of(merged)
    with open(merged / "file") as busy:
        subprocess.run(["umount", "-l", str(merged)], check=True)
        assert busy.read() == "top"
    wait_until(lambda: not Path(f"/proc/{daemon}").exists(), what="the daemon to end")
