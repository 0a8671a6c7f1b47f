"""Memory, CPU and process limits through cgroups, v2 or v1, chosen per controller.

Most machines run the unified (v2) hierarchy; hybrid ones (this project's CI among them) mount
v1 hierarchies for the controllers and an empty v2 one beside them. Each controller is taken
from v2 when v2 offers it, else from the v1 hierarchy that has it. Every cgroup made here is
named `cowfs-<run id>` under the caller's own cgroup, so `sweep` finds what a killed run left.
In v2 a cgroup that holds processes cannot give its children controllers ("no internal
processes"): where the caller's cgroup holds some (a systemd login session or service does),
the run's cgroup goes under the nearest ancestor that holds none, as a sibling of the caller's.

Everything takes the filesystem root and /proc files as arguments, so tests run it against a
fake cgroupfs directory.
"""

import contextlib
import dataclasses
import logging
import os
import re
import signal
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)

CONTROLLERS = ("memory", "cpu", "pids")
CGROUP_PREFIX = "cowfs-"
CPU_PERIOD_US = 100_000
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([kmgt]?)i?b?$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """`256M`, `1g`, `512KiB`, `1048576` as bytes (binary units, as docker)."""
    match = _SIZE.match(text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r} (expected a number with K, M, G or T)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


# Below this a payload cannot start: the run's own PID 1 and the exec need about this much (and
# docker refuses less than 6 MiB too).
MIN_MEMORY_BYTES = 6 << 20
# The payload and the sandbox's PID 1; the helper that waits outside is not counted.
MIN_PIDS = 2


@dataclasses.dataclass(frozen=True)
class Limits:
    memory_bytes: int | None = None
    cpus: float | None = None          # CPU time per wall-clock second, as `docker --cpus`
    pids: int | None = None            # the sandbox's processes, PID 1 included

    def check(self) -> None:
        """Raise ValueError, naming the limit, for one no payload could start under."""
        if self.memory_bytes is not None and self.memory_bytes < MIN_MEMORY_BYTES:
            raise ValueError(f"--memory must be at least {MIN_MEMORY_BYTES >> 20}M, not "
                             f"{self.memory_bytes} bytes")
        available = os.cpu_count() or 1
        if self.cpus is not None and not 0.01 <= self.cpus <= available:
            raise ValueError(f"--cpus must be from 0.01 to {available} (the CPUs here), "
                             f"not {self.cpus:g}")
        if self.pids is not None and self.pids < MIN_PIDS:
            raise ValueError(f"--pids must be at least {MIN_PIDS} (PID 1 and the payload), "
                             f"not {self.pids}")


@dataclasses.dataclass(frozen=True)
class Hierarchy:
    """A mounted cgroup hierarchy: v2 (unified) or a v1 one with its controllers."""

    mountpoint: str
    version: int
    controllers: frozenset[str]
    own_path: str                      # the caller's cgroup in it, from /proc/self/cgroup


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def read_hierarchies(mountinfo: str, proc_cgroup: str, root: str = "") -> list[Hierarchy]:
    """The cgroup hierarchies in *mountinfo*, with the controllers each one offers."""
    own = {}
    for line in proc_cgroup.splitlines():
        _number, names, path = line.split(":", 2)
        own[names] = path
    hierarchies = []
    for line in mountinfo.splitlines():
        fields = line.split()
        separator = fields.index("-")
        fstype, options = fields[separator + 1], fields[separator + 3].split(",")
        mountpoint = root + _unescape(fields[4])
        if fstype == "cgroup2":
            controllers = _read(os.path.join(mountpoint, "cgroup.controllers")).split()
            hierarchies.append(Hierarchy(mountpoint, 2, frozenset(controllers),
                                         own.get("", "/")))
        elif fstype == "cgroup":
            controllers = frozenset(option for option in options if option in CONTROLLERS)
            key = next((names for names in own if set(names.split(",")) & controllers), None)
            hierarchies.append(Hierarchy(mountpoint, 1, controllers,
                                         own.get(key, "/") if key else "/"))
    return hierarchies


def choose(hierarchies: list[Hierarchy]) -> dict[str, Hierarchy]:
    """For each controller the hierarchy that serves it: v2 if it can, else v1."""
    chosen = {}
    for controller in CONTROLLERS:
        for version in (2, 1):
            found = [hierarchy for hierarchy in hierarchies
                     if hierarchy.version == version and controller in hierarchy.controllers]
            if found:
                chosen[controller] = found[0]
                break
    return chosen


def _read(path: str) -> str:
    try:
        with open(path) as file:
            return file.read()
    except FileNotFoundError:
        return ""


def _write(directory: str, name: str, value: str) -> None:
    log.debug("%s/%s = %s", directory, name, value)
    with open(os.path.join(directory, name), "w") as file:
        file.write(value)


