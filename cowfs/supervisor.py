"""The warm start: one process that imported cowfs, pyfuse3 and trio (and loaded the
kernel-cache library) once, and forks a process per `cowfs` command sent by `cowfs.client`.

The forked process takes on the caller's side of things (its stdio, working directory, umask,
environment, groups, capabilities, limits and cgroups) and runs the command line's own code,
`cowfs.cli.main`, so a command validates and fails exactly as when run cold. A mount's daemon is
forked from that process in turn and detaches as always (its own session; reparented once the
command returns): nothing depends on the supervisor staying alive. Forked daemons share the
supervisor's pages, the interpreter and the imported modules among them.

Only its owner reaches it: the socket is 0600 in a 0700 directory of the owner's
(`cowfs.client.runtime_directory`), and a peer of another uid is dropped unheard. A caller the
forked process cannot stand for (another namespace, a seccomp filter, ids or capabilities this
process cannot take on) is told to run the command itself.
"""

import argparse
import contextlib
import fcntl
import functools
import gc
import logging
import marshal
import os
import resource
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable

from cowfs import client

log = logging.getLogger(__name__)

# The caller's credentials, as /proc/PID/status says them.
_CAPABILITY_FIELDS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
_CREDENTIAL_FIELDS = ("Uid", "Gid", "Groups", "NoNewPrivs", "Seccomp", *_CAPABILITY_FIELDS)
_CAP_SETGID, _CAP_SETPCAP = 6, 8
_RLIMITS = [getattr(resource, name) for name in dir(resource) if name.startswith("RLIMIT_")]
_FDS_PER_REQUEST = 4          # stdin, stdout, stderr, the working directory


class NotServed(Exception):
    """The caller must run the command itself; the message says why."""


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="cowfs supervisor")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--ready-fd", type=int)
    arguments = parser.parse_args(argv)
    serve(arguments.socket, ready_fd=arguments.ready_fd)


def serve(path: str, ready_fd: int | None = None) -> bool:
    """Serve until stopped (SIGTERM, `cowfs supervisor stop`, or a newer build's client);
    False at once if another supervisor serves *path*."""
    supervisor = Supervisor(path)
    try:
        if not supervisor.listen():
            return False
        if ready_fd is not None:
            os.write(ready_fd, b"ready")
            os.close(ready_fd)
            ready_fd = None
        supervisor.loop()
        return True
    finally:
        if ready_fd is not None:
            os.close(ready_fd)
        supervisor.close()


def _status_fields(pid: int | str) -> dict[str, str]:
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in _CREDENTIAL_FIELDS:
                fields[key] = value.strip()
    return fields


def _namespaces(pid: int | str) -> dict[str, int]:
    directory = f"/proc/{pid}/ns"
    return {name: os.stat(os.path.join(directory, name)).st_ino
            for name in os.listdir(directory)}


def _security_label(pid: int | str) -> str | None:
    try:
        with open(f"/proc/{pid}/attr/current") as label:
            return label.read()
    except OSError:
        return None


@functools.cache
def _own_view() -> tuple[dict[str, str], dict[str, int], str | None]:
    """The supervisor's own credentials, namespaces and label: fixed while it serves."""
    return _status_fields("self"), _namespaces("self"), _security_label("self")


def _bits(mask: str) -> frozenset[int]:
    value = int(mask, 16)
    return frozenset(number for number in range(value.bit_length()) if value >> number & 1)


