"""A warm start for the tests' cowfs daemons: one process loads cowfs's kernel-cache library,
imports pyfuse3, trio and cowfs once, then forks a `cowfs mount -f` per request. A test's
mount then costs a fork instead of a Python start and its imports (about 200 ms here, paid
thousands of times by the oracles).

The forked child runs the command line's own code (`cowfs.cli.main`) with the test's
arguments, stdout and stderr to the test's log, so the daemon is the one `python -m cowfs`
would run; only the library's loading happened earlier, as `-o kernel_caches=off` or another
libfuse cannot have it (tests/conftest.py starts those as fresh processes). The mount's exit
status comes back over the request's connection, so a test waits for it as for a child.

Run as `python tests/cowfs_zygote.py SOCKET`; it serves until its stdin closes (the test
session that started it ended, however it ended).
"""

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import traceback

# The most a request (argv, the log's path, the directory to run in) may take.
MAX_REQUEST = 1 << 20


def serve(socket_path: str) -> None:
    from cowfs import fuse_extensions
    fuse_extensions.load()          # before pyfuse3, as every mount does
    import pyfuse3  # noqa: F401    (what each mount would import again)
    import trio  # noqa: F401

    from cowfs import cli, mount, union  # noqa: F401

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    os.chmod(socket_path, 0o600)
    listener.listen(64)
    print("ready", flush=True)
    children: dict[int, tuple[int, socket.socket]] = {}     # pidfd: (pid, connection)
    while True:
        readable, _, _ = select.select([sys.stdin, listener, *children], [], [])
        if sys.stdin in readable and not sys.stdin.readline():
            return
        if listener in readable:
            connection, _ = listener.accept()
            request = json.loads(_read_line(connection))
            pid = os.fork()
            if pid == 0:
                listener.close()
                _run_mount(connection, request)     # never returns
            pidfd = os.pidfd_open(pid)
            children[pidfd] = (pid, connection)
            connection.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        for pidfd in [fd for fd in readable if isinstance(fd, int)]:
            pid, connection = children.pop(pidfd)
            os.close(pidfd)
            _, status = os.waitpid(pid, 0)
            with contextlib.suppress(OSError):
                # As subprocess.Popen says it: the exit code, or minus the signal.
                returncode = os.waitstatus_to_exitcode(status)
                connection.sendall(json.dumps({"returncode": returncode}).encode() + b"\n")
            connection.close()


def _read_line(connection: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = connection.recv(65536)
        if not chunk or len(data) > MAX_REQUEST:
            raise ConnectionError("the request ended early")
        data += chunk
    return data


def _run_mount(connection: socket.socket, request: dict) -> None:
    code = 1
    try:
        connection.close()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        os.chdir(request["cwd"])
        sys.argv = ["cowfs", *request["argv"]]
        import setproctitle

        from cowfs import cli  # imported by the zygote already
        # `ps` shows the command line the daemon stands for, not the zygote's.
        setproctitle.setproctitle(" ".join([sys.executable, "-m", "cowfs", *request["argv"]]))
        try:
            code = cli.main(request["argv"])
        except SystemExit as exc:       # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


class Zygote:
    """The server process, started once per test session and stopped at its end."""

    def __init__(self, directory: str) -> None:
        self.socket_path = os.path.join(directory, "zygote.sock")
        self.process = subprocess.Popen(
            [sys.executable, __file__, self.socket_path], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"the cowfs zygote did not start: {line!r}")

    def start(self, argv: list[str], log_path: str) -> "ForkedDaemon":
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect(self.socket_path)
        request = {"argv": argv, "log": log_path, "cwd": os.getcwd()}
        connection.sendall(json.dumps(request).encode() + b"\n")
        return ForkedDaemon(connection)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class ForkedDaemon:
    """A daemon forked by the zygote, as much of subprocess.Popen as the tests use."""

    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.buffer = b""
        self.pid: int = self._message(None)["pid"]
        self.returncode: int | None = None

    def _message(self, timeout: float | None) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([self.connection], [], [], left)
            if not readable:
                raise subprocess.TimeoutExpired("cowfs (forked)", timeout or 0)
            chunk = self.connection.recv(4096)
            if not chunk:
                raise ConnectionError("the cowfs zygote went away")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.wait(timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._message(timeout)["returncode"]
            self.connection.close()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)


if __name__ == "__main__":
    sys.path[0] = os.getcwd()       # cowfs from where `python -m cowfs` would take it
    serve(sys.argv[1])
