"""The inside of a sandbox: namespaces, PID 1, the root, the payload (DESIGN.md §8).

`cowfs.sandbox` forks the helper, or, when the caller has threads, starts this module in a fresh
interpreter (`python -m cowfs._sandbox_helper CONFIG`): a fork of a threaded process can
deadlock on locks other threads held, and unshare of the mount namespace in a threaded process
is refused. The helper unshares, forks PID 1 of the new pid namespace, which builds /proc,
/dev and /sys inside the root, `pivot_root`s into it (plain chroot can be escaped), and forks the
payload with the capabilities it keeps, a fresh session keyring, no_new_privs and the syscall
filter of `cowfs.seccomp`. PID 1 reaps orphans, forwards signals, and exits with the
payload's status (128+n when signal n killed it).

Limits come from cgroups.py: the helper joins the run's cgroups before it unshares.
"""

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import socket
import struct
import sys
import traceback

from cowfs import _libc

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)
NAMESPACES = (_libc.CLONE_NEWNS | _libc.CLONE_NEWPID | _libc.CLONE_NEWUTS | _libc.CLONE_NEWIPC
              | _libc.CLONE_NEWNET | _libc.CLONE_NEWCGROUP)
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# What of /proc and /sys reaches the whole host, as runc's defaults: masked (an empty read-only
# directory, or /dev/null over a file) or read-only. A path this kernel lacks is skipped.
MASKED_PATHS = ("proc/acpi", "proc/asound", "proc/kcore", "proc/keys", "proc/latency_stats",
                "proc/timer_list", "proc/timer_stats", "proc/sched_debug", "proc/scsi",
                "sys/firmware", "sys/devices/virtual/powercap")
READ_ONLY_PATHS = ("proc/bus", "proc/fs", "proc/irq", "proc/sys", "proc/sysrq-trigger")
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = struct.Struct("16sh22x")