def plan_for(caller: int) -> Callable[[], None]:
    """What the forked process does to stand for *caller*; NotServed if it cannot."""
    own, own_namespaces, own_label = _own_view()
    theirs = _status_fields(caller)
    if own_namespaces != _namespaces(caller):
        raise NotServed("the caller is in other namespaces")
    if own_label != _security_label(caller):
        raise NotServed("the caller has another security label")
    if theirs["Uid"] != own["Uid"]:
        raise NotServed("the caller's user ids differ")
    if theirs["Seccomp"] != own["Seccomp"]:
        raise NotServed("the caller runs under a syscall filter")
    if theirs["NoNewPrivs"] < own["NoNewPrivs"]:
        raise NotServed("the supervisor runs with no_new_privs, the caller not")
    effective = _bits(own["CapEff"])
    ids_differ = (theirs["Gid"], theirs["Groups"]) != (own["Gid"], own["Groups"])
    if ids_differ and _CAP_SETGID not in effective:
        raise NotServed("the caller's groups differ")
    capabilities = {field: _bits(theirs[field]) for field in _CAPABILITY_FIELDS}
    own_capabilities = {field: _bits(own[field]) for field in _CAPABILITY_FIELDS}
    capabilities_differ = capabilities != own_capabilities
    if capabilities_differ and not (
            capabilities["CapPrm"] <= own_capabilities["CapPrm"]
            and capabilities["CapBnd"] <= own_capabilities["CapBnd"]
            and capabilities["CapEff"] == capabilities["CapPrm"]
            and not capabilities["CapAmb"] and _CAP_SETPCAP in effective):
        raise NotServed("the supervisor cannot take on the caller's capabilities")
    limits = {}
    for limit in _RLIMITS:
        with contextlib.suppress(OSError, ValueError):
            limits[limit] = resource.prlimit(caller, limit)
    with open(f"/proc/{caller}/cgroup") as cgroup:
        caller_cgroups = cgroup.read()
    oom_score_adj = None
    with contextlib.suppress(OSError), open(f"/proc/{caller}/oom_score_adj") as adjustment:
        oom_score_adj = adjustment.read()
    nice = os.getpriority(os.PRIO_PROCESS, caller)
    gids = [int(gid) for gid in theirs["Gid"].split()[:3]]
    groups = [int(gid) for gid in theirs["Groups"].split()]

    def take_on() -> None:
        _join_cgroups(caller_cgroups)
        if oom_score_adj is not None:
            with contextlib.suppress(OSError), \
                    open("/proc/self/oom_score_adj", "w") as adjustment:
                adjustment.write(oom_score_adj)
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        for limit, value in limits.items():
            with contextlib.suppress(OSError, ValueError):
                resource.setrlimit(limit, value)
        if ids_differ:
            os.setgroups(groups)
            os.setresgid(*gids)
        if theirs["NoNewPrivs"] != own["NoNewPrivs"]:
            from cowfs import _libc
            _libc.prctl(_libc.PR_SET_NO_NEW_PRIVS, 1)
        if capabilities_differ:
            from cowfs import _libc
            for number in own_capabilities["CapBnd"] - capabilities["CapBnd"]:
                _libc.prctl(_libc.PR_CAPBSET_DROP, number)
            _libc.set_capabilities(capabilities["CapPrm"], capabilities["CapInh"])
    return take_on


def _join_cgroups(caller_cgroups: str) -> None:
    """Into the caller's cgroups (where this process may move itself), so the command and its
    mount's daemon count where the caller's would."""
    from cowfs import cgroups
    with open("/proc/self/mountinfo") as mountinfo:
        table = mountinfo.read()
    with open("/proc/self/cgroup") as own:
        own_cgroups = own.read()
    own_paths = {hierarchy.mountpoint: hierarchy.own_path
                 for hierarchy in cgroups.read_hierarchies(table, own_cgroups)}
    for hierarchy in cgroups.read_hierarchies(table, caller_cgroups):
        if (hierarchy.version == 1 and not hierarchy.controllers) or \
                own_paths.get(hierarchy.mountpoint) == hierarchy.own_path:
            continue
        procs = os.path.join(hierarchy.mountpoint, hierarchy.own_path.lstrip("/"),
                             "cgroup.procs")
        with contextlib.suppress(OSError), open(procs, "w") as file:
            file.write("0")


def _checked(request: object) -> dict:
    """The request, if it has the shape the client sends (a command, or argv and what goes
    with it); ValueError if not."""
    if not isinstance(request, dict):
        raise ValueError("a request is a dict")
    if "command" in request:
        if request["command"] not in ("stop", "status"):
            raise ValueError(f"unknown command {request['command']!r}")
        return request
    argv, environment = request.get("argv"), request.get("environment")
    if not (isinstance(argv, list) and argv and all(isinstance(item, str) for item in argv)
            and isinstance(environment, dict)
            and all(isinstance(key, str) and isinstance(value, str)
                    for key, value in environment.items())
            and isinstance(request.get("umask"), int) and 0 <= request["umask"] <= 0o777
            and isinstance(request.get("build"), str)):
        raise ValueError("a malformed request")
    return request