class RunCgroups:
    """The cgroups of one run, one per hierarchy that serves a controller it limits."""

    def __init__(self, run_id: str, chosen: dict[str, Hierarchy]) -> None:
        self.name = CGROUP_PREFIX + run_id
        self.chosen = chosen
        self.directories: list[str] = []

    def _directory(self, hierarchy: Hierarchy) -> str:
        return os.path.join(run_parent(hierarchy), self.name)

    def create(self, limits: Limits) -> None:
        """Make the cgroups and write the limits; on failure nothing is left."""
        try:
            for hierarchy in dict.fromkeys(self.chosen.values()):
                directory = self._directory(hierarchy)
                os.makedirs(directory, exist_ok=True)
                self.directories.append(directory)
            for controller, hierarchy in self.chosen.items():
                self._limit(controller, hierarchy, limits)
        except BaseException:
            self.remove()
            raise

    def _limit(self, controller: str, hierarchy: Hierarchy, limits: Limits) -> None:
        directory = self._directory(hierarchy)
        if hierarchy.version == 2:
            if limits_use(controller, limits):
                _enable_down_to(hierarchy, os.path.dirname(directory), controller)
            if controller == "memory" and limits.memory_bytes is not None:
                _write(directory, "memory.max", str(limits.memory_bytes))
                _write(directory, "memory.swap.max", "0")   # past the limit: OOM, not swap
            elif controller == "cpu" and limits.cpus is not None:
                _write(directory, "cpu.max", f"{round(limits.cpus * CPU_PERIOD_US)} "
                                             f"{CPU_PERIOD_US}")
            elif controller == "pids" and limits.pids is not None:
                _write(directory, "pids.max", str(limits.pids + 1))    # + the helper
            return
        if controller == "memory" and limits.memory_bytes is not None:
            _write(directory, "memory.limit_in_bytes", str(limits.memory_bytes))
            if os.path.exists(os.path.join(directory, "memory.memsw.limit_in_bytes")):
                _write(directory, "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
        elif controller == "cpu" and limits.cpus is not None:
            _write(directory, "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(directory, "cpu.cfs_quota_us", str(round(limits.cpus * CPU_PERIOD_US)))
        elif controller == "pids" and limits.pids is not None:
            _write(directory, "pids.max", str(limits.pids + 1))

    def oom_kills(self) -> int:
        """How many processes the memory limit has killed (v2 memory.events, v1
        memory.oom_control)."""
        hierarchy = self.chosen.get("memory")
        if hierarchy is None:
            return 0
        name = "memory.events" if hierarchy.version == 2 else "memory.oom_control"
        try:
            text = _read(os.path.join(self._directory(hierarchy), name))
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def join(self, pid: int) -> None:
        for directory in self.directories:
            _write(directory, "cgroup.procs", str(pid))

    def pids(self) -> set[int]:
        return {int(pid) for directory in self.directories
                for pid in _read(os.path.join(directory, "cgroup.procs")).split()}

    def kill(self, timeout_s: float = 10.0) -> None:
        """Kill everything in the cgroups and wait until they are empty."""
        deadline = time.monotonic() + timeout_s
        while self.pids():
            for directory in self.directories:
                if os.path.exists(os.path.join(directory, "cgroup.kill")):
                    _write(directory, "cgroup.kill", "1")
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise TimeoutError(f"cgroup {self.name} did not empty")
            time.sleep(0.005)

    def remove(self) -> None:
        """Kill what is left, then remove the cgroups (deepest first)."""
        self.kill()
        for directory in reversed(self.directories):
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(directory)
        self.directories = []


def run_parent(hierarchy: Hierarchy) -> str:
    """Where runs' cgroups go: the caller's cgroup, or in v2 its nearest ancestor without
    processes of its own (the root may hold processes and still give controllers)."""
    path = hierarchy.own_path
    if hierarchy.version == 2:
        while path not in ("", "/") and _read(os.path.join(
                hierarchy.mountpoint, path.lstrip("/"), "cgroup.procs")).strip():
            path = os.path.dirname(path)
    return os.path.join(hierarchy.mountpoint, path.lstrip("/"))


def _enable_down_to(hierarchy: Hierarchy, parent: str, controller: str) -> None:
    """Give *parent*'s children *controller*: each cgroup from the root down must pass it on."""
    directories = [hierarchy.mountpoint]
    relative = os.path.relpath(parent, hierarchy.mountpoint)
    if relative != ".":
        for component in relative.split(os.sep):
            directories.append(os.path.join(directories[-1], component))
    for directory in directories:
        if controller not in _read(os.path.join(directory, "cgroup.subtree_control")).split():
            _write(directory, "cgroup.subtree_control", f"+{controller}")


def limits_use(controller: str, limits: Limits) -> bool:
    return {"memory": limits.memory_bytes, "cpu": limits.cpus,
            "pids": limits.pids}[controller] is not None


def leftovers(hierarchies: list[Hierarchy]) -> Iterator[str]:
    """The cgroups earlier runs left behind (their runtime was killed)."""
    for hierarchy in hierarchies:
        parent = run_parent(hierarchy)
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            if name.startswith(CGROUP_PREFIX) and os.path.isdir(os.path.join(parent, name)):
                yield os.path.join(parent, name)
