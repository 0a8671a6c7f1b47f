"""Start-up cost: `cowfs mount` until live and `cowfs run ROOTFS -- /bin/true`, warm (through
the supervisor), cold (COWFS_SUPERVISOR=off) and first (the command starts the supervisor),
beside fuse-overlayfs, the kernel's overlay, unshare + chroot and bubblewrap.

    .venv/bin/python benchmarks/run_startup.py [--rounds 20]

Builds a busybox-static root in a temporary directory, then times each command once per round,
rounds interleaved (A B C, A B C, ...) so that the machine's noise falls on all of them alike.
A mount is timed until its command returns (the mount is live then), its unmount apart. The
benchmark's supervisor is its own (COWFS_RUNTIME_DIR in the temporary directory), stopped at
the end. Prints median, min and max in milliseconds; a missing peer is reported and skipped.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
COWFS = os.path.join(os.path.dirname(sys.executable), "cowfs")


def make_rootfs(directory: Path) -> Path:
    root = directory / "rootfs"
    for name in ("bin", "proc", "dev", "sys", "tmp", "etc"):
        (root / name).mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "true"):
        (root / "bin" / applet).symlink_to("busybox")
    return root


def timed(command: list[str], environment: dict[str, str]) -> float:
    start = time.perf_counter_ns()
    subprocess.run(command, check=True, stdin=subprocess.DEVNULL, env=environment)
    return (time.perf_counter_ns() - start) / 1e6


class Mounts:
    """Mount and unmount one stack with a given command, timing both."""

    def __init__(self, directory: Path, name: str) -> None:
        self.lower = directory / name / "lower"
        self.upper = directory / name / "upper"
        self.work = directory / name / "work"
        self.merged = directory / name / "merged"
        for path in (self.lower, self.upper, self.work, self.merged):
            path.mkdir(parents=True)
        (self.lower / "file").write_text("lower\n")

    def overlay_options(self) -> str:
        return f"lowerdir={self.lower},upperdir={self.upper},workdir={self.work}"


def targets(directory: Path, root: Path) -> dict[str, Callable[[], list[tuple[str, float]]]]:
    warm = {**os.environ, "COWFS_RUNTIME_DIR": str(directory / "runtime")}
    cold = {**warm, "COWFS_SUPERVISOR": "off"}

    def cowfs_mount(environment: dict[str, str], label: str, first: bool = False):
        mounts = Mounts(directory, label.replace(" ", "-"))

        def measure() -> list[tuple[str, float]]:
            if first:
                subprocess.run([COWFS, "supervisor", "stop"], env=warm, check=True,
                               capture_output=True)
            mounted = timed([COWFS, "mount", str(mounts.lower), str(mounts.upper),
                             str(mounts.merged)], environment)
            unmounted = timed([COWFS, "umount", str(mounts.merged)], environment)
            return [(f"cowfs mount, {label}", mounted), (f"cowfs umount, {label}", unmounted)]
        return measure

    def cowfs_run(environment: dict[str, str], label: str):
        command = [COWFS, "run", str(root), "--", "/bin/true"]
        return lambda: [(f"cowfs run, {label}", timed(command, environment))]

    found: dict[str, Callable[[], list[tuple[str, float]]]] = {
        "cowfs mount warm": cowfs_mount(warm, "warm"),
        "cowfs mount cold": cowfs_mount(cold, "cold"),
        "cowfs mount first": cowfs_mount(warm, "first (starts the supervisor)", first=True),
        "cowfs run warm": cowfs_run(warm, "warm"),
        "cowfs run cold": cowfs_run(cold, "cold"),
    }
    overlay = Mounts(directory, "kernel")

    def kernel_overlay() -> list[tuple[str, float]]:
        mounted = timed(["mount", "-t", "overlay", "overlay", "-o", overlay.overlay_options(),
                         str(overlay.merged)], warm)
        unmounted = timed(["umount", str(overlay.merged)], warm)
        return [("kernel overlay mount", mounted), ("kernel overlay umount", unmounted)]
    found["kernel overlay"] = kernel_overlay
    if shutil.which("fuse-overlayfs"):
        peer = Mounts(directory, "fuse-overlayfs")

        def fuse_overlayfs() -> list[tuple[str, float]]:
            mounted = timed(["fuse-overlayfs", "-o", peer.overlay_options(), str(peer.merged)],
                            warm)
            unmounted = timed(["fusermount3", "-u", str(peer.merged)], warm)
            return [("fuse-overlayfs mount", mounted), ("fusermount3 -u", unmounted)]
        found["fuse-overlayfs"] = fuse_overlayfs
    else:
        print("fuse-overlayfs is missing: skipped", file=sys.stderr)
    found["unshare + chroot"] = lambda: [("unshare + chroot", timed(
        ["unshare", "--fork", "--pid", "--mount", "--uts", "--ipc", "--net", "chroot",
         str(root), "/bin/true"], warm))]
    if shutil.which("bwrap"):
        found["bwrap"] = lambda: [("bwrap", timed(
            ["bwrap", "--unshare-all", "--bind", str(root), "/", "--proc", "/proc", "--dev",
             "/dev", "/bin/true"], warm))]
    else:
        print("bwrap is missing: skipped (Debian package bubblewrap)", file=sys.stderr)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        runtime = directory / "runtime"
        runtime.mkdir(mode=0o700)
        times: dict[str, list[float]] = {}
        try:
            measures = targets(directory, make_rootfs(directory))
            for round_number in range(arguments.rounds):
                for measure in measures.values():
                    for label, milliseconds in measure():
                        times.setdefault(label, []).append(milliseconds)
                print(f"\rround {round_number + 1}/{arguments.rounds}", end="",
                      file=sys.stderr)
            print(file=sys.stderr)
        finally:
            subprocess.run([COWFS, "supervisor", "stop"], check=False, capture_output=True,
                           env={**os.environ, "COWFS_RUNTIME_DIR": str(runtime)})
            for merged in directory.glob("*/merged"):
                if os.path.ismount(merged):
                    subprocess.run(["umount", "-l", str(merged)], check=False)
    print_table(times, arguments.rounds)
    return 0


def print_table(times: dict[str, list[float]], rounds: int) -> None:
    """Median, min and max of each command's milliseconds, as a Markdown table."""
    print(f"| command | median ms | min | max | rounds: {rounds} |")
    print("|---|---|---|---|---|")
    for label, samples in times.items():
        print(f"| {label} | {statistics.median(samples):.1f} | {min(samples):.1f} "
              f"| {max(samples):.1f} | |")


if __name__ == "__main__":
    sys.exit(main())
