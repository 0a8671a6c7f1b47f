"""Fixtures that mount for real: cowfs in a child process, the kernel's overlayfs as the oracle.

Every mount made here is unmounted and every daemon reaped, also when the test fails.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cowfs_zygote import ForkedDaemon, Zygote

from cowfs.layers import read_mountinfo

MOUNT_TIMEOUT_S = 20.0


def _fuse_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "mount tests need root"
    if not os.path.exists("/dev/fuse"):
        return "mount tests need /dev/fuse"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip mount tests on a machine without FUSE or root; in CI that is a failure instead."""
    reason = _fuse_unavailable()
    if reason is None:
        return
    if os.environ.get("CI"):
        raise pytest.UsageError(f"CI must run the mount tests, but {reason}")
    for item in items:
        if "mounts" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "mounts: the test mounts a filesystem (root, /dev/fuse)")


def cowfs_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "cowfs", *arguments]


def is_mounted(path: str | os.PathLike[str], fstype: str | None = None) -> bool:
    resolved = os.path.realpath(path)
    return any(mount.mountpoint == resolved and (fstype is None or mount.fstype == fstype)
               for mount in read_mountinfo())


def paths_under(root: str | os.PathLike[str]) -> set[str]:
    """Every path below *root* (symlinks not followed): a refused mount must change none."""
    found = set()
    for directory, subdirectories, files in os.walk(root):
        for name in subdirectories + files:
            found.add(os.path.relpath(os.path.join(directory, name), root))
    return found


def wait_until(condition, timeout_s: float = MOUNT_TIMEOUT_S, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    delay = 0.002
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def unmount_quietly(path: str | os.PathLike[str]) -> None:
    """Unmount, lazily if busy; never raises (it runs in finally blocks)."""
    for command in (["umount", str(path)], ["umount", "-l", str(path)]):
        if not is_mounted(path):
            return
        subprocess.run(command, capture_output=True, check=False)


def reap(process: subprocess.Popen | ForkedDaemon) -> None:
    """Wait for a daemon to end; SIGTERM, then SIGKILL, if it does not."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
        try:
            process.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


_zygote: Zygote | None = None


def zygote() -> Zygote:
    """The session's warm start for `cowfs mount -f` (tests/cowfs_zygote.py), started at its
    first use."""
    global _zygote
    if _zygote is None:
        _zygote = Zygote(tempfile.mkdtemp(prefix="cowfs-zygote-"))
    return _zygote


def forkable(extra: tuple[str, ...]) -> bool:
    """Whether a mount with *extra* can be forked from the zygote: not one that must run
    without the kernel-cache library, which the zygote has loaded."""
    return not any("kernel_caches=off" in argument for argument in extra)


# The suite's `cowfs` commands reach a supervisor of the suite's own, stopped at its end: none
# is left behind in /run/cowfs, and none from outside serves the suite.
RUNTIME_DIRECTORY = tempfile.mkdtemp(prefix="cowfs-runtime-")
os.environ["COWFS_RUNTIME_DIR"] = RUNTIME_DIRECTORY


def stop_supervisors(directory: str) -> None:
    from cowfs import supervisor
    for name in os.listdir(directory):
        if name.endswith(".sock"):
            supervisor.request_to(os.path.join(directory, name), {"command": "stop"})


def pytest_unconfigure(config: pytest.Config) -> None:
    stop_supervisors(RUNTIME_DIRECTORY)
    shutil.rmtree(RUNTIME_DIRECTORY, ignore_errors=True)
    if _zygote is not None:
        _zygote.stop()
        shutil.rmtree(os.path.dirname(_zygote.socket_path), ignore_errors=True)


class CowfsMount:
    """A running `cowfs mount -f` and its mount point."""

    def __init__(self, process: subprocess.Popen | ForkedDaemon, path: Path,
                 log_path: Path) -> None:
        self.process = process
        self.path = path
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def unmount(self) -> None:
        """Unmount and reap the daemon; asserts the daemon ended cleanly."""
        try:
            unmount_quietly(self.path)
        finally:
            reap(self.process)
        assert self.process.returncode == 0, self.log()


@contextlib.contextmanager
def mounted_cowfs(lowers: list[Path], merged: Path, upper: Path | None = None,
                  extra: tuple[str, ...] = (), *, launcher: list[str] | None = None
                  ) -> Iterator[CowfsMount]:
    """Mount with cowfs in a child process; always unmounted and reaped afterwards.

    *launcher* replaces `python -m cowfs` (a command that takes cowfs's arguments after it)."""
    lowerdir = ":".join(str(path).replace("\\", "\\\\").replace(":", "\\:") for path in lowers)
    arguments = ["mount", "-f", *extra, lowerdir, *([str(upper)] if upper else []), str(merged)]
    log_path = merged.parent / f".{merged.name}.cowfs.log"
    with open(log_path, "wb") as log_file:
        process: subprocess.Popen | ForkedDaemon
        if launcher is None and forkable(extra):
            process = zygote().start(arguments, str(log_path))
        else:
            command = [*launcher, *arguments] if launcher else cowfs_command(*arguments)
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                       stderr=subprocess.STDOUT)
    mount = CowfsMount(process, merged, log_path)
    try:
        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"cowfs exited with {process.returncode}: {mount.log()}")
            return is_mounted(merged, "fuse.cowfs")
        wait_until(ready, what=f"cowfs at {merged}")
        yield mount
    finally:
        unmount_quietly(merged)
        reap(process)


