"""The write path through a real mount: copy-up, whiteouts, every change, in the kernel's format."""

import contextlib
import errno
import mmap
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import cowfs_command, mounted_cowfs, unmount_quietly

from cowfs import _libc

pytestmark = pytest.mark.mounts

GIB = 1 << 30
MIB = 1 << 20


class Stack:
    """Two lowers, an upper, a workdir and a mount point under one test directory."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.top, self.bottom, self.upper, self.merged = (base / name for name in
                                                          ("top", "bottom", "upper", "merged"))
        for path in (self.top, self.bottom, self.upper, self.merged):
            path.mkdir()
        self.workdir = base / "work"

    @property
    def lowers(self) -> list[Path]:
        return [self.top, self.bottom]

    def mount(self, *extra: str):
        return mounted_cowfs(self.lowers, self.merged, upper=self.upper,
                             extra=("--workdir", str(self.workdir), *extra))


@contextlib.contextmanager
def dropping_caches() -> Iterator[None]:
    """Make the kernel forget inodes and dentries all the time, so it asks cowfs again."""
    stop = threading.Event()

    def drop() -> None:
        while not stop.is_set():
            Path("/proc/sys/vm/drop_caches").write_text("3")
            stop.wait(0.005)

    dropper = threading.Thread(target=drop, daemon=True)
    dropper.start()
    try:
        yield
    finally:
        stop.set()
        dropper.join()


@pytest.fixture(params=["cached", "dropping-caches"])
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    """Every write test runs twice: once more while the kernel keeps forgetting inodes."""
    stack = Stack(tmp_path)
    (stack.bottom / "file").write_text("lower data\n")
    os.chmod(stack.bottom / "file", 0o640)
    os.chown(stack.bottom / "file", 1000, 1000)
    os.utime(stack.bottom / "file", ns=(1_000_000_123, 2_000_000_456))
    os.setxattr(stack.bottom / "file", "user.kept", b"yes")
    os.setxattr(stack.bottom / "file", "trusted.kept", b"too")
    (stack.bottom / "dir").mkdir()
    (stack.bottom / "dir" / "inner").write_text("inner")
    (stack.top / "dir").mkdir()
    (stack.top / "dir" / "upper-inner").write_text("top inner")
    (stack.bottom / "link").symlink_to("file")
    os.mkfifo(stack.bottom / "fifo")
    os.mknod(stack.bottom / "socket", stat.S_IFSOCK | 0o644)
    os.mknod(stack.bottom / "zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))
    with dropping_caches() if request.param == "dropping-caches" else contextlib.nullcontext():
        yield stack


def is_whiteout(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


@contextlib.contextmanager
def kernel_overlay(lowers: list[Path], upper: Path, merged: Path) -> Iterator[Path]:
    """The kernel's overlayfs over an upper cowfs wrote (or will read), with a fresh workdir."""
    workdir = upper.parent / f".{upper.name}.kernel-work"
    workdir.mkdir()
    lowerdir = ":".join(str(path) for path in lowers)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lowerdir},upperdir={upper},workdir={workdir},redirect_dir=on,"
                    "metacopy=on",
                    str(merged)], check=True, capture_output=True)
    try:
        yield merged
    finally:
        unmount_quietly(merged)
        subprocess.run(["rm", "-rf", str(workdir)], check=True)


