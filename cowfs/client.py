"""The `cowfs` command's front: hand the command to a warm supervisor, or run it here.

Starting Python and importing pyfuse3, trio and cowfs costs about 200 ms, a mount's daemon a
few. So `cowfs mount`, `umount` and `run` send their argv, environment, umask, working
directory and stdio to a supervisor (`cowfs.supervisor`) that imported all that once and forks
a process per command running the command line's own code; the exit status comes back here.
This module imports only what the interpreter has built in (`_socket`, `_signal`, `marshal`,
not `socket`, `signal` or `json`, which pull in selectors, enum and re): its own start is the
command's cost, about 10 ms of a 20 ms interpreter start here. Messages are marshal'ed: both ends
are the same user (the supervisor drops any other peer unheard). Whatever goes wrong with the
supervisor, the command runs here instead, as before.
"""

import _signal
import _socket
import marshal
import os
import sys

# Commands a warm process runs; the rest (help, OCI tar work, foreground mounts) run here.
# cowfs/launcher.c knows the same lists.
WARM_COMMANDS = ("mount", "umount", "run", "cleanup", "list", "stats", "refresh")
WARM_LAYER_ACTIONS = ("add", "remove")      # `cowfs layer add|remove`, not import or export
FOREGROUND_FLAGS = ("-f", "--foreground")
# Message sizes: a request carries argv and the environment.
MAX_MESSAGE = 1 << 20
FORWARDED_SIGNALS = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)
START_TIMEOUT = 10.0          # seconds a new supervisor may take to say it is ready


def package_directory() -> str:
    return os.path.dirname(os.path.abspath(__file__))


def _fnv1a(text: str) -> str:
    """A short stable digest (no hashlib or zlib to import for it)."""
    value = 0xcbf29ce484222325
    for byte in text.encode(errors="surrogateescape"):
        value = (value ^ byte) * 0x100000001b3 & 0xffffffffffffffff
    return f"{value:016x}"


def slot() -> str:
    """Which supervisor serves this cowfs: one per interpreter, package and library path,
    since a supervisor has loaded one of each."""
    key = "\0".join([sys.prefix, package_directory(),
                     os.environ.get("LD_LIBRARY_PATH", ""), os.environ.get("LD_PRELOAD", "")])
    return _fnv1a(key)[:12]


def build() -> str:
    """The package's files as they are now: a supervisor of an older build makes way."""
    directory = package_directory()
    stamps = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.endswith((".py", ".so")):
                stat = entry.stat(follow_symlinks=False)
                stamps.append(f"{entry.name}:{stat.st_mtime_ns}:{stat.st_size}")
    return _fnv1a(" ".join(sorted(stamps)))


def runtime_directory() -> str | None:
    """Where the caller's supervisor listens: /run/cowfs for root, $XDG_RUNTIME_DIR/cowfs for a
    user (none without one), $COWFS_RUNTIME_DIR if set."""
    if chosen := os.environ.get("COWFS_RUNTIME_DIR"):
        return chosen
    if os.geteuid() == 0:
        return "/run/cowfs"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "cowfs") if runtime else None


def socket_path() -> str | None:
    directory = runtime_directory()
    return os.path.join(directory, f"supervisor-{slot()}.sock") if directory else None


def wants_warm(argv: list[str]) -> bool:
    if os.environ.get("COWFS_SUPERVISOR", "on") == "off" or not argv:
        return False
    if any(flag in argv for flag in FOREGROUND_FLAGS):
        return False
    if argv[0] in WARM_COMMANDS or (argv[0] == "layer" and argv[1:2]
                                     and argv[1] in WARM_LAYER_ACTIONS):
        return not any(flag in argv[:argv.index("--") if "--" in argv else len(argv)]
                       for flag in ("-h", "--help"))
    # The mount-program form (`cowfs -o lowerdir=... MERGED`), as podman and mount.fuse3 call.
    return argv[0].startswith("-o") or argv[0] in ("-d", "-s")


