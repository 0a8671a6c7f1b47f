"""The read side through a real FUSE mount."""

import contextlib
import errno
import json
import mmap
import os
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import mounted_cowfs, reap, unmount_quietly, wait_until

from cowfs.layers import read_mountinfo

pytestmark = pytest.mark.mounts


def all_paths(root: Path) -> list[Path]:
    paths = []
    for directory, subdirectories, files in os.walk(root):
        paths += [Path(directory, name) for name in subdirectories + files]
    return paths


@pytest.fixture
def image(layer_dirs) -> tuple[Path, Path, Path]:
    """Two lower layers with one of everything, and an empty mount point."""
    top, bottom, merged = layer_dirs("top", "bottom", "merged")
    (bottom / "etc").mkdir()
    (bottom / "etc" / "passwd").write_text("root:x:0:0\n")
    (bottom / "etc" / "shadow").write_text("secret")
    (bottom / "etc" / "group").write_text("root:x:0:\n")
    (top / "etc").mkdir()
    (top / "etc" / "hostname").write_text("box\n")
    os.mknod(top / "etc" / "shadow", stat.S_IFCHR, os.makedev(0, 0))
    (top / "etc" / ".wh.group").write_bytes(b"")
    (bottom / "data").write_bytes(os.urandom(300_000))
    os.link(bottom / "data", bottom / "data-link")
    (bottom / "link").symlink_to("etc/passwd")
    os.mkfifo(bottom / "fifo")
    os.mknod(bottom / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.setxattr(bottom / "data", "user.origin", b"bottom")
    os.setxattr(bottom / "data", "trusted.overlay.origin", b"\x00\xfb")
    os.setxattr(top / "etc", "trusted.overlay.opaque", b"x")
    return top, bottom, merged


def test_merged_view_hides_whiteouts_and_markers(image) -> None:
    top, bottom, merged = image
    with mounted_cowfs([top, bottom], merged):
        assert sorted(os.listdir(merged)) == ["data", "data-link", "etc", "fifo", "link", "null"]
        assert sorted(os.listdir(merged / "etc")) == ["hostname", "passwd"]
        assert (merged / "etc" / "passwd").read_text() == "root:x:0:0\n"
        for hidden in ("shadow", "group", ".wh.group"):
            assert not (merged / "etc" / hidden).exists()
        assert (merged / "data").read_bytes() == (bottom / "data").read_bytes()


def test_file_types_links_and_devices(image) -> None:
    top, bottom, merged = image
    with mounted_cowfs([top, bottom], merged):
        assert os.readlink(merged / "link") == "etc/passwd"
        assert (merged / "link").read_text() == "root:x:0:0\n"   # the kernel follows it
        assert stat.S_ISFIFO(os.lstat(merged / "fifo").st_mode)
        null = os.lstat(merged / "null")
        assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)


def test_dot_entries_and_d_ino_equal_to_st_ino(image) -> None:
    top, bottom, merged = image
    with mounted_cowfs([top, bottom], merged):
        listing = subprocess.run(["ls", "-a", "-f", str(merged / "etc")], check=True,
                                 capture_output=True, text=True).stdout.split()
        assert sorted(listing) == [".", "..", "hostname", "passwd"]
        for path in (merged, merged / "etc"):
            with os.scandir(path) as entries:
                for entry in entries:
                    assert entry.inode() == os.lstat(entry.path).st_ino, entry.path


def test_inode_numbers_unique_one_device_and_hard_links_shared(image) -> None:
    top, bottom, merged = image
    with mounted_cowfs([top, bottom], merged):
        stats = {path: os.lstat(path) for path in all_paths(merged)}
        assert len({st.st_dev for st in stats.values()}) == 1
        assert stats[merged / "data"].st_ino == stats[merged / "data-link"].st_ino
        assert stats[merged / "data"].st_nlink == 2
        inodes = [st.st_ino for path, st in stats.items() if path.name != "data-link"]
        assert len(inodes) == len(set(inodes))


def test_inode_numbers_are_stable_across_remounts(image) -> None:
    top, bottom, merged = image
    numbers = []
    for _ in range(2):
        with mounted_cowfs([top, bottom], merged) as mount:
            numbers.append({str(path): os.lstat(path).st_ino for path in all_paths(merged)})
            mount.unmount()
    assert numbers[0] == numbers[1]


