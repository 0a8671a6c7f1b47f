"""Starting a container with podman: `podman run --rm IMAGE /bin/true` with the overlay driver
on the kernel's overlay, through fuse-overlayfs, and through cowfs cold (a Python start per
mount) and warm (the supervisor), as podman's mount_program.

    .venv/bin/python -m benchmarks.podman_startup [--rounds 10]

One private store per way (podman_store.py: nothing global changes), each with the same busybox
image imported; one untimed run per store first (podman's own first-run work, the supervisor's
start), then rounds interleaved so that the machine's noise falls on all of them alike. A run
includes the mount and the unmount of the container's root. Prints median, min and max in
milliseconds. Every store is torn down at the end, also when the run fails.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.podman_store import PodmanStore
from benchmarks.run_startup import COWFS, make_rootfs, print_table

IMAGE = "localhost/startup:1"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    arguments = parser.parse_args()
    for program in ("podman", "runc", "conmon"):
        if shutil.which(program) is None:
            print(f"{program} is missing: ./scripts/install.sh installs it", file=sys.stderr)
            return 1
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        runtime = directory / "runtime"
        runtime.mkdir(mode=0o700)
        warm = {**os.environ, "COWFS_RUNTIME_DIR": str(runtime)}
        ways: dict[str, tuple[str | None, dict[str, str]]] = {
            "kernel overlay": (None, warm),
            "cowfs warm": (COWFS, warm),
            "cowfs cold": (COWFS, {**warm, "COWFS_SUPERVISOR": "off"})}
        if shutil.which("fuse-overlayfs"):
            ways["fuse-overlayfs"] = (shutil.which("fuse-overlayfs"), warm)
        else:
            print("fuse-overlayfs is missing: skipped", file=sys.stderr)
        root = make_rootfs(directory)
        stores: dict[str, PodmanStore] = {}
        times: dict[str, list[float]] = {label: [] for label in ways}
        try:
            for number, (label, (program, environment)) in enumerate(ways.items()):
                store = stores[label] = PodmanStore(directory / f"store{number}", program,
                                                    environment)
                store.import_tree(root, IMAGE)
                store.check("run", "--rm", IMAGE, "/bin/true")
            for round_number in range(arguments.rounds):
                for label, store in stores.items():
                    start = time.perf_counter_ns()
                    store.check("run", "--rm", IMAGE, "/bin/true")
                    times[label].append((time.perf_counter_ns() - start) / 1e6)
                print(f"\rround {round_number + 1}/{arguments.rounds}", end="",
                      file=sys.stderr)
            print(file=sys.stderr)
        finally:
            for label, store in stores.items():
                leftovers = store.tear_down()
                if leftovers:
                    print(f"{label}: podman left behind {leftovers}", file=sys.stderr)
            subprocess.run([COWFS, "supervisor", "stop"], check=False, capture_output=True,
                           env=warm)
    print_table({f"podman run --rm, {label}": values for label, values in times.items()},
                arguments.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
