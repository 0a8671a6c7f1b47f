"""The warm start (cowfs.supervisor): commands forked from a process that imported cowfs once,
the same answers as a cold start, and nothing depending on the supervisor staying alive."""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import cowfs_command, is_mounted, stop_supervisors, wait_until

from cowfs import client, supervisor

pytestmark = pytest.mark.mounts


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[dict[str, str]]:
    """An environment whose commands reach a supervisor of this test's own."""
    directory = tmp_path / "runtime"
    directory.mkdir(mode=0o700)
    environment = {**os.environ, "COWFS_RUNTIME_DIR": str(directory)}
    yield environment
    stop_supervisors(str(directory))


def cowfs(environment: dict[str, str], *arguments: str,
          cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cowfs_command(*arguments), env=environment, capture_output=True,
                          text=True, timeout=60, check=False, cwd=cwd)


def status(environment: dict[str, str]) -> str:
    return cowfs(environment, "supervisor", "status").stdout


def socket_path(environment: dict[str, str]) -> str:
    return os.path.join(environment["COWFS_RUNTIME_DIR"], f"supervisor-{client.slot()}.sock")


def test_mount_and_umount_are_served_warm_with_the_callers_paths(
        runtime: dict[str, str], layer_dirs) -> None:
    lower, upper, merged = layer_dirs("lower", "upper", "merged")
    (lower / "file").write_text("lower\n")
    first = cowfs(runtime, "mount", "lower", "upper", "merged", cwd=str(lower.parent))
    assert (first.returncode, first.stderr) == (0, "")
    try:
        assert "1 commands served" in status(runtime)
        assert (merged / "file").read_text() == "lower\n"
        (merged / "new").write_text("new\n")
    finally:
        unmounted = cowfs(runtime, "umount", str(merged))
    assert unmounted.returncode == 0, unmounted.stderr
    assert not is_mounted(merged)
    assert (upper / "new").read_text() == "new\n"
    assert "2 commands served" in status(runtime)
    path = Path(socket_path(runtime))
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("arguments", [
    ("umount", "/nonexistent"),
    ("mount", "/no/such/lower", "/tmp/merged"),
    ("-o", "lowerdir=/no/such/lower,bogus=1", "/tmp/merged"),
    ("run", "--pids", "1", "/", "--", "true"),
])
def test_errors_are_the_cold_starts(runtime: dict[str, str], arguments: tuple[str, ...]) -> None:
    warm = cowfs(runtime, *arguments)
    cold = cowfs({**runtime, "COWFS_SUPERVISOR": "off"}, *arguments)
    assert (warm.returncode, warm.stderr) == (cold.returncode, cold.stderr)
    assert warm.returncode != 0 and warm.stderr.count("\n") == 1, warm.stderr
    assert "commands served" in status(runtime), "the warm one answered"


def test_mounts_outlive_a_killed_supervisor(runtime: dict[str, str], layer_dirs) -> None:
    lower, upper, merged = layer_dirs("lower", "upper", "merged")
    (lower / "file").write_text("lower\n")
    assert cowfs(runtime, "mount", str(lower), str(upper), str(merged)).returncode == 0
    try:
        killed = supervisor.request_to(socket_path(runtime), {"command": "status"})
        assert killed is not None
        os.kill(killed["pid"], signal.SIGKILL)
        (merged / "after").write_text("still served\n")
        assert (merged / "file").read_text() == "lower\n"
        # The next command starts a new supervisor, which finds the mount to unmount.
        unmounted = cowfs(runtime, "umount", str(merged))
        assert unmounted.returncode == 0, unmounted.stderr
    finally:
        if is_mounted(merged):
            subprocess.run(["umount", "-l", str(merged)], check=False)
    assert (upper / "after").read_text() == "still served\n"
    started = supervisor.request_to(socket_path(runtime), {"command": "status"})
    assert started is not None and started["pid"] != killed["pid"]


def test_a_mount_without_the_kernel_cache_library_runs_cold(
        runtime: dict[str, str], layer_dirs) -> None:
    lower, upper, merged = layer_dirs("lower", "upper", "merged")
    result = cowfs(runtime, "mount", "-o", "kernel_caches=off", str(lower), str(upper),
                   str(merged))
    assert result.returncode == 0, result.stderr
    try:
        features = json.loads(os.getxattr(merged, "trusted.cowfs.stats"))["kernel_features"]
        assert features["reason"] == "turned off (-o kernel_caches=off)", features
    finally:
        assert cowfs(runtime, "umount", str(merged)).returncode == 0