def tree(root: Path) -> dict[str, tuple]:
    """What a user sees: type, mode, owner, size, content or target, user xattrs."""
    seen = {}
    for directory, subdirectories, files in os.walk(root):
        for name in subdirectories + files:
            path = Path(directory, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                detail: object = path.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                detail = os.readlink(path)
            else:
                detail = None
            xattrs = sorted((key, os.getxattr(path, key, follow_symlinks=False))
                            for key in os.listxattr(path, follow_symlinks=False)
                            if key.startswith("user."))
            size = None if stat.S_ISDIR(st.st_mode) else st.st_size
            seen[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, size,
                                                 detail, tuple(xattrs))
    return seen


def test_first_write_copies_up_data_and_metadata_keeping_the_inode(stack: Stack) -> None:
    with stack.mount() as mount:
        path = stack.merged / "file"
        before = os.lstat(path)
        with open(path, "a") as file:
            file.write("appended\n")
        after = os.lstat(path)
        assert path.read_text() == "lower data\nappended\n"
        assert (after.st_ino, after.st_mode, after.st_uid, after.st_gid) == \
            (before.st_ino, before.st_mode, 1000, 1000)
        assert os.getxattr(path, "user.kept") == b"yes"
        mount.unmount()
    assert (stack.bottom / "file").read_text() == "lower data\n"
    upper = stack.upper / "file"
    assert upper.read_text() == "lower data\nappended\n"
    assert os.getxattr(upper, "trusted.kept") == b"too"
    with stack.mount():
        assert os.lstat(stack.merged / "file").st_ino == before.st_ino


def test_copy_up_of_metadata_only_changes_keeps_times_in_ns(stack: Stack) -> None:
    with stack.mount():
        os.chmod(stack.merged / "file", 0o600)
        st = os.lstat(stack.merged / "file")
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
        assert (stack.merged / "file").read_text() == "lower data\n"
    assert stat.S_IMODE(os.lstat(stack.upper / "file").st_mode) == 0o600
    assert not (stack.upper / "dir").exists(), "only the changed entry and its parents"


def test_metadata_changes_copy_no_data_until_the_first_write(stack: Stack) -> None:
    (stack.bottom / "big").write_bytes(b"b" * (8 * MIB))
    with stack.mount() as mount:
        big = stack.merged / "big"
        os.chmod(big, 0o600)
        os.chown(big, 5, 6)
        os.utime(big, ns=(7, 8))
        os.setxattr(big, "user.tag", b"t")
        upper = os.lstat(stack.upper / "big")
        assert upper.st_size == 8 * MIB and upper.st_blocks * 512 <= 4096   # xattrs only
        assert os.getxattr(stack.upper / "big", "trusted.overlay.metacopy") == b""
        assert big.read_bytes() == b"b" * (8 * MIB)
        metadata = tree(stack.merged)
        mount.unmount()
    with kernel_overlay(stack.lowers, stack.upper, stack.merged):
        assert tree(stack.merged) == metadata
    with stack.mount():
        with open(stack.merged / "big", "r+b") as file:
            file.write(b"new")
        st = os.lstat(stack.merged / "big")
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns) == \
            (0o600, 5, 6, st.st_mtime_ns)
        assert (stack.merged / "big").read_bytes() == b"new" + b"b" * (8 * MIB - 3)
        assert os.getxattr(stack.merged / "big", "user.tag") == b"t"
    assert "trusted.overlay.metacopy" not in os.listxattr(stack.upper / "big")
    assert (stack.upper / "big").read_bytes()[:4] == b"newb"


def test_truncating_opens_copy_no_data(stack: Stack) -> None:
    (stack.bottom / "big").write_bytes(b"b" * (8 * MIB))
    (stack.bottom / "other").write_bytes(b"o" * (8 * MIB))
    with stack.mount():
        with open(stack.merged / "big", "wb") as file:        # O_TRUNC
            file.write(b"small")
        os.truncate(stack.merged / "other", 0)
        assert (stack.merged / "big").read_bytes() == b"small"
        assert (stack.merged / "other").read_bytes() == b""
        for name in ("big", "other"):
            assert os.lstat(stack.upper / name).st_blocks * 512 <= 8192
            assert "trusted.overlay.metacopy" not in os.listxattr(stack.upper / name)


def test_a_reader_follows_the_copy_up(stack: Stack) -> None:
    with stack.mount(), open(stack.merged / "file", "rb") as reader:
        os.chmod(stack.merged / "file", 0o644)          # metadata only
        with open(stack.merged / "file", "r+b") as writer:
            writer.write(b"LOWER")                       # now the data too
        assert reader.read() == b"LOWER data\n"


