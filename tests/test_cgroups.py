"""Limits through cgroups: detection and files against a fake cgroupfs, lifecycles for real."""

import os
import subprocess
from pathlib import Path

import pytest

from cowfs import cgroups
from cowfs.cgroups import Hierarchy, Limits, RunCgroups

HYBRID_MOUNTINFO = """\
30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
31 25 0:27 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu
32 25 0:28 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
33 25 0:29 / /sys/fs/cgroup/pids rw,nosuid - cgroup cgroup rw,pids
34 25 0:30 / /proc rw - proc proc rw
"""
PROC_CGROUP = "4:memory:/runtime\n3:pids:/\n1:cpu:/\n0::/\n"


def fake_cgroupfs(root: Path, v2_controllers: str) -> None:
    for name in ("unified", "cpu", "memory/runtime", "pids"):
        (root / "sys/fs/cgroup" / name).mkdir(parents=True)
    (root / "sys/fs/cgroup/unified/cgroup.controllers").write_text(v2_controllers + "\n")


def test_sizes() -> None:
    assert cgroups.parse_size("256M") == 256 << 20
    assert cgroups.parse_size("1g") == 1 << 30
    assert cgroups.parse_size("512KiB") == 512 << 10
    assert cgroups.parse_size("1048576") == 1 << 20
    with pytest.raises(ValueError, match="not a size"):
        cgroups.parse_size("lots")


def test_each_controller_from_v2_when_it_has_it(tmp_path: Path) -> None:
    fake_cgroupfs(tmp_path, "memory pids")
    chosen = cgroups.choose(cgroups.read_hierarchies(HYBRID_MOUNTINFO, PROC_CGROUP,
                                                     str(tmp_path)))
    assert {name: hierarchy.version for name, hierarchy in chosen.items()} == \
        {"memory": 2, "cpu": 1, "pids": 2}


def test_hybrid_machine_with_an_empty_v2_uses_v1(tmp_path: Path) -> None:
    fake_cgroupfs(tmp_path, "hugetlb")
    chosen = cgroups.choose(cgroups.read_hierarchies(HYBRID_MOUNTINFO, PROC_CGROUP,
                                                     str(tmp_path)))
    assert {name: hierarchy.version for name, hierarchy in chosen.items()} == \
        {"memory": 1, "cpu": 1, "pids": 1}
    assert chosen["memory"].own_path == "/runtime", "under the caller's own cgroup"


def test_v2_limit_files(tmp_path: Path) -> None:
    fake_cgroupfs(tmp_path, "memory cpu pids")
    chosen = cgroups.choose(cgroups.read_hierarchies(HYBRID_MOUNTINFO, PROC_CGROUP,
                                                     str(tmp_path)))
    run = RunCgroups("abc", chosen)
    run.create(Limits(memory_bytes=64 << 20, cpus=0.5, pids=20))
    group = tmp_path / "sys/fs/cgroup/unified/cowfs-abc"
    assert run.directories == [str(group)]
    assert (group / "memory.max").read_text() == str(64 << 20)
    assert (group / "memory.swap.max").read_text() == "0"
    assert (group / "cpu.max").read_text() == "50000 100000"
    assert (group / "pids.max").read_text() == "21", "the 20 and the helper outside"
    assert (group.parent / "cgroup.subtree_control").read_text() == "+pids"   # the last write


