"""Run a process isolated and limited, with a layer stack as its root: `cowfs run` as a library.

    import cowfs.sandbox

    status = cowfs.sandbox.run("app:base", ["/bin/sh", "-c", "echo hi"], memory="256M")

    with cowfs.sandbox.Sandbox("app:base", upper="/var/lib/box/upper", pids=64) as box:
        box.run(["/bin/setup"])
        box.run(["/bin/check"], user=(1000, 1000))
        box.commit("/var/lib/layers/app-configured")

A `Sandbox` mounts the stack (the FUSE daemon stays in the host's namespaces and outside the
limits), makes the run's cgroups, and on exit tears down in order: kill what is left in the
cgroups and wait for them to empty, remove them, unmount, remove the scratch directory. Each
`run` is a fresh set of namespaces over the same mount (see `_sandbox_helper`).
"""

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from cowfs import _libc, _sandbox_helper, cgroups, handle
from cowfs import seccomp as _seccomp
from cowfs._sandbox_helper import SandboxConfig
from cowfs.commit import CommitError, commit_upper
from cowfs.layers import LayoutError, parse_lowerdirs, read_mountinfo, unmount

log = logging.getLogger(__name__)

RUN_PREFIX = "cowfs-run-"
# podman's default set: enough for apt, dpkg and useradd as root, none of the host-wide ones.
DEFAULT_CAPABILITIES = ("chown", "dac_override", "fowner", "fsetid", "kill", "net_bind_service",
                        "setfcap", "setgid", "setpcap", "setuid", "sys_chroot")