class Supervisor:
    def __init__(self, path: str) -> None:
        self.path = path
        self.build = client.build()
        self.listener: socket.socket | None = None
        self.lock_fd: int | None = None
        self.children: dict[int, tuple[int, socket.socket]] = {}   # pidfd: (pid, connection)
        # The connections of `cowfs run`s: their caller hanging up ends them, as a killed
        # `cowfs run` ends its payload.
        self.watched: dict[socket.socket, int] = {}
        self.socket_inode: int | None = None
        self.started = time.time()
        self.requests = 0
        self.running = True

    def listen(self) -> bool:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        status = os.lstat(directory)
        if status.st_uid != os.geteuid() or status.st_mode & 0o077:
            raise SystemExit(f"cowfs supervisor: {directory} must be the owner's alone (0700)")
        self.lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                               0o600)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self._preload()
        import setproctitle
        # Named in ps; and set up here, while the C environment is intact (a fork clears and
        # refills it for each command, and then names itself).
        setproctitle.setproctitle(f"cowfs supervisor {self.path}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            self.listener.bind(self.path)
        finally:
            os.umask(old_umask)
        self.socket_inode = os.stat(self.path).st_ino
        self.listener.listen(128)
        # A stopping signal wakes the loop through this pipe.
        self.wakeup_read, wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wakeup_write)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._stop)
        # What the forks share stays shared: the collector no longer writes to these objects.
        gc.collect()
        gc.freeze()
        return True

    @staticmethod
    def _preload() -> None:
        from cowfs import fuse_extensions
        fuse_extensions.load()                 # before pyfuse3, as every mount does
        import pyfuse3  # noqa: F401
        import trio  # noqa: F401

        from cowfs import cli, daemon, mount, sandbox, seccomp, union  # noqa: F401
        cli.build_parser()
        seccomp.preload()       # pyseccomp's import runs ldconfig twice: 25 ms of each run
        with contextlib.suppress(seccomp.SeccompError, OSError, ValueError):
            seccomp.build(sandbox.resolve_capabilities((), ())[0])     # the default profile

    def _stop(self, _signum: int, _frame: object) -> None:
        self.running = False

    def loop(self) -> None:
        import select
        assert self.listener is not None
        while self.running:
            readable, _, _ = select.select(
                [self.listener, self.wakeup_read, *self.children, *self.watched], [], [])
            for ready in readable:
                if ready == self.wakeup_read:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wakeup_read, 64)
                elif ready is self.listener:
                    self._accept()
                elif isinstance(ready, socket.socket):
                    # The caller hung up (or went, its status received, as the command's
                    # process was reaped in this same round).
                    if (pid := self.watched.pop(ready, None)) is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                elif ready in self.children:
                    self._reap(ready)
            if self.listener is None:
                return

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            connection, _ = self.listener.accept()
        except OSError:
            return
        fds: list[int] = []
        try:
            caller, uid, _gid = struct.unpack(
                "3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid != os.geteuid():
                connection.close()
                return
            message, fds, _flags, _address = socket.recv_fds(
                connection, client.MAX_MESSAGE, _FDS_PER_REQUEST)
            request = _checked(marshal.loads(message))
            self._answer(connection, request, fds, caller)
        except Exception:
            log.exception("a request failed")
            with contextlib.suppress(OSError):
                connection.close()
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _answer(self, connection: socket.socket, request: dict, fds: list[int],
                caller: int) -> None:
        command = request.get("command")
        if command == "stop":
            self.close()
            self._send(connection, {"stopped": os.getpid()})
        elif command == "status":
            self._send(connection, {"pid": os.getpid(), "build": self.build,
                                    "started": self.started, "requests": self.requests,
                                    "running": len(self.children)})
        elif request.get("build") != self.build:
            # cowfs changed under this process: make way for one of the new build.
            self.close()
            self._send(connection, {"stale": True})
        elif len(fds) != _FDS_PER_REQUEST:
            self._send(connection, {"cold": "the request came without its descriptors"})
        else:
            try:
                take_on = plan_for(caller)
            except (NotServed, OSError) as reason:
                self._send(connection, {"cold": str(reason)})
                connection.close()
                return
            self.requests += 1
            pid = os.fork()
            if pid == 0:
                self._run_command(connection, request, fds, take_on)   # never returns
            self.children[os.pidfd_open(pid)] = (pid, connection)
            if request["argv"][:1] == ["run"]:
                self.watched[connection] = pid
            return
        connection.close()

    @staticmethod
    def _send(connection: socket.socket, message: dict) -> None:
        with contextlib.suppress(OSError):
            connection.send(marshal.dumps(message))

    def _reap(self, pidfd: int) -> None:
        pid, connection = self.children.pop(pidfd)
        self.watched.pop(connection, None)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        # The command sent its status itself; a signal's end it could not send.
        self._send(connection, {"returncode": os.waitstatus_to_exitcode(status)})
        connection.close()

    def _run_command(self, connection: socket.socket, request: dict, fds: list[int],
                     take_on: Callable[[], None]) -> None:
        code = 1
        try:
            assert self.listener is not None and self.lock_fd is not None
            self.listener.close()
            os.close(self.lock_fd)
            signal.set_wakeup_fd(-1)
            for pidfd, (_pid, other) in self.children.items():
                os.close(pidfd)
                other.close()
            self.children.clear()
            self.watched.clear()
            gc.unfreeze()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            os.setsid()     # not the supervisor's session: a signal to it is not to us
            take_on()
            for target, fd in enumerate(fds[:3]):
                os.dup2(fd, target)
            os.fchdir(fds[3])
            for fd in fds:
                os.close(fd)
            os.umask(request["umask"])
            os.environ.clear()
            os.environ.update(request["environment"])
            # As a cold start opens them (stderr escapes what it cannot encode: a path that is
            # not UTF-8 is said, not a traceback).
            sys.stdin = open(0, closefd=False)  # noqa: SIM115
            sys.stdout = open(1, "w", closefd=False,  # noqa: SIM115
                              errors=getattr(sys.__stdout__, "errors", None))
            sys.stderr = open(2, "w", closefd=False,  # noqa: SIM115
                              errors=getattr(sys.__stderr__, "errors", "backslashreplace"))
            import setproctitle
            title = " ".join(["cowfs", *request["argv"]])
            setproctitle.setproctitle(title.encode(errors="surrogateescape")
                                      .decode(errors="replace"))
            self._send(connection, {"pid": os.getpid()})
            code = _run_cli(request["argv"])
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                sys.stdout.flush()
                sys.stderr.flush()
            self._send(connection, {"returncode": code})
            os._exit(code)

    def close(self) -> None:
        """Stop listening and let another supervisor take the path; the commands running
        finish and report as before."""
        if self.listener is not None:
            # Another supervisor may have taken the path since: remove only our own.
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self.socket_inode:
                    os.unlink(self.path)
            self.listener.close()
            self.listener = None
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


COLD_START = ("import sys; sys.path.insert(0, sys.argv.pop(1)); from cowfs import cli; "
              "sys.exit(cli.main(sys.argv[1:]))")


def _run_cli(argv: list[str]) -> int:
    from cowfs import cli
    try:
        return cli.main(argv)
    except cli.FreshProcessNeeded:
        # What this process has loaded does not fit the command: run it cold, in place.
        os.environ["COWFS_SUPERVISOR"] = "off"
        os.execv(sys.executable, [sys.executable, "-c", COLD_START,
                                  os.path.dirname(client.package_directory()), *argv])
    except SystemExit as exc:       # argparse's usage errors and --help
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


def request_to(path: str, message: dict) -> dict | None:
    """Send a control request (stop, status) to the supervisor at *path*; None if none runs."""
    connection = client.connect(path)
    if connection is None:
        return None
    try:
        connection.send(marshal.dumps(message))
        return client.receive(connection)
    finally:
        connection.close()
