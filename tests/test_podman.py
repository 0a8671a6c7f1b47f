"""cowfs as podman's mount_program: a real client drives every mount of a container's root.

One private store per module (config files selected by environment variables, nothing global
changed), a busybox image imported from the host's static busybox, then podman's run, stop and
start, build and an unprivileged user, each checked through what the container sees.
"""

import contextlib
import os
import shutil
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import busybox_root, is_mounted, wait_until

from benchmarks.podman_store import PodmanStore

pytestmark = pytest.mark.mounts

COWFS = os.path.join(os.path.dirname(sys.executable), "cowfs")
APPLETS = ("sh", "cat", "ls", "echo", "rm", "id", "sleep", "mkdir", "touch", "true")
IMAGE = "localhost/bb:1"


class Podman(PodmanStore):
    """podman over one private store, with cowfs as its mount_program."""

    def __init__(self, store: Path) -> None:
        super().__init__(store, COWFS)

    def merged_dir(self, container: str) -> str:
        return self.check("inspect", "--format", "{{.GraphDriver.Data.MergedDir}}",
                          container).strip()

    def upper_dir(self, container: str) -> Path:
        return Path(self.check("inspect", "--format", "{{.GraphDriver.Data.UpperDir}}",
                               container).strip())


def cowfs_daemons_at(merged: str) -> list[int]:
    title = f"cowfs daemon {merged}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == title:
                found.append(int(pid))
    return found


def make_rootfs(root: Path) -> None:
    """One static busybox, its applets, and a file in /etc for the layers above to delete."""
    busybox_root(root, APPLETS)
    (root / "etc").mkdir()
    (root / "etc" / "base-file").write_text("from the image\n")
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    """A store with the busybox image; torn down, and checked clean, after the module."""
    for program in ("podman", "runc", "conmon"):
        if shutil.which(program) is None:
            pytest.fail(f"{program} is missing: ./scripts/install.sh installs it")
    if not os.access(COWFS, os.X_OK):
        pytest.fail(f"{COWFS} is missing: ./scripts/install.sh installs it")
    base = tmp_path_factory.mktemp("podman")
    rootfs = base / "rootfs"
    make_rootfs(rootfs)
    client = Podman(base / "store")
    try:
        client.import_tree(rootfs, IMAGE)
        yield client
    finally:
        leftovers = client.tear_down()
    assert not leftovers, f"podman left behind: {leftovers}"


def test_run_reads_and_writes_the_image(podman: Podman) -> None:
    output = podman.check("run", "--rm", IMAGE, "sh", "-c",
                          "cat /etc/base-file; echo new > /etc/new; cat /etc/new; "
                          "rm /etc/base-file; ls /etc")
    lines = output.splitlines()
    assert lines[:2] == ["from the image", "new"]
    assert "base-file" not in lines[2:] and "new" in lines[2:], output
    # The image itself is untouched by the --rm container.
    assert podman.check("run", "--rm", IMAGE, "cat", "/etc/base-file") == "from the image\n"


def test_a_stopped_container_keeps_its_changes(podman: Podman) -> None:
    """podman stop unmounts the container's root; podman start has cowfs mount the same
    upper again."""
    # sh as PID 1 ignores SIGTERM unless it traps it; `wait` lets the trap run at once.
    script = ("test -e /etc/kept || { echo kept > /etc/kept; rm /etc/base-file; }; "
              "trap 'exit 0' TERM; while true; do sleep 1 & wait $!; done")
    podman.check("run", "-d", "--name", "keeper", IMAGE, "sh", "-c", script)
    try:
        merged = podman.merged_dir("keeper")
        assert is_mounted(merged, "fuse.cowfs"), "podman did not mount the root with cowfs"
        assert len(cowfs_daemons_at(merged)) == 1
        assert podman.check("exec", "keeper", "cat", "/etc/kept") == "kept\n"
        whiteout = os.stat(podman.upper_dir("keeper") / "etc" / "base-file")
        assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0, "cowfs's whiteout"

        podman.check("stop", "-t", "10", "keeper")
        assert not is_mounted(merged)
        wait_until(lambda: not cowfs_daemons_at(merged), what="the cowfs daemon to end")

        podman.check("start", "keeper")
        assert is_mounted(merged, "fuse.cowfs")
        output = podman.check("exec", "keeper", "sh", "-c", "cat /etc/kept; ls /etc")
        assert output.splitlines()[0] == "kept"
        assert "base-file" not in output.splitlines()[1:], output
    finally:
        podman("rm", "-f", "-t", "0", "keeper")
    assert not is_mounted(merged)


def test_build_writes_and_deletes_in_layers(podman: Podman, tmp_path: Path) -> None:
    """Each RUN step is a container on cowfs; podman diffs its mounted tree into a layer."""
    (tmp_path / "Containerfile").write_text(
        f"FROM {IMAGE}\n"
        "RUN echo built > /etc/built\n"
        "RUN rm /etc/base-file\n")
    podman.check("build", "-q", "-t", "localhost/built:1", str(tmp_path))
    try:
        output = podman.check("run", "--rm", "localhost/built:1", "sh", "-c",
                              "cat /etc/built; ls /etc")
        assert output.splitlines()[0] == "built"
        assert "base-file" not in output.splitlines()[1:], output
    finally:
        podman("rmi", "-f", "localhost/built:1")


def test_an_unprivileged_user_reads_but_cannot_write_root_dirs(podman: Podman) -> None:
    result = podman("run", "--rm", "--user", "1000:1000", IMAGE, "sh", "-c",
                    "id -u; cat /etc/base-file; "
                    "echo no > /etc/denied || echo refused; "
                    "mkdir /bin/denied || echo refused; "
                    "echo yes > /tmp/allowed && cat /tmp/allowed")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["1000", "from the image", "refused", "refused", "yes"]
    assert result.stderr.count("Permission denied") == 2, result.stderr