@contextlib.contextmanager
def mounted_tmpfs(path: Path) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        unmount_quietly(path)


def test_layers_on_two_filesystems_keep_numbers_unique(tmp_path: Path, layer_dirs) -> None:
    disk, merged = layer_dirs("disk", "merged")
    with mounted_tmpfs(tmp_path / "memory") as memory:
        for layer in (disk, memory):
            for index in range(20):
                (layer / f"{layer.name}-{index}").write_text("")
        (memory / "sub").mkdir()
        with mounted_cowfs([memory, disk], merged):
            stats = [os.lstat(path) for path in all_paths(merged)]
            assert len(stats) == 41
            assert len({st.st_ino for st in stats}) == 41
            assert len({st.st_dev for st in stats}) == 1


def make_deep_tree(layer: Path, depth: int, name: str) -> None:
    """A chain of directories too long for one path: made one level at a time by fd."""
    fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(leaf, b"at the bottom")
    os.close(leaf)
    os.close(fd)


def test_paths_longer_than_path_max_and_long_names(layer_dirs) -> None:
    top, merged = layer_dirs("top", "merged")
    name = "d" * 200
    make_deep_tree(top, 30, name)        # 30 * 201 bytes: more than PATH_MAX (4096)
    (top / ("n" * 255)).write_text("longest name")
    with mounted_cowfs([top], merged):
        fd = os.open(merged, os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(30):
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf = os.open("leaf", os.O_RDONLY, dir_fd=fd)
        assert os.read(leaf, 100) == b"at the bottom"
        os.close(leaf)
        os.close(fd)
        assert (merged / ("n" * 255)).read_text() == "longest name"
        with pytest.raises(OSError) as caught:
            os.stat(merged / ("n" * 256))
        assert caught.value.errno == errno.ENAMETOOLONG


def test_without_upper_every_write_is_refused(image) -> None:
    top, bottom, merged = image
    with mounted_cowfs([top, bottom], merged):
        attempts = [
            lambda: os.open(merged / "data", os.O_RDWR),
            lambda: os.open(merged / "new", os.O_WRONLY | os.O_CREAT),
            lambda: os.mkdir(merged / "dir"),
            lambda: os.unlink(merged / "data"),
            lambda: os.rename(merged / "data", merged / "moved"),
            lambda: os.chmod(merged / "data", 0o600),
            lambda: os.setxattr(merged / "data", "user.x", b"1"),
            lambda: os.truncate(merged / "data", 0),
        ]
        for attempt in attempts:
            with pytest.raises(OSError) as caught:
                attempt()
            assert caught.value.errno == errno.EROFS
        assert (merged / "data").read_bytes() == (bottom / "data").read_bytes()


def test_xattrs_pass_except_overlays_own(image) -> None:
    top, bottom, merged = image
    with mounted_cowfs([top, bottom], merged):
        assert os.listxattr(merged / "data") == ["user.origin"]
        assert os.getxattr(merged / "data", "user.origin") == b"bottom"
        assert os.listxattr(merged / "etc") == []
        for private in ("trusted.overlay.origin", "trusted.overlay.opaque"):
            with pytest.raises(OSError) as caught:
                os.getxattr(merged / "etc", private)
            assert caught.value.errno == errno.ENODATA


def test_statfs_and_mmap(image) -> None:
    top, bottom, merged = image
    with mounted_cowfs([top, bottom], merged):
        assert os.statvfs(merged).f_blocks == os.statvfs(top).f_blocks
        with open(merged / "data", "rb") as file, \
                mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            assert mapped[:] == (bottom / "data").read_bytes()


def test_large_directory_is_listed_whole_and_once(layer_dirs) -> None:
    top, bottom, merged = layer_dirs("top", "bottom", "merged")
    for index in range(3000):
        (top if index % 2 else bottom).joinpath(f"entry-with-a-longish-name-{index:05}").touch()
    for index in range(0, 3000, 3):         # some names in both layers
        (top / f"entry-with-a-longish-name-{index:05}").touch()
    with mounted_cowfs([top, bottom], merged):
        listing = os.listdir(merged)
        assert len(listing) == 3000
        assert sorted(listing) == sorted(f"entry-with-a-longish-name-{i:05}" for i in range(3000))


def count_requests(log: str, handler: str, needle: str) -> int:
    prefix = f"cowfs.mount: {handler}("
    return sum(1 for line in log.splitlines() if prefix in line and needle in line)


def test_debug_logs_requests_and_the_kernel_caches_misses_and_pages(image) -> None:
    top, bottom, merged = image
    with mounted_cowfs([top, bottom], merged, extra=("--debug",)) as mount:
        for _ in range(3):
            assert not (merged / "missing-name").exists()
        for _ in range(3):
            assert (merged / "data").read_bytes()[:3] == (bottom / "data").read_bytes()[:3]
        log = mount.log()
        mount.unmount()
    assert count_requests(log, "lookup", "b'missing-name'") == 1
    assert count_requests(log, "open", "") == 3
    reads = count_requests(log, "read", "")
    assert 0 < reads <= 4, "keep_cache: later opens read from the page cache"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_unmount_cleanly(image, signum: int) -> None:
    top, bottom, merged = image
    with mounted_cowfs([top, bottom], merged) as mount:
        mount.process.send_signal(signum)
        reap(mount.process)
        assert mount.process.returncode == 0, mount.log()
        wait_until(lambda: not os.path.ismount(merged), what="unmount")


def test_forgotten_nodes_come_back_the_same(image) -> None:
    """After the kernel drops its caches and forgets nodes, lookups rebuild the same tree."""
    top, bottom, merged = image
    with mounted_cowfs([top, bottom], merged, extra=("--debug",)) as mount:
        before = {str(path): os.lstat(path) for path in all_paths(merged)}
        Path("/proc/sys/vm/drop_caches").write_text("3")
        after = {str(path): os.lstat(path) for path in all_paths(merged)}
        assert (merged / "etc" / "passwd").read_text() == "root:x:0:0\n"
        log = mount.log()
    assert "cowfs.mount: forget(" in log
    assert before.keys() == after.keys()
    for path, st in before.items():
        assert (st.st_ino, st.st_mode, st.st_size) == \
            (after[path].st_ino, after[path].st_mode, after[path].st_size)


def test_other_users_get_the_kernels_permission_checks(world_readable_dirs: Path) -> None:
    lower, merged = world_readable_dirs / "lower", world_readable_dirs / "merged"
    lower.mkdir(mode=0o755)
    merged.mkdir()
    (lower / "public").write_text("for everyone")
    (lower / "public").chmod(0o644)
    (lower / "private").write_text("root only")
    (lower / "private").chmod(0o600)
    with mounted_cowfs([lower], merged):
        def cat_as_nobody(name: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["cat", str(merged / name)], user=65534, group=65534,
                                  capture_output=True, text=True, check=False)
        assert cat_as_nobody("public").stdout == "for everyone"
        denied = cat_as_nobody("private")
        assert denied.returncode != 0 and "Permission denied" in denied.stderr


def test_the_kernel_reads_ahead_a_mebibyte(layer_dirs) -> None:
    """The kernel sets a FUSE mount's read-ahead from INIT's answer, lowering it only: raised
    after that answer, a sequential read of 16 MiB asks the daemon about 16 times (1 MiB
    each), not 64 (256 KiB each, as when it was raised before INIT and so undone)."""
    lower, upper, merged = layer_dirs("lower", "upper", "merged")
    (lower / "big").write_bytes(os.urandom(1 << 20) * 16)
    with mounted_cowfs([lower], merged, upper):
        device = next(mount.device for mount in read_mountinfo()
                      if mount.mountpoint == str(merged))

        def reads() -> int:
            return json.loads(os.getxattr(merged, "trusted.cowfs.stats"))["requests"].get(
                "read", 0)
        before = reads()
        with open(merged / "big", "rb") as file:
            while file.read(1 << 16):
                pass
        assert Path(f"/sys/class/bdi/{device}/read_ahead_kb").read_text() == "1024\n"
        assert reads() - before <= 20
