"""A copy-up that fails part-way leaves the merged view as it was and no half-made file."""

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import mounted_cowfs, unmount_quietly

pytestmark = pytest.mark.mounts

MIB = 1 << 20


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        unmount_quietly(path)


@contextlib.contextmanager
def bind_mounted(source: Path, target: Path) -> Iterator[Path]:
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    try:
        yield target
    finally:
        unmount_quietly(target)


def test_a_full_upper_fails_the_write_and_changes_nothing(layer_dirs, tmp_path: Path) -> None:
    lower, merged = layer_dirs("lower", "merged")
    (lower / "big").write_bytes(b"B" * (16 * MIB))
    with small_tmpfs(tmp_path / "small", "4m") as small:
        upper, workdir = small / "upper", small / "work"
        upper.mkdir()
        with mounted_cowfs([lower], merged, upper=upper, extra=("--workdir", str(workdir))):
            with pytest.raises(OSError) as caught, open(merged / "big", "ab") as file:
                file.write(b"!")
            assert caught.value.errno == errno.ENOSPC
            assert (merged / "big").read_bytes() == b"B" * (16 * MIB)
            assert os.listdir(upper) == []
            assert os.listdir(workdir / "cowfs" / "staging") == []
            (merged / "small-file").write_text("space for this")   # the mount still works
            assert (merged / "small-file").read_text() == "space for this"


def test_a_daemon_killed_during_copy_up_leaves_the_old_view(layer_dirs) -> None:
    lower, upper, merged = layer_dirs("lower", "upper", "merged")
    workdir = upper.parent / "work"
    size = 512 * MIB
    with open(lower / "big", "wb") as file:
        chunk = b"0123456789abcdef" * (MIB // 16)
        for _ in range(size // MIB):
            file.write(chunk)
    staging = workdir / "cowfs" / "staging"
    extra = ("--workdir", str(workdir))
    with mounted_cowfs([lower], merged, upper=upper, extra=extra) as mount:
        writer = subprocess.Popen([sys.executable, "-c",
                                   "import sys; open(sys.argv[1], 'ab').write(b'!')",
                                   str(merged / "big")], stderr=subprocess.DEVNULL)
        try:
            half_made = wait_for_partial_copy(staging, size)
            mount.process.send_signal(signal.SIGKILL)
            mount.process.wait(timeout=30)
        finally:
            writer.kill()
            writer.wait(timeout=30)
    assert half_made, "the daemon was killed before or after the copy, not during it"
    assert not os.path.lexists(upper / "big")
    with mounted_cowfs([lower], merged, upper=upper, extra=extra):
        assert os.listdir(staging) == [], "debris is swept at the next mount"
        assert os.lstat(merged / "big").st_size == size
        with open(merged / "big", "rb") as file:
            assert file.read(16) == b"0123456789abcdef"
            file.seek(size - 16)
            assert file.read() == b"0123456789abcdef"


def wait_for_partial_copy(staging: Path, size: int) -> bool:
    """Wait until a staged copy holds some but not all of the data; False if it was missed."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for name in os.listdir(staging) if staging.exists() else ():
            try:
                blocks = os.lstat(staging / name).st_blocks * 512
            except FileNotFoundError:
                continue
            if 0 < blocks < size:
                return True
            if blocks >= size:
                return False
        time.sleep(0.0005)
    return False


def test_a_read_error_fails_the_copy_up_and_changes_nothing(layer_dirs) -> None:
    """A lower file whose data cannot be read (EIO) is not copied up, not even in part.

    The failing lower layer is itself a cowfs mount serving a metadata-only copy whose data
    gives EIO: it is a bind mount of /proc/PID/mem, made after that mount started (mount points
    inside layers are refused at mount time), and address 0 is never mapped.
    """
    inner_lower, inner_upper, inner, upper, merged = layer_dirs(
        "inner-lower", "inner-upper", "inner", "upper", "merged")
    with open(inner_upper / "unreadable", "wb") as file:
        file.truncate(MIB)
    os.setxattr(inner_upper / "unreadable", "trusted.overlay.metacopy", b"")
    (inner_lower / "unreadable").touch()
    (inner_lower / "fine").write_text("fine")
    workdir = upper.parent / "work"
    with mounted_cowfs([inner_lower], inner, upper=inner_upper,
                       extra=("--workdir", str(upper.parent / "inner-work"))), \
            bind_mounted(Path(f"/proc/{os.getpid()}/mem"), inner_lower / "unreadable"):
        with pytest.raises(OSError) as caught:
            (inner / "unreadable").read_bytes()
        assert caught.value.errno == errno.EIO
        with mounted_cowfs([inner], merged, upper=upper, extra=("--workdir", str(workdir))):
            with pytest.raises(OSError) as caught, open(merged / "unreadable", "ab") as file:
                file.write(b"!")
            assert caught.value.errno == errno.EIO
            assert os.lstat(merged / "unreadable").st_size == MIB
            assert os.listdir(upper) == []
            assert os.listdir(workdir / "cowfs" / "staging") == []
            with open(merged / "fine", "a") as file:          # other files still copy up
                file.write(" and more")
            assert (merged / "fine").read_text() == "fine and more"
