"""The benchmark harness itself: `python -m benchmarks --quick` runs and writes well-formed results.

No timing is asserted: the machine is shared and CI is not a benchmark. What must hold is that
every target's merged view passed the tree check, the lowers were left unchanged, the outputs
exist, and no mount survives the run, even when it fails.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import layers, workloads
from benchmarks.residency import Canary, drop_file_cache, is_resident, resident_pages
from benchmarks.run import MODES
from benchmarks.targets import Mounted, Target, Tools
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
    """The README's quick mode, native beside cowfs (the peers' mounts are the smoke run's,
    below): every workload must work, whatever the timings."""
    out, work = tmp_path / "out", tmp_path / "work"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out),
             "--work", str(work), "--targets", "native,cowfs"],
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


def test_smoke_run_has_the_package_install_and_checks_warm_rows(tmp_path: Path) -> None:
    """The dpkg-like install runs on every kind of target (fuse-overlayfs where installed) and
    verifies; warm rows say they were checked warm."""
    out = tmp_path / "out"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks", "--smoke", "--targets",
             "native,overlay,fuse-overlayfs,cowfs", "--only", "pkg_install,ls,stat.1",
             "--out", str(out), "--work", str(tmp_path / "work")],
            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    finally:
        unmount_below(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["errors"] == [] and results["lowers_unchanged"] is True
    rows = {row["key"]: row for row in results["rows"]}
    install = rows["pkg_install"]
    assert install["label"].startswith("package install (dpkg-like): 5 packages, 65 files")
    for target in results["targets"]:
        assert install["targets"][target]["values"][0] > 0
        checked = rows["ls.warm"]["targets"][target]["warm_checked"]
        assert len(checked) == 1 and checked[0]["attempts"] >= 1, checked
        assert "warm_checked" not in rows["ls.cold"]["targets"][target]
    markdown = (out / "results.md").read_text()
    assert "| package install (dpkg-like): 5 packages, 65 files |" in markdown
    assert "## Warm checks" in markdown and "warm rows are checked warm" in markdown


def test_residency_sees_a_dropped_file(tmp_path: Path) -> None:
    """The warm check is only as good as mincore: a just-dropped file must not look resident."""
    canary = Canary(tmp_path / "canary")
    canary.warm()
    assert is_resident(canary.path)
    drop_file_cache(canary.path)
    assert resident_pages(canary.path)[0] == 0
    canary.warm()
    assert canary.still_warm()
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    assert not canary.still_warm()


def test_a_pass_across_a_cache_drop_is_not_reported_warm(tmp_path: Path) -> None:
    env = workloads.Env(MODES["smoke"], None, None, {})
    mount = Mounted(Target("native", "native"), tmp_path, None, tmp_path, Tools(None, None))

    def dropping_pass() -> int:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return 0

    workloads.time_warm(mount, env, dropping_pass, (), 0)
    assert env.last_warmth is not None and not env.last_warmth.warm
    assert env.last_warmth.attempts == workloads.WARM_ATTEMPTS
    assert "canary evicted" in env.last_warmth.problems[0]
    assert "drop_pagecache" in env.last_warmth.problems[0]


def test_package_install_verifies_and_native_is_put_back(tmp_path: Path) -> None:
    """Natively: install, verify, put back (checked against the tree); a lost file is caught."""
    sizes = MODES["smoke"]
    stack = layers.rootfs_stack(sizes)
    layers.build_stack(stack, tmp_path)
    assert stack.native
    plan = layers.package_plan(sizes)
    assert all(package.replaced and package.removed for package in plan)
    for package in plan:
        workloads.install_package(stack.native, package)
    workloads.verify_install(stack.native, plan, sizes.rootfs_files)
    workloads.uninstall_natively(stack.native, plan, sizes)
    for package in plan:
        workloads.install_package(stack.native, package)
    replaced = sorted(plan[-1].replaced)[0]
    (stack.native / replaced).unlink()
    with pytest.raises(workloads.WorkloadError, match=replaced):
        workloads.verify_install(stack.native, plan, sizes.rootfs_files)
