"""`cowfs run`: a payload in new namespaces, with a busybox root made at test time."""

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path

import pytest
from conftest import cowfs_command, wait_until

from cowfs import cgroups, sandbox
from cowfs.layers import read_mountinfo

pytestmark = pytest.mark.mounts

# A sleep no other test session runs, so pgrep finds this session's processes only.
UNIQUE_SECONDS = 300_000 + os.getpid()


def leftover_run_mounts() -> list[str]:
    """Mounts of `cowfs run`s that have ended (other test sessions' live runs do not count)."""
    leftovers = []
    for mount in read_mountinfo():
        directory = os.path.basename(os.path.dirname(mount.mountpoint))
        if directory.startswith(sandbox.RUN_PREFIX) \
                and sandbox._owner_is_gone(directory[len(sandbox.RUN_PREFIX):]):
            leftovers.append(mount.mountpoint)
    return leftovers


def run(*arguments: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cowfs_command("run", *arguments), capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120, check=False)
    assert not leftover_run_mounts(), \
        "cowfs run left its mount behind"
    return result


def shell(rootfs: Path, script: str, *options: str) -> subprocess.CompletedProcess[str]:
    return run(*options, str(rootfs), "--", "/bin/sh", "-c", script)


def test_exit_status_and_signals(rootfs: Path) -> None:
    assert shell(rootfs, "exit 7").returncode == 7
    assert shell(rootfs, "kill -9 $$").returncode == 137
    assert run(str(rootfs), "--", "/bin/no-such-program").returncode == 127


def test_isolation(rootfs: Path, tmp_path: Path) -> None:
    result = shell(rootfs, "ps -o pid,comm; echo ---; hostname; echo ---; ls /sys/class/net;"
                           "echo ---; cat /proc/self/mountinfo; echo ---; ls -id / /..",
                   "--hostname", "box")
    assert result.returncode == 0, result.stderr
    processes, hostname, interfaces, mounts, roots = result.stdout.split("---\n")
    pids = [line.split()[0] for line in processes.splitlines()[1:]]
    assert pids[0] == "1" and len(pids) <= 3, "only PID 1, the shell and ps"
    assert hostname.strip() == "box"
    assert interfaces.split() == ["lo"]
    assert str(tmp_path) not in mounts and "/work" not in mounts
    first, second = (line.split()[0] for line in roots.splitlines())
    assert first == second, "/.. is /"


# podman's default set: chown dac_override fowner fsetid kill setgid setuid setpcap
# net_bind_service sys_chroot setfcap.
DEFAULT_CAPABILITIES = "00000000800405fb"


def capability_fields(output: str) -> dict[str, str]:
    return dict(line.split(":\t") for line in output.splitlines() if ":\t" in line)


def test_default_privileges(rootfs: Path) -> None:
    result = shell(rootfs, "grep -E '^(Cap|NoNewPrivs|Seccomp:)' /proc/self/status;"
                           "ls /proc/self/fd; echo x > /proc/sys/kernel/hostname && echo WROTE")
    assert capability_fields(result.stdout) == {
        "CapEff": DEFAULT_CAPABILITIES, "CapPrm": DEFAULT_CAPABILITIES,
        "CapBnd": DEFAULT_CAPABILITIES, "CapInh": "0000000000000000",
        "CapAmb": "0000000000000000", "NoNewPrivs": "1", "Seccomp": "2"}
    assert "WROTE" not in result.stdout
    descriptors = [line for line in result.stdout.splitlines() if line.isdigit()]
    assert descriptors == ["0", "1", "2", "3"], "0-2, and the one ls lists with"
    user = shell(rootfs, "grep -E '^Cap(Eff|Bnd)' /proc/self/status", "--user", "1000:1000")
    assert capability_fields(user.stdout) == {"CapEff": "0000000000000000",
                                              "CapBnd": DEFAULT_CAPABILITIES}