class SandboxError(Exception):
    """The sandbox could not be set up; the message names the problem in one line."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Sandbox:
    """A mounted, limited root that commands run in; a context manager."""

    def __init__(self, layers: str | Sequence[str], *, upper: str | None = None,
                 memory: str | int | None = None, cpus: float | None = None,
                 pids: int | None = None, userns: tuple[int, int] | None = None) -> None:
        """*userns* (first host id, count) runs each command in a user namespace of its own,
        its ids 0..count-1 being those host ids; the mount then shows the image's owners
        shifted by as much, so the payload sees them as the image has them."""
        if userns is not None:
            first, count = userns
            if first < 1 or count < 1 or first + count > 1 << 32:
                raise SandboxError(f"--userns-ids: host ids {first}:{count} are not a range of "
                                   "unprivileged ids (FIRST >= 1, COUNT >= 1)")
        self.userns = userns
        self.lowers = parse_lowerdirs(layers) if isinstance(layers, str) else list(layers)
        self.kept_upper = upper
        try:
            memory_bytes = cgroups.parse_size(memory) if isinstance(memory, str) else memory
        except ValueError as exc:
            raise SandboxError(f"memory: {exc}") from None
        self.limits = cgroups.Limits(memory_bytes=memory_bytes, cpus=cpus, pids=pids)
        try:
            self.limits.check()
        except ValueError as exc:
            raise SandboxError(str(exc)) from None
        self.oom_killed = False         # whether the memory limit killed a process of the last run
        self.scratch = ""
        self.merged = ""
        self.upper = ""
        self.cgroups: cgroups.RunCgroups | None = None
        self.mount: handle.Mounted | None = None

    def __enter__(self) -> "Sandbox":
        sweep_leftovers()
        # The run id names the scratch directory and the cgroups and carries our pid, so a
        # later run tells what a killed one left from what a live one uses.
        self.scratch = tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-")
        try:
            self._set_up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _set_up(self) -> None:
        self.merged = os.path.join(self.scratch, "merged")
        os.mkdir(self.merged)
        self.upper = self.kept_upper or os.path.join(self.scratch, "upper")
        made = _make_directories(self.upper)
        workdir = None if self.kept_upper else os.path.join(self.scratch, "work")
        try:
            mapping = ((0, *self.userns),) if self.userns else ()
            self.mount = handle.mount_stack(self.lowers, self.merged,
                                            upper=self.upper, workdir=workdir,
                                            uidmapping=mapping, gidmapping=mapping,
                                            while_starting=_seccomp.preload)
        except LayoutError as exc:
            _remove_made(made)          # a refused mount leaves no upper it made
            raise SandboxError(str(exc)) from None
        except handle.MountError as exc:
            _remove_made(made)
            raise SandboxError(str(exc), exc.exit_code) from None
        self.cgroups = _make_cgroups(os.path.basename(self.scratch)[len(RUN_PREFIX):],
                                     self.limits)

    def run(self, command: Sequence[str], *, hostname: str = "cowfs",
            env: dict[str, str] | None = None, workdir: str = "/",
            user: tuple[int, int] = (0, 0), network: str = "none",
            cap_add: Sequence[str] = (), cap_drop: Sequence[str] = (), seccomp: bool = True,
            unmask: Sequence[str] = (), on_start: Callable[[int], None] | None = None) -> int:
        """Run *command* in new namespaces; its exit status, 128+n if signal n ended it.

        The payload keeps DEFAULT_CAPABILITIES, less *cap_drop*, plus *cap_add* (names such
        as `net_bind_service`, or `ALL`); a non-root user gets only the added ones in effect.
        *seccomp* False runs it without the syscall filter; *unmask* names /proc and /sys paths
        to leave as they are (`ALL`: every masked and read-only one). *on_start* gets the pid
        of the helper process, to which a caller may forward signals.
        """
        if network not in ("none", "host"):
            raise SandboxError(f"network must be none or host, not {network!r}")
        bounding, added, masked, read_only = check_run_options(cap_add, cap_drop, unmask, user,
                                                               self.userns)
        try:
            program = _seccomp.build(bounding).hex() if seccomp else ""
        except _seccomp.SeccompError as exc:
            raise SandboxError(str(exc)) from None
        environment = SandboxConfig(root="", command=[]).environment
        environment.update(env or {})
        assert self.cgroups is not None, "run inside `with Sandbox(...)`"
        config = SandboxConfig(root=self.merged, command=list(command), hostname=hostname,
                               environment=environment, workdir=workdir, uid=user[0],
                               gid=user[1], network=network, capabilities=sorted(bounding),
                               ambient=sorted(added), seccomp_program=program,
                               user_namespace=list(self.userns or ()), masked_paths=masked,
                               read_only_paths=read_only,
                               cgroup_procs=[os.path.join(directory, "cgroup.procs")
                                             for directory in self.cgroups.directories])
        kills_before = self.cgroups.oom_kills()
        helper = _start_helper(config)
        if on_start is not None:
            on_start(helper)
        _, status = os.waitpid(helper, 0)
        code = _sandbox_helper.exit_code(status)
        self.oom_killed = self.cgroups.oom_kills() > kills_before
        self.cgroups.kill()        # what the payload left behind, before anything else runs
        return code

    def commit(self, layer_directory: str) -> None:
        """Save the changes so far as a new layer directory."""
        try:
            commit_upper(self.upper, self.merged, layer_directory)
        except CommitError as exc:
            raise SandboxError(f"commit: {exc}", 1) from None

    def close(self) -> None:
        """Tear down in order; safe to call twice and after a failed set-up."""
        try:
            if self.cgroups is not None:
                self.cgroups.remove()
                self.cgroups = None
        finally:
            if self.mount is not None:
                try:
                    self.mount.unmount()
                except OSError:
                    self.mount.unmount(lazy=True)     # busy: detach, finish later
                self.mount = None
            if self.scratch and not any(mount.mountpoint.startswith(self.scratch + os.sep)
                                        for mount in read_mountinfo()):
                shutil.rmtree(self.scratch, ignore_errors=True)


def resolve_capabilities(cap_add: Sequence[str],
                         cap_drop: Sequence[str]) -> tuple[frozenset[int], frozenset[int]]:
    """(the payload's set, the added ones) from docker-style `--cap-add`/`--cap-drop` names.

    `--cap-drop ALL --cap-add X` keeps X only; `--cap-add ALL --cap-drop X` all but X.
    """
    every = _libc.bounding_set()      # ALL is what this process may hand on

    def numbers(names: Sequence[str]) -> frozenset[int]:
        if any(name.upper() == "ALL" for name in names):
            return every
        return frozenset(_libc.capability_number(name) for name in names)

    if missing := sorted(numbers(cap_add) - every):
        raise ValueError(f"--cap-add: this process has no {_libc.CAPABILITY_NAMES[missing[0]]} "
                         "capability to give")

    added, dropped = numbers(cap_add), numbers(cap_drop)
    if added == every:
        dropped = numbers([name for name in cap_drop if name.upper() != "ALL"])
        return every - dropped, every - dropped
    added -= numbers([name for name in cap_drop if name.upper() != "ALL"])
    defaults = frozenset(_libc.capability_number(name) for name in DEFAULT_CAPABILITIES)
    return (defaults - dropped) | added, added


def check_run_options(cap_add: Sequence[str] = (), cap_drop: Sequence[str] = (),
                      unmask: Sequence[str] = (), user: tuple[int, int] = (0, 0),
                      userns: tuple[int, int] | None = None
                      ) -> tuple[frozenset[int], frozenset[int], list[str], list[str]]:
    """`Sandbox.run`'s capabilities and unmasked paths, resolved, or SandboxError: a caller
    checks them before it mounts anything."""
    if userns is not None and max(user) >= userns[1]:
        raise SandboxError(f"--user {user[0]}:{user[1]} is outside the user namespace's ids "
                           f"0-{userns[1] - 1}")
    try:
        bounding, added = resolve_capabilities(cap_add, cap_drop)
    except ValueError as exc:
        raise SandboxError(str(exc)) from None
    return (bounding, added, *_unmasked(unmask))


def _unmasked(unmask: Sequence[str]) -> tuple[list[str], list[str]]:
    """The masked and read-only paths left once *unmask* (paths, or ALL) is taken out."""
    masked, read_only = _sandbox_helper.MASKED_PATHS, _sandbox_helper.READ_ONLY_PATHS
    if any(path.upper() == "ALL" for path in unmask):
        return [], []
    wanted = {path.strip("/") for path in unmask}
    if unknown := sorted(wanted - set(masked) - set(read_only)):
        raise SandboxError(f"unmask: /{unknown[0]} is neither masked nor read-only")
    return ([path for path in masked if path not in wanted],
            [path for path in read_only if path not in wanted])


def _make_directories(path: str) -> list[str]:
    """Make *path* and its missing parents; returns those made, deepest first."""
    made = []
    current = os.path.abspath(path)
    while not os.path.lexists(current):
        made.append(current)
        current = os.path.dirname(current)
    os.makedirs(path, exist_ok=True)
    return made


def _remove_made(directories: list[str]) -> None:
    """Undo `_make_directories`; only empty directories go."""
    for directory in directories:
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def _start_helper(config: SandboxConfig) -> int:
    """The helper's pid: a fork of this process, or a fresh interpreter if it has threads.

    A fork of a threaded process can deadlock on a lock another thread held; the fresh
    interpreter costs about 50 ms more.
    """
    if threading.active_count() > 1:
        return os.posix_spawn(sys.executable, [sys.executable, "-m", "cowfs._sandbox_helper",
                                               config.to_json()], os.environ)
    pid = os.fork()
    if pid == 0:
        code = 127
        try:
            code = _sandbox_helper.main(config)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def run(layers: str | Sequence[str], command: Sequence[str], *, upper: str | None = None,
        commit: str | None = None, memory: str | int | None = None, cpus: float | None = None,
        pids: int | None = None, userns: tuple[int, int] | None = None,
        **options: object) -> int:
    """Run one command in a fresh sandbox and tear it down; its exit status.

    *options* are `Sandbox.run`'s: hostname, env, workdir, user, network, cap_add, cap_drop,
    seccomp, unmask, on_start.
    """
    if commit and os.path.lexists(commit):
        raise SandboxError(f"commit: layer directory {commit} exists already")
    with Sandbox(layers, upper=upper, memory=memory, cpus=cpus, pids=pids,
                 userns=userns) as box:
        code = box.run(command, **options)  # type: ignore[arg-type]
        if commit:
            box.commit(commit)
        return code


def _make_cgroups(run_id: str, limits: cgroups.Limits) -> cgroups.RunCgroups:
    chosen = cgroups.choose(cgroups.read_hierarchies(
        Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text()))
    wanted = {controller: hierarchy for controller, hierarchy in chosen.items()
              if cgroups.limits_use(controller, limits)}
    missing = [controller for controller in cgroups.CONTROLLERS
               if cgroups.limits_use(controller, limits) and controller not in wanted]
    if missing:
        raise SandboxError(f"no cgroup hierarchy offers the {', '.join(missing)} controller")
    run_cgroups = cgroups.RunCgroups(run_id, wanted)
    run_cgroups.create(limits)
    return run_cgroups


def _owner_is_gone(run_id: str) -> bool:
    """Whether the process that made *run_id* (`<pid>-<random>`) has ended."""
    pid, _, _ = run_id.partition("-")
    return pid.isdigit() and not os.path.exists(f"/proc/{pid}")


def sweep_leftovers() -> list[str]:
    """Remove what runs killed with SIGKILL left behind: cgroups, mounts, scratch directories."""
    swept = []
    hierarchies = cgroups.read_hierarchies(Path("/proc/self/mountinfo").read_text(),
                                           Path("/proc/self/cgroup").read_text())
    for path in cgroups.leftovers(hierarchies):
        run_id = os.path.basename(path)[len(cgroups.CGROUP_PREFIX):]
        if _owner_is_gone(run_id):
            leftover = cgroups.RunCgroups(run_id, {})
            leftover.directories = [path]
            leftover.remove()
            swept.append(path)
    scratch_root = tempfile.gettempdir()
    for name in os.listdir(scratch_root):
        if not name.startswith(RUN_PREFIX) or not _owner_is_gone(name[len(RUN_PREFIX):]):
            continue
        scratch = os.path.join(scratch_root, name)
        for mount in read_mountinfo():
            if mount.mountpoint.startswith(scratch + os.sep):
                unmount(mount.mountpoint, lazy=True)
                swept.append(mount.mountpoint)
        shutil.rmtree(scratch, ignore_errors=True)
        swept.append(scratch)
    for path in swept:
        log.info("swept %s, left by a killed run", path)
    return swept
