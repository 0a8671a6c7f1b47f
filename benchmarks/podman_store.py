"""A private podman store: its config files, selected by environment variables, so nothing
global changes; shared by tests/test_podman.py and benchmarks/podman_startup.py."""

import contextlib
import os
import signal
import subprocess
from pathlib import Path

from cowfs.layers import read_mountinfo

PODMAN_TIMEOUT_S = 60


def storage_conf(store: Path, mount_program: str | None) -> str:
    """The overlay driver, through *mount_program* (None: the kernel's overlay)."""
    text = f"""\
[storage]
driver = "overlay"
graphroot = "{store / 'root'}"
runroot = "{store / 'run'}"
"""
    if mount_program is not None:
        text += f'[storage.options.overlay]\nmount_program = "{mount_program}"\n'
    return text


def containers_conf(store: Path) -> str:
    """No static_dir: conmon runs `podman container cleanup` without our environment, so that
    podman finds the database only at its default place, `<graphroot>/libpod` (with a private
    static_dir, every container's exit went unrecorded and each `podman run` waited 20 s).
    netns none and runc: see ../shared/notes/containers-storage.md; this VM lacks
    CAP_SYS_RESOURCE, so podman's default rlimits would make runc fail."""
    return f"""\
[containers]
netns = "none"
default_ulimits = ["nofile=20000:20000", "nproc=16384:16384"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{store / 'events.log'}"
runtime = "runc"
tmp_dir = "{store / 'tmp'}"
image_copy_tmp_dir = "{store / 'tmp'}"
volume_path = "{store / 'volumes'}"
[network]
network_config_dir = "{store / 'networks'}"
"""


class PodmanStore:
    """podman over one private store; the store's directory holds config and state."""

    def __init__(self, store: Path, mount_program: str | None,
                 environment: dict[str, str] | None = None) -> None:
        self.store = store
        store.mkdir()
        for name in ("root", "run", "tmp", "volumes", "networks"):
            (store / name).mkdir()
        files = {"storage.conf": storage_conf(store, mount_program),
                 "containers.conf": containers_conf(store),
                 "registries.conf": "unqualified-search-registries = []\n"}
        for name, text in files.items():
            (store / name).write_text(text)
        self.environment = {**(os.environ if environment is None else environment),
                            "CONTAINERS_STORAGE_CONF": str(store / "storage.conf"),
                            "CONTAINERS_CONF": str(store / "containers.conf"),
                            "CONTAINERS_REGISTRIES_CONF": str(store / "registries.conf")}

    def __call__(self, *arguments: str, stdin: int | None = subprocess.DEVNULL
                 ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["podman", *arguments], env=self.environment, stdin=stdin,
                              capture_output=True, text=True, timeout=PODMAN_TIMEOUT_S,
                              check=False)

    def check(self, *arguments: str) -> str:
        result = self(*arguments)
        assert result.returncode == 0, f"podman {' '.join(arguments)}: {result.stderr}"
        return result.stdout

    def import_tree(self, root: Path, image: str) -> None:
        """*root* as the one layer of *image*."""
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        with tar:
            imported = self("import", "-q", "-", image, stdin=tar.stdout.fileno())
        assert imported.returncode == 0, imported.stderr

    def tear_down(self) -> list[str]:
        """Remove everything podman made; returns the mounts and processes it left behind
        (which are removed too). No `podman system reset`: it also deletes files beside the
        store it was not asked about."""
        self("rm", "-af", "-t", "0")
        self("rmi", "-af")
        leftovers = []
        for pid in processes_naming(self.store):
            leftovers.append(f"process {pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for mount in sorted(read_mountinfo(), key=lambda mount: -len(mount.mountpoint)):
            if mount.mountpoint.startswith(str(self.store)):
                leftovers.append(f"mount {mount.mountpoint}")
                for command in (["umount", mount.mountpoint], ["umount", "-l", mount.mountpoint]):
                    if subprocess.run(command, capture_output=True, check=False).returncode == 0:
                        break
        return leftovers


def processes_naming(path: Path) -> list[int]:
    """conmon and cowfs daemons serving this store (their command lines name its paths)."""
    needle = str(path).encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes() and int(pid) != os.getpid():
                found.append(int(pid))
    return found