def test_sparse_file_stays_sparse(stack: Stack) -> None:
    with open(stack.bottom / "sparse", "wb") as file:
        file.truncate(GIB)
        file.seek(GIB // 2)
        file.write(b"x" * MIB)
    with stack.mount():
        with open(stack.merged / "sparse", "ab") as file:
            file.write(b"!")
        st = os.lstat(stack.upper / "sparse")
        assert st.st_size == GIB + 1
        assert st.st_blocks * 512 < 4 * MIB
        with open(stack.merged / "sparse", "rb") as file:
            file.seek(GIB // 2)
            assert file.read(MIB) == b"x" * MIB
            assert file.read(10) == b"\0" * 10


def test_unlink_leaves_a_whiteout_only_where_a_lower_has_the_name(stack: Stack) -> None:
    with stack.mount():
        (stack.merged / "new").write_text("upper only")
        os.unlink(stack.merged / "new")
        os.unlink(stack.merged / "file")
        os.unlink(stack.merged / "link")
        assert sorted(os.listdir(stack.merged)) == ["dir", "fifo", "socket", "zero"]
        with pytest.raises(FileNotFoundError):
            os.unlink(stack.merged / "file")
        with pytest.raises(IsADirectoryError):
            os.unlink(stack.merged / "dir")
    assert is_whiteout(stack.upper / "file") and is_whiteout(stack.upper / "link")
    assert not os.path.lexists(stack.upper / "new")


def test_rmdir_of_a_merged_directory(stack: Stack) -> None:
    with stack.mount():
        with pytest.raises(OSError) as caught:
            os.rmdir(stack.merged / "dir")
        assert caught.value.errno == errno.ENOTEMPTY
        os.unlink(stack.merged / "dir" / "inner")
        os.unlink(stack.merged / "dir" / "upper-inner")
        os.rmdir(stack.merged / "dir")
        assert not (stack.merged / "dir").exists()
        os.mkdir(stack.merged / "dir")
        assert os.listdir(stack.merged / "dir") == [], "a new directory hides the old content"
    assert os.getxattr(stack.upper / "dir", "trusted.overlay.opaque") == b"y"
    assert os.listdir(stack.upper / "dir") == []


def test_create_over_a_whiteout(stack: Stack) -> None:
    with stack.mount() as mount:
        os.unlink(stack.merged / "file")
        (stack.merged / "file").write_text("reborn")
        assert (stack.merged / "file").read_text() == "reborn"
        st = os.lstat(stack.merged / "file")
        assert (st.st_uid, st.st_gid) == (0, 0)
        mount.unmount()
    assert (stack.upper / "file").read_text() == "reborn"


def test_rename_of_files_and_directories(stack: Stack) -> None:
    with stack.mount():
        os.rename(stack.merged / "file", stack.merged / "moved")
        assert (stack.merged / "moved").read_text() == "lower data\n"
        assert not (stack.merged / "file").exists()
        os.mkdir(stack.merged / "newdir")
        (stack.merged / "newdir" / "a").write_text("a")
        os.rename(stack.merged / "newdir", stack.merged / "dir" / "sub")
        assert (stack.merged / "dir" / "sub" / "a").read_text() == "a"
        (stack.merged / "x").write_text("x")
        with pytest.raises(FileExistsError):
            _libc.renameat2(-100, str(stack.merged / "x"), -100, str(stack.merged / "moved"),
                            _libc.RENAME_NOREPLACE)
        _libc.renameat2(-100, str(stack.merged / "x"), -100, str(stack.merged / "moved"),
                        _libc.RENAME_EXCHANGE)
        assert (stack.merged / "x").read_text() == "lower data\n"
        assert (stack.merged / "moved").read_text() == "x"
    assert is_whiteout(stack.upper / "file")


def test_setattr_truncate_and_times_on_an_open_file(stack: Stack) -> None:
    with stack.mount():
        path = stack.merged / "file"
        with open(path, "r+b") as file:
            os.ftruncate(file.fileno(), 5)
            os.utime(file.fileno(), ns=(5_000_000_001, 6_000_000_002))
            assert os.fstat(file.fileno()).st_size == 5
        st = os.lstat(path)
        assert (st.st_size, st.st_atime_ns, st.st_mtime_ns) == (5, 5_000_000_001, 6_000_000_002)
        os.chown(path, 123, 456)
        assert (os.lstat(path).st_uid, os.lstat(path).st_gid) == (123, 456)
        os.chown(stack.merged / "link", 7, 8, follow_symlinks=False)
        assert os.lstat(stack.merged / "link").st_uid == 7
        assert path.read_bytes() == b"lower"


def test_fstat_after_the_last_name_is_unlinked(stack: Stack) -> None:
    with stack.mount():
        path = stack.merged / "scratch"
        with open(path, "w+") as file:
            file.write("still here")
            os.unlink(path)
            assert os.fstat(file.fileno()).st_nlink == 0
            file.seek(0)
            assert file.read() == "still here"


def test_hard_link_of_a_lower_file(stack: Stack) -> None:
    with stack.mount():
        os.link(stack.merged / "file", stack.merged / "dir" / "alias")
        first, second = os.lstat(stack.merged / "file"), os.lstat(stack.merged / "dir" / "alias")
        assert first.st_ino == second.st_ino and first.st_nlink == second.st_nlink == 2
        with open(stack.merged / "dir" / "alias", "a") as file:
            file.write("through the alias")
        assert (stack.merged / "file").read_text().endswith("through the alias")


def test_lower_hard_links_stay_linked_after_copy_up(stack: Stack) -> None:
    (stack.bottom / "dir" / "one").write_text("shared")
    os.link(stack.bottom / "dir" / "one", stack.bottom / "two")
    with stack.mount() as mount:
        with open(stack.merged / "dir" / "one", "a") as file:
            file.write(" and changed")
        one, two = stack.merged / "dir" / "one", stack.merged / "two"
        assert two.read_text() == "shared and changed"
        assert os.lstat(one).st_ino == os.lstat(two).st_ino
        assert os.lstat(one).st_nlink == os.lstat(two).st_nlink == 2
        mount.unmount()
    with stack.mount() as mount:
        one, two = stack.merged / "dir" / "one", stack.merged / "two"
        assert two.read_text() == "shared and changed"
        os.chmod(two, 0o600)                       # the second name joins the same inode
        assert stat.S_IMODE(os.lstat(one).st_mode) == 0o600
        assert os.lstat(one).st_ino == os.lstat(two).st_ino
        os.unlink(one)
        assert os.lstat(two).st_nlink == 1
        mount.unmount()
    assert os.lstat(stack.upper / "two").st_ino == os.lstat(stack.workdir / "cowfs" / "index" /
                                                              os.listdir(stack.workdir / "cowfs" /
                                                                         "index")[0]).st_ino


def test_renaming_over_a_lower_hard_link_counts_one_name_fewer(stack: Stack) -> None:
    """As unlink does (and the kernel with index=on): the other name sees nlink 1."""
    (stack.bottom / "a").write_text("shared")
    os.link(stack.bottom / "a", stack.bottom / "dir" / "a")
    (stack.bottom / "a b").symlink_to("elsewhere")
    with stack.mount():
        assert os.lstat(stack.merged / "dir" / "a").st_nlink == 2
        os.rename(stack.merged / "a b", stack.merged / "a")
        assert os.readlink(stack.merged / "a") == "elsewhere"
        assert os.lstat(stack.merged / "dir" / "a").st_nlink == 1
        assert (stack.merged / "dir" / "a").read_text() == "shared"


def test_mknod_symlink_and_xattrs(stack: Stack) -> None:
    with stack.mount():
        os.mkfifo(stack.merged / "pipe", 0o600)
        os.mknod(stack.merged / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.symlink("/etc/passwd", stack.merged / "abs")
        assert stat.S_ISFIFO(os.lstat(stack.merged / "pipe").st_mode)
        assert os.lstat(stack.merged / "null").st_rdev == os.makedev(1, 3)
        assert os.readlink(stack.merged / "abs") == "/etc/passwd"
        os.setxattr(stack.merged / "dir", "user.new", b"1")
        os.removexattr(stack.merged / "file", "user.kept")
        assert "user.kept" not in os.listxattr(stack.merged / "file")
        os.setxattr(stack.merged / "file", "trusted.overlay.mine", b"escaped")
        assert os.getxattr(stack.merged / "file", "trusted.overlay.mine") == b"escaped"
    assert os.getxattr(stack.upper / "file", "trusted.overlay.overlay.mine") == b"escaped"
    assert os.getxattr(stack.upper / "dir", "user.new") == b"1"


def refused_errno(attempt: Callable[..., object], *arguments: object) -> int:
    """The errno *attempt* fails with (it must fail)."""
    with pytest.raises(OSError) as caught:
        attempt(*arguments)
    return caught.value.errno


def test_marker_names_are_refused_and_nothing_changes(stack: Stack) -> None:
    """`mv a .wh.passwd`, `mkdir etc/.wh..wh..opq` and the like: EINVAL, before any copy-up,
    and the merged view and the upper stay as they were, also after a remount."""
    (stack.bottom / "etc").mkdir()
    (stack.bottom / "etc" / "passwd").write_text("root:x:0:0\n")
    (stack.bottom / "etc" / "a").write_text("a\n")
    (stack.upper / ".wh.left-by-the-kernel").write_text("a kernel mount let a user make it\n")
    etc = stack.merged / "etc"
    upper_before = tree(stack.upper)

    def exchange(source: Path, target: Path) -> None:
        _libc.renameat2(-100, str(source), -100, str(target), _libc.RENAME_EXCHANGE)

    attempts: dict[str, Callable[[str], object]] = {
        "create": lambda name: os.close(os.open(etc / name, os.O_CREAT | os.O_WRONLY, 0o644)),
        "mkdir": lambda name: os.mkdir(etc / name),
        "mknod": lambda name: os.mknod(etc / name, stat.S_IFIFO | 0o644),
        "symlink": lambda name: os.symlink("passwd", etc / name),
        "link": lambda name: os.link(etc / "a", etc / name),
        "rename": lambda name: os.rename(etc / "a", etc / name),
        "rename a directory": lambda name: os.rename(stack.merged / "dir", etc / name),
    }
    with stack.mount():
        before = tree(stack.merged)
        assert ".wh.left-by-the-kernel" in before
        for what, attempt in attempts.items():
            for name in (".wh.passwd", ".wh..wh..opq"):
                assert refused_errno(attempt, name) == errno.EINVAL, (what, name)
        assert refused_errno(exchange, etc / "a",
                             stack.merged / ".wh.left-by-the-kernel") == errno.EINVAL
        # The kernel itself refuses an exchange with a name that does not exist.
        assert refused_errno(exchange, etc / "a", etc / ".wh.passwd") == errno.ENOENT
        assert subprocess.run(["mv", str(etc / "a"), str(etc / ".wh.passwd")],
                              capture_output=True, check=False).returncode != 0
        assert tree(stack.merged) == before
        assert tree(stack.upper) == upper_before, "refused before anything was copied up"
        assert os.listdir(stack.workdir / "cowfs" / "staging") == []
    with stack.mount():
        assert tree(stack.merged) == before
        assert (etc / "passwd").read_text() == "root:x:0:0\n"


def test_marker_names_in_the_upper_are_files_as_the_kernel_shows_them(stack: Stack) -> None:
    """An upper is never read in the OCI dialect: a `.wh.` name a kernel mount let a user make
    there hides nothing and is listed, as the kernel's overlayfs shows the same upper."""
    (stack.upper / ".wh.file").write_text("a user's file\n")
    (stack.upper / "dir").mkdir()
    (stack.upper / "dir" / ".wh..wh..opq").write_bytes(b"")
    (stack.upper / "dir" / ".wh.inner").write_bytes(b"")
    (stack.upper / ".wh.box").mkdir()
    (stack.upper / ".wh.box" / "content").write_text("inside\n")
    with stack.mount():
        seen = tree(stack.merged)
    assert {".wh.file", "file", "dir/.wh..wh..opq", "dir/.wh.inner", "dir/inner",
            "dir/upper-inner", ".wh.box", ".wh.box/content"} <= set(seen)
    with kernel_overlay(stack.lowers, stack.upper, stack.merged):
        assert tree(stack.merged) == seen
    with stack.mount():
        assert tree(stack.merged) == seen
        os.rename(stack.merged / ".wh.file", stack.merged / "renamed-away")
        os.unlink(stack.merged / "dir" / ".wh.inner")
        assert (stack.merged / "renamed-away").read_text() == "a user's file\n"
        assert (stack.merged / "dir" / "inner").read_text() == "inner"
    assert sorted(os.listdir(stack.upper / "dir")) == [".wh..wh..opq"], "no whiteouts needed"
    assert not os.path.lexists(stack.upper / ".wh.file")


def test_mknod_of_a_whiteout_device_is_refused_and_changes_nothing(stack: Stack) -> None:
    """A char device 0/0 would be a whiteout in the upper: the kernel's overlay says EPERM."""
    with stack.mount() as mount:
        merged_before, upper_before = tree(stack.merged), tree(stack.upper)
        for name in ("dir/c", "c"):       # in a merged lower directory, and at the root
            with pytest.raises(OSError) as refused:
                os.mknod(stack.merged / name, stat.S_IFCHR | 0o644, os.makedev(0, 0))
            assert refused.value.errno == errno.EPERM
        assert tree(stack.merged) == merged_before
        assert tree(stack.upper) == upper_before == {}
        mount.unmount()
    assert "Traceback" not in mount.log() and "failed" not in mount.log()


def change_everything(merged: Path) -> None:
    """A little of every change, for the interchange tests."""
    with open(merged / "file", "a") as file:
        file.write("more\n")
    (merged / "created").write_text("new file")
    os.mkdir(merged / "made")
    (merged / "made" / "deep").write_text("deep")
    os.unlink(merged / "dir" / "inner")
    os.unlink(merged / "link")
    os.rename(merged / "fifo", merged / "pipe")
    os.chown(merged / "socket", 11, 12)
    os.chmod(merged / "zero", 0o600)
    os.chmod(merged / "dir", 0o700)
    os.setxattr(merged / "created", "user.color", b"red")


def test_kernel_overlayfs_shows_what_cowfs_wrote(stack: Stack) -> None:
    with stack.mount() as mount:
        change_everything(stack.merged)
        seen = tree(stack.merged)
        mount.unmount()
    with kernel_overlay(stack.lowers, stack.upper, stack.merged):
        assert tree(stack.merged) == seen


def test_cowfs_shows_what_the_kernel_wrote(stack: Stack) -> None:
    with kernel_overlay(stack.lowers, stack.upper, stack.merged):
        change_everything(stack.merged)
        seen = tree(stack.merged)
    with stack.mount():
        assert tree(stack.merged) == seen


def test_default_workdir_is_a_hidden_sibling(stack: Stack) -> None:
    with mounted_cowfs(stack.lowers, stack.merged, upper=stack.upper):
        (stack.merged / "file").write_text("changed")
    assert (stack.base / ".upper.cowfs-work" / "cowfs" / "staging").is_dir()


def test_staging_debris_is_swept_at_mount(stack: Stack) -> None:
    debris = stack.workdir / "cowfs" / "staging"
    debris.mkdir(parents=True)
    (debris / "#half-made").write_text("from a crash")
    with stack.mount():
        assert os.listdir(debris) == []
        assert sorted(os.listdir(stack.merged)) == ["dir", "fifo", "file", "link", "socket",
                                                   "zero"]


def run_mount(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cowfs_command("mount", *arguments), capture_output=True, text=True,
                          timeout=60, check=False)


def test_workdir_problems_are_refused(stack: Stack, tmp_path: Path) -> None:
    lowerdir = f"{stack.top}:{stack.bottom}"
    inside = run_mount("--workdir", str(stack.bottom / "w"), lowerdir, str(stack.upper),
                       str(stack.merged))
    assert inside.returncode == 2 and "is inside lower layer" in inside.stderr
    other_fs = tmp_path / "tmpfs"
    other_fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(other_fs)], check=True)
    try:
        elsewhere = run_mount("--workdir", str(other_fs), lowerdir, str(stack.upper),
                              str(stack.merged))
    finally:
        unmount_quietly(other_fs)
    assert elsewhere.returncode == 2
    assert "is not on the same filesystem as upper layer" in elsewhere.stderr
    second = tmp_path / "second"
    second.mkdir()
    with stack.mount():
        busy = run_mount("--workdir", str(stack.workdir), lowerdir, str(tmp_path / "u2"),
                         str(second))
        (tmp_path / "u2").mkdir()
        busy = run_mount("--workdir", str(stack.workdir), lowerdir, str(tmp_path / "u2"),
                         str(second))
        shared_upper = run_mount(lowerdir, str(stack.upper), str(second))
    assert busy.returncode == 2 and "is in use by another mount" in busy.stderr
    assert shared_upper.returncode == 2 and "is in use by another mount" in shared_upper.stderr


def test_files_are_created_as_the_caller(world_readable_dirs: Path) -> None:
    stack = Stack(world_readable_dirs)
    (stack.bottom / "shared").mkdir(mode=0o777)
    os.chmod(stack.bottom / "shared", 0o777)
    (stack.bottom / "locked").mkdir(mode=0o755)
    with stack.mount():
        def as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(list(command), user=65534, group=65534, capture_output=True,
                                  text=True, check=False)
        assert as_nobody("touch", str(stack.merged / "shared" / "mine")).returncode == 0
        st = os.lstat(stack.merged / "shared" / "mine")
        assert (st.st_uid, st.st_gid) == (65534, 65534)
        denied = as_nobody("touch", str(stack.merged / "locked" / "theirs"))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr


def test_rename_of_a_lower_directory_writes_a_redirect(stack: Stack) -> None:
    (stack.bottom / "dir" / "nested").mkdir()
    (stack.bottom / "dir" / "nested" / "leaf").write_text("leaf")
    (stack.bottom / "other").mkdir()
    with stack.mount() as mount:
        os.rename(stack.merged / "dir", stack.merged / "renamed")
        assert sorted(os.listdir(stack.merged / "renamed")) == ["inner", "nested", "upper-inner"]
        os.rename(stack.merged / "renamed", stack.merged / "other" / "moved")
        assert (stack.merged / "other" / "moved" / "nested" / "leaf").read_text() == "leaf"
        assert not (stack.merged / "dir").exists() and not (stack.merged / "renamed").exists()
        seen = tree(stack.merged)
        mount.unmount()
    assert os.getxattr(stack.upper / "other" / "moved", "trusted.overlay.redirect") == b"/dir"
    assert os.listdir(stack.upper / "other" / "moved") == [], "no file data was copied"
    assert is_whiteout(stack.upper / "dir")
    assert not os.path.lexists(stack.upper / "renamed"), "no whiteout where no lower had it"
    with kernel_overlay(stack.lowers, stack.upper, stack.merged):
        assert tree(stack.merged) == seen
    with stack.mount():
        assert tree(stack.merged) == seen


def test_cowfs_follows_the_kernels_redirects(stack: Stack) -> None:
    (stack.bottom / "stays").mkdir()
    (stack.bottom / "stays" / "content").write_text("here")
    with kernel_overlay(stack.lowers, stack.upper, stack.merged):
        os.rename(stack.merged / "stays", stack.merged / "stays-renamed")
        os.rename(stack.merged / "dir", stack.merged / "same-parent")
        os.mkdir(stack.merged / "box")
        os.rename(stack.merged / "same-parent", stack.merged / "box" / "moved")
        seen = tree(stack.merged)
    with stack.mount():
        assert tree(stack.merged) == seen


def test_concurrent_writers_share_one_copy_up(stack: Stack) -> None:
    """Threads and processes write to one big lower file at once: one copy-up, all writes kept."""
    size = 64 * MIB
    with open(stack.bottom / "big", "wb") as file:
        file.write(b"L" * size)
    region = size // 8
    with stack.mount():
        path = stack.merged / "big"
        with open(path, "rb") as reader, \
                mmap.mmap(reader.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            script = ("import os, sys; fd = os.open(sys.argv[1], os.O_WRONLY);"
                      "os.pwrite(fd, sys.argv[2].encode() * int(sys.argv[3]), int(sys.argv[4]))")
            processes = [subprocess.Popen([sys.executable, "-c", script, str(path), str(index),
                                           str(4096), str(index * region)])
                         for index in range(4)]

            def write(index: int) -> None:
                fd = os.open(path, os.O_WRONLY)
                try:
                    os.pwrite(fd, str(index).encode() * 4096, index * region)
                finally:
                    os.close(fd)

            threads = [threading.Thread(target=write, args=(index,)) for index in range(4, 8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            for process in processes:
                assert process.wait(timeout=60) == 0
            for index in range(8):
                start = index * region
                assert mapped[start:start + 4096] == str(index).encode() * 4096
                assert mapped[start + 4096:start + 8192] == b"L" * 4096
    assert os.listdir(stack.workdir / "cowfs" / "staging") == []
    assert os.lstat(stack.upper / "big").st_size == size


def test_userxattr_mode_writes_user_overlay_xattrs(stack: Stack) -> None:
    """As an unprivileged mount would: `user.overlay.*`, hidden like the trusted ones."""
    with stack.mount("-o", "userxattr") as mount:
        os.chmod(stack.merged / "file", 0o600)              # metadata only
        os.mkdir(stack.merged / "made")                     # opaque: the root is merged
        assert sorted(os.listxattr(stack.merged / "file")) == ["trusted.kept", "user.kept"]
        mount.unmount()
    upper_xattrs = set(os.listxattr(stack.upper / "file"))
    assert {"user.overlay.metacopy", "user.overlay.cowfs.ino"} <= upper_xattrs
    assert not any(name.startswith("trusted.overlay.") for name in upper_xattrs)
    assert os.getxattr(stack.upper / "made", "user.overlay.opaque") == b"y"
    with stack.mount():
        assert (stack.merged / "file").read_text() == "lower data\n"
        assert stat.S_IMODE(os.lstat(stack.merged / "file").st_mode) == 0o600