def test_a_chroot_escape_ends_at_the_sandbox_root(probe_rootfs: Path) -> None:
    """CAP_SYS_CHROOT is kept, so the classic escape runs: it climbs to the sandbox's root,
    since the host's root was unmounted, never to the host's."""
    escaped = run(str(probe_rootfs), "--", "/bin/probe", "escape")
    assert set(escaped.stdout.split()) == {".", "..", "bin", "etc", "proc", "dev", "sys",
                                           "cowfs-probe-jail"}, escaped.stderr
    refused = run("--cap-drop", "sys_chroot", str(probe_rootfs), "--", "/bin/probe", "escape")
    assert refused.stdout == "chroot EPERM\n"


def test_changes_land_in_the_upper(rootfs: Path, tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    result = shell(rootfs, "echo written > /new-file; cat /etc/image-file", "--upper",
                   str(upper), "--env", "GREETING=hi")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "from the image"
    assert (upper / "new-file").read_text() == "written\n"
    again = shell(rootfs, "cat /new-file; echo $GREETING", "--upper", str(upper), "--env",
                  "GREETING=hi")
    assert again.stdout == "written\nhi\n"
    assert shell(rootfs, "cat /new-file").returncode != 0, "without --upper nothing is kept"


def test_the_payload_runs_as_the_user_asked(rootfs: Path) -> None:
    result = shell(rootfs, "cat /proc/self/status | grep -E '^(Uid|Gid)'", "--user",
                   "1000:1000")
    lines = result.stdout.splitlines()
    assert lines[0].split()[1:] == ["1000"] * 4 and lines[1].split()[1:] == ["1000"] * 4


def no_leftover_cgroups() -> bool:
    """No cgroup of an ended run is left (other test sessions' live runs do not count)."""
    hierarchies = cgroups.read_hierarchies(Path("/proc/self/mountinfo").read_text(),
                                           Path("/proc/self/cgroup").read_text())
    return not [path for path in cgroups.leftovers(hierarchies)
                if sandbox._owner_is_gone(os.path.basename(path)[len(cgroups.CGROUP_PREFIX):])]


def test_memory_limit_kills_the_payload_and_not_us(rootfs: Path) -> None:
    # A small limit soon reached: reclaim before the kill is slow under emulation (the v2 guest).
    result = shell(rootfs, "cat /dev/zero | head -c 67108864 > /dev/shm/fill; echo survived",
                   "--memory", "32M")
    assert result.returncode == 137
    assert "survived" not in result.stdout
    assert result.stderr == ("cowfs run: out of memory: the memory limit (32M) killed a "
                             "process of the payload\n")
    assert shell(rootfs, "true", "--memory", "6M").returncode == 0, "the smallest limit runs"
    assert no_leftover_cgroups()


def test_pids_limit_stops_a_fork_bomb(rootfs: Path) -> None:
    # Counting /proc entries with a glob needs no fork, so it still runs at the limit.
    sleep = f"sleep {UNIQUE_SECONDS}"
    result = shell(rootfs, f"(while :; do {sleep} & done) 2>/dev/null; set -- /proc/[0-9]*;"
                           "echo $#", "--pids", "20")
    assert result.returncode == 0, result.stderr
    assert 2 < int(result.stdout) <= 20
    assert no_leftover_cgroups()
    assert subprocess.run(["pgrep", "-f", sleep], check=False).returncode == 1


def test_cpu_quota_throttles_a_busy_loop(rootfs: Path) -> None:
    command = cowfs_command("run", "--cpus", "0.2", str(rootfs), "--", "/bin/sh", "-c",
                            "while :; do :; done")
    hierarchies = cgroups.read_hierarchies(Path("/proc/self/mountinfo").read_text(),
                                           Path("/proc/self/cgroup").read_text())
    cpu = cgroups.choose(hierarchies)["cpu"]
    # The run's cgroup is named for the process that runs it: a warm start's forked one.
    before = set(cgroups.leftovers([cpu]))
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    try:
        def run_cgroup() -> Path | None:
            found = [Path(path) for path in cgroups.leftovers([cpu]) if path not in before]
            return found[0] if found else None

        wait_until(lambda: run_cgroup() is not None, what="the run's cgroup")
        group = run_cgroup()
        assert group is not None
        # The cgroup exists a moment before its limits are written (a slow guest sees it).
        if cpu.version == 1:
            wait_until(lambda: (group / "cpu.cfs_quota_us").read_text().strip() == "20000",
                       what="cpu.cfs_quota_us")
        else:
            wait_until(lambda: (group / "cpu.max").read_text().split() == ["20000", "100000"],
                       what="cpu.max")

        def is_throttled() -> bool:
            return any(line.split()[1] != "0"
                       for line in (group / "cpu.stat").read_text().splitlines()
                       if line.startswith("nr_throttled"))

        wait_until(is_throttled, what="CPU throttling")
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 128 + 15
    assert no_leftover_cgroups()


def test_signals_reach_the_payload(rootfs: Path, tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    command = cowfs_command("run", "--upper", str(upper), str(rootfs), "--", "/bin/sh", "-c",
                            "trap 'exit 42' TERM; echo > /started; sleep 300 & wait")
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: (upper / "started").exists(), what="the payload to start")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 42
    finally:
        process.kill()
        process.wait(timeout=30)


def test_a_terminal_passes_through(rootfs: Path) -> None:
    """Typed input reaches the payload, it sees a terminal of the right size, ^C interrupts it."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 77, 0, 0))
    script = ("test -t 0 && test -t 1 && echo in-a-terminal; tty; stty size; read line;"
              "echo got:$line; sleep 300")
    process = subprocess.Popen(
        cowfs_command("run", str(rootfs), "--", "/bin/sh", "-c", script),
        stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(terminal)
    seen = b""

    def read_until(marker: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + 60
        while marker not in seen and time.monotonic() < deadline:
            if select.select([controller], [], [], 1)[0]:
                seen += os.read(controller, 4096)
        assert marker in seen, seen.decode(errors="replace")

    try:
        read_until(b"33 77")
        os.write(controller, b"typed in\n")
        read_until(b"got:typed in")
        os.write(controller, b"\x03")            # ^C: SIGINT to the foreground process group
        assert process.wait(timeout=30) == 128 + signal.SIGINT
    finally:
        process.kill()
        process.wait(timeout=30)
        os.close(controller)
    lines = seen.decode().splitlines()
    assert "in-a-terminal" in lines and "/dev/console" in lines


def test_a_caller_with_threads_gets_fresh_interpreters(rootfs: Path) -> None:
    """A fork of a threaded process is unsafe: the daemon and helper are started by exec."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        with sandbox.Sandbox(str(rootfs)) as box:
            assert box.mount is not None and box.mount.daemon_pid is None
            assert box.run(["/bin/sh", "-c", "echo inside > /file; exit 5"]) == 5
            assert (Path(box.upper) / "file").read_text() == "inside\n"
    finally:
        stop.set()
        thread.join()
    assert not leftover_run_mounts()


def catches(pid: int, signum: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:"))
                 .split()[1], 16)
    return bool(caught & (1 << (signum - 1)))


def test_a_signal_during_set_up_reaches_the_payload(rootfs: Path) -> None:
    """A SIGTERM the helper forwards before PID 1 has its own forwarder is held, not dropped."""
    helpers: list[int] = []
    codes: list[int] = []
    # At 1% of a CPU, PID 1 takes seconds to build the root: the signal comes meanwhile.
    with sandbox.Sandbox(str(rootfs), cpus=0.01) as box:
        thread = threading.Thread(target=lambda: codes.append(
            box.run(["/bin/sh", "-c", "sleep 300"], on_start=helpers.append)))
        thread.start()
        try:
            wait_until(lambda: bool(helpers) and catches(helpers[0], signal.SIGTERM),
                       what="the helper's forwarder")
            os.kill(helpers[0], signal.SIGTERM)
            thread.join(timeout=60)
        finally:
            if thread.is_alive():
                assert box.cgroups is not None
                box.cgroups.kill()
                thread.join()
    assert codes == [128 + signal.SIGTERM]


def test_a_killed_run_is_swept_by_the_next(rootfs: Path, tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    sleep = f"sleep {UNIQUE_SECONDS}"
    command = cowfs_command("run", "--pids", "50", "--upper", str(upper), str(rootfs), "--",
                            "/bin/sh", "-c", f"echo > /started; {sleep}")
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: (upper / "started").exists(), what="the payload to start")
    finally:
        process.kill()
        process.wait(timeout=30)
    wait_until(lambda: subprocess.run(["pgrep", "-f", sleep], check=False).returncode
               == 1, what="the sandbox to die with its runtime")
    assert leftover_run_mounts()
    assert not no_leftover_cgroups()
    cleanup = subprocess.run(cowfs_command("cleanup"), capture_output=True, text=True,
                             timeout=60, check=False)
    assert cleanup.returncode == 0, cleanup.stderr
    assert "removed" in cleanup.stdout
    assert not leftover_run_mounts()
    assert no_leftover_cgroups()


def test_commit_makes_a_layer_the_next_run_stacks_on(rootfs: Path, tmp_path: Path) -> None:
    (rootfs / "etc" / "big").write_bytes(b"data " * 100_000)
    layer = tmp_path / "committed"
    first = shell(rootfs, "echo new > /new; rm /etc/image-file; chmod 600 /etc/big; mkdir /d",
                  "--commit", str(layer))
    assert first.returncode == 0, first.stderr
    assert (layer / "new").read_text() == "new\n"
    assert not any(name.startswith("trusted.overlay.cowfs")
                   for name in os.listxattr(layer / "etc" / "big"))
    second = shell(Path(f"{layer}:{rootfs}"), "cat /new; ls /etc; ls -l /etc/big; wc -c /etc/big")
    assert second.returncode == 0, second.stderr
    lines = second.stdout.splitlines()
    assert lines[0] == "new"
    assert "image-file" not in second.stdout
    assert lines[-2].startswith("-rw-------") and lines[-1].split()[0] == "500000"
    refused = shell(rootfs, "true", "--commit", str(layer))
    assert refused.returncode == 2 and "exists already" in refused.stderr


def test_host_network_shares_the_hosts_interfaces(rootfs: Path) -> None:
    result = shell(rootfs, "ls /sys/class/net", "--net", "host")
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == sorted(os.listdir("/sys/class/net"))


def test_the_library_api(rootfs: Path, tmp_path: Path) -> None:
    assert sandbox.run(str(rootfs), ["/bin/sh", "-c", "exit 3"]) == 3
    upper, layer = tmp_path / "upper", tmp_path / "layer"
    with sandbox.Sandbox([str(rootfs)], upper=str(upper), pids=30) as box:
        assert box.run(["/bin/sh", "-c", "echo one > /one"]) == 0
        assert box.run(["/bin/grep", "-q", "one", "/one"], user=(1000, 1000)) == 0
        box.commit(str(layer))
    assert (upper / "one").read_text() == "one\n"
    assert (layer / "one").read_text() == "one\n"
    assert not leftover_run_mounts()
    assert no_leftover_cgroups()
    with pytest.raises(sandbox.SandboxError, match="does not exist"), \
            sandbox.Sandbox(str(tmp_path / "missing")):
        pass


@pytest.mark.parametrize(("options", "root", "user"), [
    (("--cap-add", "CAP_SYS_TIME", "--cap-add", "chown"), 0x800405fb | 1 << 25, 1 << 25 | 1),
    (("--cap-drop", "ALL", "--cap-add", "net_bind_service"), 1 << 10, 1 << 10),
    (("--cap-drop", "setuid", "--cap-drop", "KILL"), 0x800405fb & ~(1 << 7 | 1 << 5), 0),
])
def test_capabilities_added_and_dropped(rootfs: Path, options: tuple[str, ...], root: int,
                                        user: int) -> None:
    """Root keeps the set; a non-root user has in effect only what was added by name."""
    for uid, effective in (("0:0", root), ("1000:1000", user)):
        result = shell(rootfs, "grep -E '^Cap(Eff|Bnd)' /proc/self/status", "--user", uid,
                       *options)
        assert capability_fields(result.stdout) == {"CapEff": f"{effective:016x}",
                                                    "CapBnd": f"{root:016x}"}, result.stderr


def test_capability_names_are_checked(rootfs: Path) -> None:
    unknown = shell(rootfs, "true", "--cap-add", "bogus")
    assert unknown.returncode == 2 and unknown.stderr == "cowfs: unknown capability 'bogus'\n"
    dropped = shell(rootfs, "true", "--cap-drop", "cap_nothing")
    assert dropped.returncode == 2 and "unknown capability 'cap_nothing'" in dropped.stderr
