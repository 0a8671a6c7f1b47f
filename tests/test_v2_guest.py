"""The cgroup v2 limit path on a pure v2 machine: a qemu guest (scripts/v2-guest.sh), opt-in.

This machine mounts v1 hierarchies for every controller, so `cowfs run`'s v2 files only meet a
fake cgroupfs in test_cgroups.py. With COWFS_V2_GUEST=1 the host test boots a guest whose only
hierarchy is cgroup2 and runs the real limit tests there (test_sandbox.py's, test_cgroups.py,
and the `test_guest_*` ones below, which the guest's COWFS_IN_V2_GUEST=1 turns on).
"""

import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import cowfs_command, reap

from cowfs import cgroups, sandbox

IN_GUEST = os.environ.get("COWFS_IN_V2_GUEST") == "1"
GUEST_SCRIPT = Path(__file__).parent.parent / "scripts" / "v2-guest.sh"
# Without KVM (nested hosts) the guest runs under TCG, ten times slower than the host.
GUEST_TIMEOUT_S = 1500
GUEST_TESTS = ("tests/test_cgroups.py", "tests/test_sandbox.py", "tests/test_v2_guest.py",
               "-k", "(test_cgroups or limit or quota or swept or library or test_guest)"
               " and not pure_v2_guest")
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
APPLETS = ("sh", "cat", "head", "sleep", "timeout")
V2_FILES = {"memory.max", "memory.swap.max", "cpu.max", "pids.max"}
V1_FILES = {"memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "cpu.cfs_quota_us",
            "cpu.cfs_period_us"}

in_guest = pytest.mark.skipif(not IN_GUEST, reason="runs inside the v2 guest only "
                              "(COWFS_V2_GUEST=1 ./test.sh tests/test_v2_guest.py boots it)")


@pytest.mark.skipif(IN_GUEST, reason="this is the guest")
@pytest.mark.skipif(os.environ.get("COWFS_V2_GUEST") != "1",
                    reason="slow and installs qemu: opt in with COWFS_V2_GUEST=1")
@pytest.mark.skipif(os.geteuid() != 0, reason="the guest needs root (qemu install, 9p root)")
def test_limits_in_a_pure_v2_guest() -> None:
    command = [str(GUEST_SCRIPT), "--timeout", str(GUEST_TIMEOUT_S - 60), "--",
               ".venv/bin/python", "-m", "pytest", "-p", "no:cacheprovider", "--color=no",
               "-rs", *GUEST_TESTS]
    started = time.monotonic()
    # Its own session, so a timeout kills qemu too, not just the script.
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=GUEST_TIMEOUT_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        reap(process)
    output = output.replace("\r\n", "\n")
    print(output, f"\nguest run: {time.monotonic() - started:.0f}s", sep="")
    assert process.returncode == 0, output[-3000:]
    assert re.search(r"controllers: .*\bmemory\b.*enabled: cpu memory pids", output), \
        "the guest's root cgroup offers the three controllers"
    summary = next(line for line in reversed(output.splitlines()) if " in " in line
                   and "passed" in line)
    assert "skipped" not in summary and "failed" not in summary, summary


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    return root


def hierarchies() -> list[cgroups.Hierarchy]:
    return cgroups.read_hierarchies(Path("/proc/self/mountinfo").read_text(),
                                    Path("/proc/self/cgroup").read_text())


def read_keyed(path: Path) -> dict[str, int]:
    """A flat-keyed cgroup file (memory.events, pids.events, cpu.stat) as a dict."""
    return {key: int(value) for key, value in
            (line.split() for line in path.read_text().splitlines())}


@in_guest
def test_guest_has_only_cgroup2_and_cowfs_chooses_it() -> None:
    found = hierarchies()
    assert [(hierarchy.mountpoint, hierarchy.version) for hierarchy in found] == \
        [("/sys/fs/cgroup", 2)]
    chosen = cgroups.choose(found)
    assert {name: hierarchy.version for name, hierarchy in chosen.items()} == \
        {"memory": 2, "cpu": 2, "pids": 2}


@in_guest
def test_guest_run_from_a_cgroup_that_holds_processes(rootfs: Path) -> None:
    """As from a systemd login session: the caller's cgroup holds processes, so it cannot give
    its children controllers; the run's cgroup goes beside it, and the limit holds."""
    scope = Path("/sys/fs/cgroup/test-session.scope")
    scope.mkdir()
    try:
        payload = "(while :; do sleep 30 & done) 2>/dev/null; set -- /proc/[0-9]*; echo $#"
        result = subprocess.run(
            ["sh", "-c", f'echo $$ > {scope}/cgroup.procs && exec "$@"', "caller",
             *cowfs_command("run", "--pids", "20", str(rootfs), "--", "/bin/sh", "-c",
                            payload)],
            capture_output=True, text=True, timeout=600, check=False)
        assert result.returncode == 0, result.stderr
        assert 2 < int(result.stdout) <= 20
        assert not [path for path in os.listdir("/sys/fs/cgroup")
                    if path.startswith(cgroups.CGROUP_PREFIX)]
    finally:
        scope.rmdir()


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def cgroup_writes() -> Iterator[list[str]]:
    """The cgroup files cowfs writes, as `name = value`, from its debug log."""
    logger = logging.getLogger("cowfs.cgroups")
    handler, level = _Messages(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@in_guest
def test_guest_limits_are_v2_files_that_hold(rootfs: Path, cgroup_writes: list[str]) -> None:
    """Each limit lands in its v2 file and bites; teardown kills through cgroup.kill."""
    with sandbox.Sandbox(str(rootfs), memory="64M", cpus=0.2, pids=20) as box:
        assert box.cgroups is not None
        (directory,) = box.cgroups.directories
        group = Path(directory)
        assert group.parent == Path("/sys/fs/cgroup")
        assert set((group.parent / "cgroup.subtree_control").read_text().split()) >= \
            {"memory", "cpu", "pids"}
        assert (group / "memory.max").read_text().strip() == str(64 << 20)
        assert (group / "memory.swap.max").read_text().strip() == "0"
        assert (group / "cpu.max").read_text().split() == ["20000", "100000"]
        assert (group / "pids.max").read_text().strip() == "21", "and the helper outside"

        fill = "cat /dev/zero | head -c 209715200 > /dev/shm/fill; echo survived"
        assert box.run(["/bin/sh", "-c", fill]) == 137
        assert read_keyed(group / "memory.events")["oom_kill"] >= 1
        assert box.oom_killed
        bomb = "(while :; do sleep 30 & done) 2>/dev/null; exit 0"
        assert box.run(["/bin/sh", "-c", bomb]) == 0
        assert read_keyed(group / "pids.events")["max"] >= 1
        busy = "timeout 2 sh -c 'while :; do :; done'; exit 0"
        assert box.run(["/bin/sh", "-c", busy]) == 0
        assert read_keyed(group / "cpu.stat")["nr_throttled"] >= 1

        # What teardown must kill: a process the payload did not start, left in the cgroup.
        straggler = subprocess.Popen(["sleep", "300"])
        try:
            box.cgroups.join(straggler.pid)
        except BaseException:
            straggler.kill()
            raise
    assert straggler.wait(timeout=30) == -signal.SIGKILL
    assert not group.exists()
    written = {write.rpartition("/")[2].partition(" = ")[0] for write in cgroup_writes}
    # No cgroup.subtree_control: the guest's root passes the three controllers on already.
    assert written >= V2_FILES | {"cgroup.procs", "cgroup.kill"}
    assert not written & V1_FILES