def test_the_payload_gets_the_callers_umask(runtime: dict[str, str], rootfs: Path) -> None:
    def with_umask() -> None:
        os.umask(0o027)
    result = subprocess.run(cowfs_command("run", str(rootfs), "--", "/bin/sh", "-c", "umask"),
                            env=runtime, capture_output=True, text=True, timeout=60,
                            check=False, preexec_fn=with_umask)
    assert (result.returncode, result.stdout) == (0, "0027\n"), result.stderr
    assert "1 commands served" in status(runtime)


@pytest.fixture
def reachable_runtime() -> Iterator[dict[str, str]]:
    """As `runtime`, in a directory another user can reach (tmp_path's parents are 0700)."""
    directory = tempfile.mkdtemp(prefix="cowfs-runtime-")
    try:
        yield {**os.environ, "COWFS_RUNTIME_DIR": directory}
    finally:
        stop_supervisors(directory)
        shutil.rmtree(directory, ignore_errors=True)


def test_another_user_is_not_heard(reachable_runtime: dict[str, str]) -> None:
    runtime = reachable_runtime
    assert "commands served" in cowfs(runtime, "supervisor", "start").stdout
    path = socket_path(runtime)
    # Open the way for the test; the supervisor still checks who connects.
    os.chmod(os.path.dirname(path), 0o711)
    os.chmod(path, 0o666)
    # A child of this test as uid 65534 (no exec: the interpreter may be in a home it cannot
    # read) connects and says something; the supervisor hangs up unheard.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            connection.connect(path)
            try:
                connection.send(b"x")
                answer = connection.recv(100)
            except (BrokenPipeError, ConnectionResetError):   # closed before, or unread
                answer = b""
            os.write(write_end, b"hung up" if answer == b"" else answer)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as answer:
        heard = answer.read()
    os.waitpid(pid, 0)
    assert heard == "hung up"
    assert "0 commands served" in status(runtime)


def served_by(path: str) -> int | str:
    """The pid of the supervisor answering at *path*, or how it did not answer."""
    try:
        answer = supervisor.request_to(path, {"command": "status"})
    except (BrokenPipeError, ConnectionResetError):     # closed before it was sent, or unread
        return "hung up"
    return answer["pid"] if answer is not None else "nobody"


def test_two_users_supervisors_side_by_side(reachable_runtime: dict[str, str]) -> None:
    """Root's supervisor and one of uid 65534's serve at once, each its own user alone."""
    runtime = reachable_runtime
    assert "commands served" in cowfs(runtime, "supervisor", "start").stdout
    root_path = socket_path(runtime)
    os.chmod(os.path.dirname(root_path), 0o711)     # the way in; the supervisor still checks
    os.chmod(root_path, 0o666)
    user_directory = Path(runtime["COWFS_RUNTIME_DIR"], "user")
    user_directory.mkdir(mode=0o700)
    os.chown(user_directory, 65534, 65534)
    user_path = str(user_directory / os.path.basename(root_path))

    def as_user(work: Callable[[], object], before: Callable[[], object] = lambda: None
                ) -> int:
        """Fork, do *before*, become uid 65534 (no exec, nor imports after: the interpreter
        may be in a home it cannot read), and do *work*; the child's pid."""
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                before()
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
                work()
                code = 0
            finally:
                os._exit(code)
        return pid

    user_supervisor = as_user(lambda: supervisor.serve(user_path),
                              before=supervisor.Supervisor._preload)
    try:
        wait_until(lambda: os.path.exists(user_path), what="the user's supervisor")
        read_end, write_end = os.pipe()

        def ask_both() -> None:
            answers = [served_by(path) for path in (user_path, root_path)]
            os.write(write_end, json.dumps(answers).encode())

        asker = as_user(ask_both)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            user_answers = json.loads(pipe.read())
        assert os.waitpid(asker, 0)[1] == 0
        # The user hears its own supervisor and not root's, which hangs up on it unheard;
        # root is not the owner of the user's either.
        assert user_answers == [user_supervisor, "hung up"]
        assert served_by(user_path) == "hung up"
        assert served_by(root_path) not in (user_supervisor, "hung up")
        assert "0 commands served" in status(runtime)
    finally:
        os.kill(user_supervisor, signal.SIGTERM)
        os.waitpid(user_supervisor, 0)
