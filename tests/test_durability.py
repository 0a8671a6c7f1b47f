"""`-o fsync=strict|batch|volatile`, and the copy-up statistics a mount shows on its root."""

import errno
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import cowfs_command, mounted_cowfs, wait_until

pytestmark = pytest.mark.mounts

STATS = "trusted.cowfs.stats"


def statistics(merged: Path) -> dict:
    return json.loads(os.getxattr(merged, STATS))


def make_stack(tmp_path: Path) -> tuple[Path, Path, Path]:
    lower, upper, merged = tmp_path / "lower", tmp_path / "upper", tmp_path / "merged"
    for directory in (lower / "dir", upper, merged):
        directory.mkdir(parents=True)
    (lower / "dir" / "big").write_bytes(os.urandom(1 << 20))
    (lower / "dir" / "meta").write_bytes(b"m" * 4096)
    (lower / "dir" / "gone").write_text("to be deleted")
    with open(lower / "sparse", "wb") as sparse:
        sparse.truncate(64 << 20)
        sparse.seek(32 << 20)
        sparse.write(b"x" * 4096)
    return lower, upper, merged


def volatile_marker(upper: Path) -> Path:
    return upper.parent / f".{upper.name}.cowfs-work" / "work" / "incompat" / "volatile"


def test_statistics_count_copy_ups(tmp_path: Path) -> None:
    lower, upper, merged = make_stack(tmp_path)
    with mounted_cowfs([lower], merged, upper):
        assert statistics(merged)["copy_ups"] == 0
        with open(merged / "dir" / "big", "ab") as file:
            file.write(b"!")
        os.chmod(merged / "dir" / "meta", 0o600)
        with open(merged / "sparse", "r+b") as file:
            file.write(b"y")
        shown = statistics(merged)
        assert STATS not in os.listxattr(merged)
        with pytest.raises(OSError) as refused:
            os.setxattr(merged, STATS, b"{}")
        assert refused.value.errno == errno.EPERM
    # dir, big, meta (metadata only), sparse; the two data copies skip the sparse file's hole
    assert shown["copy_ups"] == 4 and shown["directories"] == 1
    assert shown["metadata_only"] == 1 and shown["data_copies"] == 2
    assert shown["sparse"] == 1
    assert (1 << 20) <= shown["data_bytes"] < (1 << 20) + (1 << 20)
    assert shown["seconds"] > 0 and shown["fsync"] == "batch"


def test_batch_makes_changes_durable_within_a_second_or_at_fsync(tmp_path: Path) -> None:
    lower, upper, merged = make_stack(tmp_path)
    with mounted_cowfs([lower], merged, upper):
        os.unlink(merged / "dir" / "gone")
        assert statistics(merged)["pending"]
        wait_until(lambda: not statistics(merged)["pending"], what="the batch to be synced")
        assert statistics(merged)["syncs"] == 1
        with open(merged / "dir" / "big", "ab") as file:
            file.write(b"!")
            os.fsync(file.fileno())          # the copy-up is durable with the file
            assert not statistics(merged)["pending"]
        assert statistics(merged)["syncs"] == 2


def test_strict_syncs_every_copy_up_and_whiteout_before_showing_it(tmp_path: Path) -> None:
    lower, upper, merged = make_stack(tmp_path)
    with mounted_cowfs([lower], merged, upper, extra=("-o", "fsync=strict")):
        with open(merged / "dir" / "big", "ab") as file:
            file.write(b"!")
        after_copy_up = statistics(merged)
        os.unlink(merged / "dir" / "gone")
        after_whiteout = statistics(merged)
    # The directory copy-up (its parent synced), the file's data, then its parent: three.
    assert after_copy_up["syncs"] == 3 and not after_copy_up["pending"]
    assert after_whiteout["syncs"] == 4 and not after_whiteout["pending"]
    assert after_whiteout["fsync"] == "strict"


def test_volatile_never_syncs_and_a_crash_is_refused_after(tmp_path: Path) -> None:
    lower, upper, merged = make_stack(tmp_path)
    with mounted_cowfs([lower], merged, upper, extra=("-o", "volatile")):
        assert volatile_marker(upper).is_dir()
        with open(merged / "dir" / "big", "ab") as file:
            file.write(b"!")
            os.fsync(file.fileno())
        assert statistics(merged)["syncs"] == 0 and statistics(merged)["fsync"] == "volatile"
    assert not volatile_marker(upper).exists(), "a clean unmount removes the marker"
    assert not volatile_marker(upper).parent.parent.exists()

    with mounted_cowfs([lower], merged, upper, extra=("-o", "fsync=volatile")) as mount:
        mount.process.send_signal(signal.SIGKILL)
        mount.process.wait(timeout=30)
    assert volatile_marker(upper).is_dir(), "a crashed volatile mount leaves its marker"
    refused = subprocess.run(cowfs_command("mount", str(lower), str(upper), str(merged)),
                             capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 2 and "unclean volatile" in refused.stderr
    kernel = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={lower},upperdir={upper},"
         f"workdir={volatile_marker(upper).parent.parent.parent}", str(merged)],
        capture_output=True, text=True, check=False)
    if kernel.returncode == 0:
        subprocess.run(["umount", str(merged)], check=False)
    assert kernel.returncode != 0, "the kernel refuses the crashed volatile upper too"


def test_a_malformed_fsync_option_is_refused(tmp_path: Path) -> None:
    lower, upper, merged = make_stack(tmp_path)
    result = subprocess.run(cowfs_command("mount", "-o", "fsync=sometimes", str(lower),
                                          str(upper), str(merged)),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr == ("cowfs: malformed mount option 'fsync=sometimes': "
                             "expected fsync=strict|batch|volatile\n")
