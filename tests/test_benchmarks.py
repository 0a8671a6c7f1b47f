"""The benchmark harness itself: `python -m benchmarks --quick` runs and writes well-formed results.

No timing is asserted: the machine is shared and CI is not a benchmark. What must hold is that
every target's merged view passed the tree check, the lowers were left unchanged, the outputs
exist, and no mount survives the run, even when it fails.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cowfs.layers import read_mountinfo

REPO = Path(__file__).resolve().parent.parent
SMOKE_TIMEOUT_S = 240

pytestmark = pytest.mark.mounts


def unmount_below(path: Path) -> None:
    """Lazily unmount whatever is still mounted under *path* (deepest first); never raises."""
    points = sorted((mount.mountpoint for mount in read_mountinfo()
                     if mount.mountpoint.startswith(str(path))), reverse=True)
    for point in points:
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def test_quick_run_writes_results(tmp_path: Path) -> None:
    """The README's quick mode, as a user runs it (about a minute): it must work, whatever
    the timings."""
    out, work = tmp_path / "out", tmp_path / "work"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out),
             "--work", str(work)],
            cwd=REPO, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S, check=False)
    finally:
        unmount_below(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert "native" in results["targets"] and "cowfs" in results["targets"], results["targets"]
    assert set(results["tree_check"].values()) == {"ok"}, results["tree_check"]
    assert results["lowers_unchanged"] is True
    assert results["errors"] == []
    assert results["machine"]["kernel"].startswith("Linux")

    keys = {row["key"] for row in results["rows"]}
    assert {"first_write.4K", "first_write.sparse.upper_kib", "chmod.16M", "many_copy_ups.p99",
            "concurrent_writers", "stat.10.cold", "ls.warm", "seq_read", "untar",
            "rm_rf"} <= keys
    for row in results["rows"]:
        for target in results["targets"]:
            cell = row["targets"][target]
            assert len(cell["values"]) == results["rounds"], (row["key"], target)
            assert all(isinstance(value, float) and value >= 0 for value in cell["values"])
            if target != "native" and row["unit"] == "s":
                assert cell["ratio"] > 0, (row["key"], target)

    markdown = (out / "results.md").read_text()
    assert "| workload | native |" in markdown
    assert markdown.count("\n| ") >= len(results["rows"])
    for name in results["plots"]:
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    assert not list(work.iterdir()), "the run left its layers behind"
    assert "results in" in result.stderr


def test_unknown_target_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--targets", "native,nonsense",
         "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "unknown target 'nonsense'" in result.stderr
    assert not any(mount.mountpoint.startswith(str(tmp_path)) for mount in read_mountinfo())


def test_missing_peer_is_reported_and_skipped(tmp_path: Path) -> None:
    """No fuse-overlayfs: the run goes on without it and says why."""
    out = tmp_path / "out"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks", "--smoke", "--targets",
             "native,fuse-overlayfs", "--fuse-overlayfs", str(tmp_path / "missing"),
             "--only", "first_write.4K", "--out", str(out), "--work", str(tmp_path / "work")],
            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    finally:
        unmount_below(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert "fuse-overlayfs" in results["skipped_targets"]
    assert "skipping fuse-overlayfs" in result.stderr
    assert results["targets"] == ["native"]
    assert [row["key"] for row in results["rows"]] == ["first_write.4K"]