@contextlib.contextmanager
def mounted_overlay(lowers: list[Path], merged: Path) -> Iterator[Path]:
    """The kernel's read-only overlayfs over *lowers* (it needs two: an empty one is added)."""
    layers = list(lowers)
    if len(layers) < 2:
        empty = merged.parent / f".{merged.name}.empty"
        empty.mkdir(exist_ok=True)
        layers.append(empty)
    lowerdir = ":".join(str(path).replace("\\", "\\\\").replace(":", "\\:")
                        .replace(",", "\\,") for path in layers)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowerdir}",
                    str(merged)], check=True, capture_output=True)
    try:
        yield merged
    finally:
        unmount_quietly(merged)


@contextlib.contextmanager
def kernel_overlay(lowers: list[Path], merged: Path, upper: Path | None = None,
                   options: str = "") -> Iterator[Path]:
    """`mount -t overlay` with *options* (none: the kernel's defaults), a fresh workdir beside
    *upper*; always unmounted."""
    parts = [f"lowerdir={':'.join(map(str, lowers))}"]
    if upper is not None:
        workdir = upper.parent / f".{upper.name}.kernel-work"
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir()
        parts += [f"upperdir={upper}", f"workdir={workdir}"]
    parts += [option for option in options.split(",") if option]
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", ",".join(parts), str(merged)],
                   check=True, capture_output=True)
    try:
        yield merged
    finally:
        unmount_quietly(merged)


@pytest.fixture
def layer_dirs(tmp_path: Path):
    """A factory of fresh directories under tmp_path: layer_dirs('l1', 'l2')."""
    def make(*names: str) -> list[Path]:
        paths = [tmp_path / name for name in names]
        for path in paths:
            path.mkdir()
        return paths
    return make


@pytest.fixture
def world_readable_dirs() -> Iterator[Path]:
    """A scratch directory other users can walk into (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="cowfs-perm-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for mount in read_mountinfo():
            if mount.mountpoint.startswith(str(path)):
                unmount_quietly(mount.mountpoint)
        shutil.rmtree(path)


@pytest.fixture(autouse=True)
def no_leftover_mounts(tmp_path: Path) -> Iterator[None]:
    """A test that leaves a mount under its tmp_path fails (and the mount is removed)."""
    yield
    leftovers = [mount.mountpoint for mount in read_mountinfo()
                 if mount.mountpoint.startswith(str(tmp_path))]
    for path in leftovers:
        unmount_quietly(path)
    assert not leftovers, f"test left mounts behind: {leftovers}"


@pytest.fixture(scope="session")
def package_317(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cowfs with its extensions built against libfuse 3.17 (tests/libfuse317.py)."""
    import libfuse317
    return libfuse317.build_package(tmp_path_factory.mktemp("cowfs317"))


# `cowfs run` roots: one static busybox and its applets, and a probe of the kernel's answers.
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
APPLETS = ("sh", "ps", "hostname", "cat", "ls", "echo", "mkdir", "chroot", "grep", "sleep",
           "stty", "tty", "true", "touch")


def busybox_root(root: Path, applets: tuple[str, ...] = APPLETS) -> Path:
    """*root* with bin/busybox, the host's static one, and *applets* linked to it."""
    if not os.path.exists(BUSYBOX):
        pytest.fail("busybox-static is missing: ./scripts/install.sh installs it")
    (root / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    for applet in applets:
        (root / "bin" / applet).symlink_to("busybox")
    return root


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    """A root filesystem of one static busybox and its applets."""
    root = busybox_root(tmp_path / "rootfs")
    (root / "etc").mkdir()
    (root / "etc" / "image-file").write_text("from the image")
    return root


@pytest.fixture(scope="session")
def probe_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/sandbox_probe.c, built static so it runs in any root."""
    program = tmp_path_factory.mktemp("probe") / "probe"
    subprocess.run(["gcc", "-static", "-O1", "-Wall", "-Werror", "-o", str(program),
                    str(Path(__file__).with_name("sandbox_probe.c"))], check=True)
    return program


@pytest.fixture
def probe_rootfs(rootfs: Path, probe_program: Path) -> Path:
    shutil.copy(probe_program, rootfs / "bin" / "probe")
    return rootfs
