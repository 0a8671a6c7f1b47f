"""Start-up cost of `cowfs run ROOTFS -- /bin/true` beside unshare + chroot and bubblewrap.

    .venv/bin/python benchmarks/run_startup.py [--rounds 15]

Builds a busybox-static root in a temporary directory, then times each command once per round,
rounds interleaved (A B C, A B C, ...) so that the machine's noise falls on all of them alike.
Prints median, min and max in milliseconds; a missing peer (bwrap) is reported and skipped.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUSYBOX = shutil.which("busybox") or "/bin/busybox"


def make_rootfs(directory: Path) -> Path:
    root = directory / "rootfs"
    for name in ("bin", "proc", "dev", "sys", "tmp", "etc"):
        (root / name).mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    for applet in ("sh", "true"):
        (root / "bin" / applet).symlink_to("busybox")
    return root


def commands(root: Path) -> dict[str, list[str]]:
    cowfs = os.path.join(os.path.dirname(sys.executable), "cowfs")
    found = {
        "cowfs run": [cowfs, "run", str(root), "--", "/bin/true"],
        "unshare + chroot": ["unshare", "--fork", "--pid", "--mount", "--uts", "--ipc", "--net",
                             "chroot", str(root), "/bin/true"],
    }
    if shutil.which("bwrap"):
        found["bwrap"] = ["bwrap", "--unshare-all", "--bind", str(root), "/", "--proc", "/proc",
                          "--dev", "/dev", "/bin/true"]
    else:
        print("bwrap is missing: skipped (Debian package bubblewrap)", file=sys.stderr)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        targets = commands(make_rootfs(Path(directory)))
        times: dict[str, list[float]] = {name: [] for name in targets}
        for round_number in range(arguments.rounds):
            for name, command in targets.items():
                start = time.perf_counter_ns()
                subprocess.run(command, check=True, stdin=subprocess.DEVNULL)
                times[name].append((time.perf_counter_ns() - start) / 1e6)
            print(f"\rround {round_number + 1}/{arguments.rounds}", end="", file=sys.stderr)
        print(file=sys.stderr)
    print(f"| command | median ms | min | max | rounds: {arguments.rounds} |")
    print("|---|---|---|---|---|")
    for name, samples in times.items():
        print(f"| {name} | {statistics.median(samples):.1f} | {min(samples):.1f} "
              f"| {max(samples):.1f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