def main(argv: list[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if wants_warm(arguments):
        code = run_warm(arguments)
        if code is not None:
            return code
    from cowfs import cli
    return cli.main(arguments)


def launch() -> None:
    """The `cowfs` command (bin/cowfs, `python -m cowfs`): `main`, and its exit.

    A warm command leaves nothing of its own to finish in this process (no atexit handlers,
    no threads, output written by the command's process), so it ends at once with its status
    instead of finalising the interpreter, which costs about 3 ms here. A command run here
    exits as usual.
    """
    arguments = sys.argv[1:]
    if wants_warm(arguments):
        code = run_warm(arguments)
        if code is not None:
            for stream in (sys.stdout, sys.stderr):
                try:  # noqa: SIM105 (contextlib is one more import to start)
                    stream.flush()
                except (OSError, ValueError):     # a closed or broken stream
                    pass
            os._exit(code)
    from cowfs import cli
    sys.exit(cli.main(arguments))


def run_warm(argv: list[str]) -> int | None:
    """The command's exit status from a warm process, or None to run it here."""
    path = socket_path()
    if path is None:
        return None
    started = False
    for _attempt in range(3):
        connection = connect(path)
        if connection is None:
            if started or not start_supervisor(path):
                return None
            started = True
            continue
        try:
            reply = request(connection, argv)
            if reply is None:
                return None
            if reply.get("stale"):           # it made way for this build: start anew
                continue
            if "returncode" in reply:
                return exit_status(reply["returncode"])
            if "pid" not in reply:
                return None
            return wait_for(connection, reply["pid"])
        finally:
            connection.close()
    return None


def exit_status(returncode: int) -> int:
    """As a shell says it: 128+N for a process ended by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def connect(path: str) -> _socket.socket | None:
    connection = _socket.socket(_socket.AF_UNIX,
                                _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        connection.connect(path)
    except OSError:
        connection.close()
        return None
    return connection


def request(connection: _socket.socket, argv: list[str]) -> dict | None:
    umask = os.umask(0o022)
    os.umask(umask)
    message = marshal.dumps({"argv": argv, "environment": dict(os.environ), "umask": umask,
                             "build": build()})
    opened = []
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:                    # a closed stdio reads as /dev/null, as at exec
            fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            opened.append(fd)
        fds.append(fd)
    try:
        working = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    opened.append(working)
    fds.append(working)
    try:
        rights = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)
        connection.sendmsg([message], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
        return receive(connection)
    except OSError:
        return None
    finally:
        for fd in opened:
            os.close(fd)


def receive(connection: _socket.socket) -> dict | None:
    data = connection.recv(MAX_MESSAGE)
    return marshal.loads(data) if data else None


def wait_for(connection: _socket.socket, pid: int) -> int:
    """Forward signals to the command's process until its status arrives."""
    def forward(signum: int, _frame: object) -> None:
        try:  # noqa: SIM105 (contextlib is one more import to start)
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    for signum in FORWARDED_SIGNALS:
        _signal.signal(signum, forward)
    try:
        reply = receive(connection)
    except OSError:
        reply = None
    if reply is None or "returncode" not in reply:
        print("cowfs: the command's process ended without an exit status (its supervisor "
              "was stopped?)", file=sys.stderr)
        return 1
    return exit_status(reply["returncode"])


def start_supervisor(path: str) -> bool:
    """Start a supervisor for *path* and wait until it listens; False if it did not."""
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError:
        return False
    read_end, write_end = os.pipe()
    bootstrap = ("import sys; sys.path.insert(0, sys.argv[1]); "
                 "from cowfs import supervisor; supervisor.main(sys.argv[2:])")
    arguments = [sys.executable, "-c", bootstrap, os.path.dirname(package_directory()),
                 "--socket", path, "--ready-fd", str(write_end)]
    try:
        pid = os.fork()
    except OSError:
        return False
    if pid == 0:               # detach twice: the supervisor is nobody's child
        try:
            os.setsid()
            if os.fork() == 0:
                os.close(read_end)
                os.set_inheritable(write_end, True)
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.chdir("/")
                os.execv(sys.executable, arguments)
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    import select
    try:
        readable, _, _ = select.select([read_end], [], [], START_TIMEOUT)
        # "ready", or EOF: another supervisor won the race and serves, or this one failed;
        # connecting tells which.
        return bool(readable) and os.read(read_end, 16) in (b"ready", b"")
    finally:
        os.close(read_end)