def test_v2_runs_beside_a_caller_whose_cgroup_holds_processes(tmp_path: Path) -> None:
    """A v2 cgroup with processes cannot give its children controllers (a systemd session's
    scope holds the shell): the run's cgroup goes beside it, under the nearest empty one."""
    fake_cgroupfs(tmp_path, "memory cpu pids")
    unified = tmp_path / "sys/fs/cgroup/unified"
    scope = unified / "user.slice" / "session-1.scope"
    scope.mkdir(parents=True)
    (scope / "cgroup.procs").write_text("4242\n")
    (unified / "user.slice" / "cgroup.procs").write_text("")
    (unified / "cgroup.subtree_control").write_text("cpu memory pids\n")
    chosen = cgroups.choose(cgroups.read_hierarchies(
        HYBRID_MOUNTINFO, "0::/user.slice/session-1.scope\n", str(tmp_path)))
    run = RunCgroups("abc", chosen)
    run.create(Limits(pids=20))
    group = unified / "user.slice" / "cowfs-abc"
    assert run.directories == [str(group)]
    assert (group / "pids.max").read_text() == "21", "the 20 and the helper outside"
    assert (unified / "user.slice" / "cgroup.subtree_control").read_text() == "+pids"
    assert (unified / "cgroup.subtree_control").read_text() == "cpu memory pids\n", \
        "a controller the root passes on already is not written again"
    assert list(cgroups.leftovers([chosen["pids"]])) == [str(group)]


def test_v1_limit_files(tmp_path: Path) -> None:
    fake_cgroupfs(tmp_path, "")
    chosen = cgroups.choose(cgroups.read_hierarchies(HYBRID_MOUNTINFO, PROC_CGROUP,
                                                     str(tmp_path)))
    RunCgroups("abc", chosen).create(Limits(memory_bytes=64 << 20, cpus=1.5, pids=20))
    base = tmp_path / "sys/fs/cgroup"
    assert (base / "memory/runtime/cowfs-abc/memory.limit_in_bytes").read_text() == \
        str(64 << 20)
    assert (base / "cpu/cowfs-abc/cpu.cfs_quota_us").read_text() == "150000"
    assert (base / "cpu/cowfs-abc/cpu.cfs_period_us").read_text() == "100000"
    assert (base / "pids/cowfs-abc/pids.max").read_text() == "21", "the 20 and the helper outside"


def real_hierarchies() -> list[Hierarchy]:
    return cgroups.read_hierarchies(Path("/proc/self/mountinfo").read_text(),
                                    Path("/proc/self/cgroup").read_text())


@pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")
def test_real_limits_and_teardown() -> None:
    chosen = cgroups.choose(real_hierarchies())
    if not chosen:
        pytest.skip("no cgroup controller on this machine")
    run = RunCgroups(f"test-{os.getpid()}", chosen)
    run.create(Limits(memory_bytes=64 << 20, cpus=0.5, pids=20))
    try:
        sleeper = subprocess.Popen(["sleep", "60"])
        run.join(sleeper.pid)
        assert sleeper.pid in run.pids()
        if chosen["memory"].version == 1:
            directory = run._directory(chosen["memory"])
            assert Path(directory, "memory.limit_in_bytes").read_text().strip() == \
                str(64 << 20)
    finally:
        run.remove()
    assert sleeper.wait(timeout=10) != 0, "teardown killed what was left"
    assert run.directories == []
    assert not [path for path in cgroups.leftovers(real_hierarchies())
                if path.endswith(f"test-{os.getpid()}")]


@pytest.mark.skipif(not Path("/sys/fs/cgroup/unified/cgroup.procs").exists()
                    and not Path("/sys/fs/cgroup/cgroup.procs").exists(),
                    reason="no cgroup v2 hierarchy mounted")
@pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")
def test_real_v2_lifecycle() -> None:
    """Create, join, cgroup.kill, rmdir in the v2 hierarchy, controllers or not."""
    (v2,) = [hierarchy for hierarchy in real_hierarchies() if hierarchy.version == 2]
    run = RunCgroups(f"test-v2-{os.getpid()}", {"pids": v2})
    run.create(Limits())
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        run.join(sleeper.pid)
        assert run.pids() == {sleeper.pid}
        run.kill()
        assert sleeper.wait(timeout=10) == -9
    finally:
        run.remove()
        sleeper.kill()
    assert not os.path.exists(os.path.join(v2.mountpoint, v2.own_path.lstrip("/"), run.name))