@dataclasses.dataclass
class SandboxConfig:
    root: str                         # the merged mount: becomes /
    command: list[str]
    hostname: str = "cowfs"
    environment: dict[str, str] = dataclasses.field(default_factory=lambda: {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/", "TERM": os.environ.get("TERM", "xterm")})
    workdir: str = "/"
    uid: int = 0
    gid: int = 0
    network: str = "none"             # "none": a namespace with lo only; "host": the host's
    # The bounding set, and for root the effective and permitted ones; *ambient* are those a
    # non-root payload gets effective (asked for by name, not the defaults).
    capabilities: list[int] = dataclasses.field(default_factory=list)
    ambient: list[int] = dataclasses.field(default_factory=list)
    seccomp_program: str = ""         # hex of the BPF program to load before exec; "" for none
    # [first host id, count]: the payload's ids 0..count-1 are these host ids, in a user
    # namespace of its own; [] for none (its root is host root, narrowed).
    user_namespace: list[int] = dataclasses.field(default_factory=list)
    masked_paths: list[str] = dataclasses.field(default_factory=lambda: list(MASKED_PATHS))
    read_only_paths: list[str] = dataclasses.field(
        default_factory=lambda: list(READ_ONLY_PATHS))
    # cgroup.procs files the helper joins before anything else: the limits hold for PID 1 and
    # the payload, never for the FUSE daemon, which was started before.
    cgroup_procs: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "SandboxConfig":
        return cls(**json.loads(text))


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128+n for signal n."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def main(config: SandboxConfig) -> int:
    """In the helper: join the run's cgroups, enter new namespaces, start PID 1, wait for it.

    The helper may be a fork of its caller: it drops the caller's signal handlers and fds first,
    so PID 1 holds nothing of the host's but the payload's stdio.
    """
    # Held until each forwarder is in place, not lost: PID 1 of a pid namespace drops a signal
    # from outside it has no handler for, so one sent during set-up would leave the payload
    # running and `cowfs run` waiting on it. The payload unblocks them before exec.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    _die_with_parent()
    for procs in config.cgroup_procs:
        with open(procs, "w") as file:
            file.write(str(os.getpid()))
    _libc.unshare(NAMESPACES if config.network == "none" else NAMESPACES & ~_libc.CLONE_NEWNET)
    init = os.fork()
    if init == 0:
        code = 127
        try:
            _die_with_parent()
            code = _init(config)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, lambda signum, _frame: _forward(init, signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    _, status = os.waitpid(init, 0)
    return exit_code(status)


def _die_with_parent() -> None:
    """A `cowfs run` killed with SIGKILL takes the sandbox with it: nothing keeps running."""
    parent = os.getppid()
    _libc.prctl(_libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:        # the parent died before the request took hold
        os._exit(128 + signal.SIGKILL)


def _forward(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _init(config: SandboxConfig) -> int:
    """PID 1: build the root, pivot into it, run the payload, reap, pass its status on."""
    _libc.mount("none", "/", None, _libc.MS_REC | _libc.MS_PRIVATE)
    _prepare_root(config)
    socket.sethostname(config.hostname)
    if config.network == "none":
        _loopback_up()
    os.chdir(config.root)
    _libc.pivot_root(".", ".")           # the old root stacks under the new one ...
    _libc.umount2(".", _libc.MNT_DETACH)  # ... and goes (pivot_root(2), "new_root == put_old")
    os.chdir("/")
    unshared, mapped = os.pipe(), os.pipe()       # payload -> PID 1, PID 1 -> payload
    payload = os.fork()
    if payload == 0:
        os.close(unshared[0])
        os.close(mapped[1])
        _exec_payload(config, unshared[1], mapped[0])
    os.close(unshared[1])
    os.close(mapped[0])
    if config.user_namespace:
        _map_ids(payload, config.user_namespace, unshared[0], mapped[1])
    os.close(unshared[0])
    os.close(mapped[1])
    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, lambda signum, _frame: _forward(payload, signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)   # what came meanwhile
    while True:
        pid, status = os.wait()
        if pid == payload:
            return exit_code(status)


def _map_ids(payload: int, user_namespace: list[int], unshared: int, mapped: int) -> None:
    """Write the new user namespace's maps: only a process outside it, with CAP_SETUID and
    CAP_SETGID there, may map more than its own id. The payload waits for the word."""
    if os.read(unshared, 1) != b"u":
        return                                    # the payload failed before; it says why
    first, count = user_namespace
    try:
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{payload}/{name}", "w") as file:
                file.write(f"0 {first} {count}\n")
    except OSError as exc:
        print(f"cowfs run: cannot map the user namespace to host ids {first}-"
              f"{first + count - 1}: {exc.strerror}", file=sys.stderr)
        return                                    # the payload reads EOF and gives up
    os.write(mapped, b"m")


def _mkdir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def _prepare_root(config: SandboxConfig) -> None:
    """/proc of the new pid namespace, a small /dev, a read-only /sys; sensitive paths masked."""
    root = config.root
    secure = _libc.MS_NOSUID | _libc.MS_NODEV | _libc.MS_NOEXEC
    # Mount points the image lacks are made as its root: in a user namespace, as the host id
    # that stands for it (as host root they would land in the upper as the overflow id).
    owner = config.user_namespace[0] if config.user_namespace else 0
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)   # as host root: the way to it
    try:
        with _libc.file_ids(owner, owner):
            for name in ("proc", "dev", "sys"):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=root_fd)
    finally:
        os.close(root_fd)
    proc = os.path.join(root, "proc")
    _libc.mount("proc", proc, "proc", secure)
    dev = os.path.join(root, "dev")
    _libc.mount("tmpfs", dev, "tmpfs", _libc.MS_NOSUID | _libc.MS_NOEXEC, "mode=755,size=65536k")
    for name in DEVICES:
        node = os.path.join(dev, name)
        open(node, "w").close()
        _libc.mount(f"/dev/{name}", node, None, _libc.MS_BIND)
    _bind_terminal(os.path.join(dev, "console"))
    pts = _mkdir(os.path.join(dev, "pts"))
    _libc.mount("devpts", pts, "devpts", _libc.MS_NOSUID | _libc.MS_NOEXEC,
                "newinstance,ptmxmode=0666,mode=620")
    os.symlink("pts/ptmx", os.path.join(dev, "ptmx"))
    _libc.mount("shm", _mkdir(os.path.join(dev, "shm")), "tmpfs", secure, "mode=1777")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, os.path.join(dev, name))
    sys_dir = os.path.join(root, "sys")
    try:
        _libc.mount("sysfs", sys_dir, "sysfs", _libc.MS_RDONLY | secure)
    except PermissionError:
        # Sharing the host's network namespace, a new sysfs is not allowed: bind it read-only.
        _libc.mount("/sys", sys_dir, None, _libc.MS_BIND | _libc.MS_REC)
        _libc.mount("/sys", sys_dir, None,
                    _libc.MS_BIND | _libc.MS_REMOUNT | _libc.MS_RDONLY | secure)
    for path in config.read_only_paths:
        _read_only(os.path.join(root, path))
    for path in config.masked_paths:
        _mask(os.path.join(root, path))


def _read_only(path: str) -> None:
    if os.path.lexists(path):
        _libc.mount(path, path, None, _libc.MS_BIND | _libc.MS_REC)
        _libc.mount(path, path, None, _libc.MS_BIND | _libc.MS_REMOUNT | _libc.MS_RDONLY
                    | _libc.MS_NOSUID | _libc.MS_NODEV | _libc.MS_NOEXEC)


def _mask(path: str) -> None:
    if os.path.isdir(path):
        _libc.mount("tmpfs", path, "tmpfs",
                    _libc.MS_RDONLY | _libc.MS_NOSUID | _libc.MS_NODEV | _libc.MS_NOEXEC)
    elif os.path.lexists(path):
        _libc.mount("/dev/null", path, None, _libc.MS_BIND)


def _bind_terminal(console: str) -> None:
    """A terminal on stdin shows inside as /dev/console (as runc does), so `tty` names it.

    The payload keeps the terminal as its stdio and controlling terminal either way; the host's
    /dev/pts is not visible inside, so without this ttyname() fails.
    """
    try:
        terminal = os.ttyname(0)
    except OSError:
        return
    open(console, "w").close()
    _libc.mount(terminal, console, None, _libc.MS_BIND)


def _loopback_up() -> None:
    """The new network namespace has only lo, down: bring it up."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = _IFREQ.pack(b"lo", 0)
        flags = _IFREQ.unpack(fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | _IFF_UP))


def _exec_payload(config: SandboxConfig, unshared: int, mapped: int) -> None:
    """Become the payload: its user namespace, user, capabilities, a fresh session keyring,
    no new privileges, the syscall filter, only fds 0-2."""
    try:
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
        if config.user_namespace:
            # Its own, owning none of the sandbox's other namespaces (PID 1 made those as host
            # root): root in it has capabilities over its own files and nothing else.
            _libc.unshare(_libc.CLONE_NEWUSER)
            os.write(unshared, b"u")
            if os.read(mapped, 1) != b"m":
                os._exit(127)
        os.close(unshared)
        os.close(mapped)
        bounding = frozenset(config.capabilities)
        kept = bounding if config.uid == 0 else bounding & frozenset(config.ambient)
        with open("/proc/sys/kernel/cap_last_cap") as cap_last_cap:
            last_capability = int(cap_last_cap.read())
        for capability in range(last_capability + 1):
            if capability not in bounding:
                _libc.prctl(_libc.PR_CAPBSET_DROP, capability)
        _libc.prctl(_libc.PR_CAP_AMBIENT, _libc.PR_CAP_AMBIENT_CLEAR_ALL)
        os.setgroups([])
        os.setgid(config.gid)
        if kept and config.uid != 0:
            _libc.prctl(_libc.PR_SET_KEEPCAPS, 1)     # keep the permitted set across setuid
        os.setuid(config.uid)
        # Root's inheritable set stays empty, so no file's inheritable capabilities reach the
        # payload's programs (runc's CVE-2022-29162); ambient ones must be inheritable.
        ambient = kept if config.uid != 0 else frozenset()
        _libc.set_capabilities(kept, inheritable=ambient)
        for capability in ambient:
            _libc.prctl(_libc.PR_CAP_AMBIENT, _libc.PR_CAP_AMBIENT_RAISE, capability)
        # The caller's session keyring leads to the host user's keys (runc does the same).
        _libc.join_session_keyring()
        _libc.prctl(_libc.PR_SET_NO_NEW_PRIVS, 1)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        os.chdir(config.workdir)
        if config.seccomp_program:
            _libc.load_seccomp_filter(bytes.fromhex(config.seccomp_program))
        os.execvpe(config.command[0], config.command, config.environment)
    except BaseException as exc:
        print(f"cowfs run: cannot start {config.command[0]}: {exc}", file=sys.stderr)
        os._exit(127)


if __name__ == "__main__":
    sys.exit(main(SandboxConfig.from_json(sys.argv[1])))
