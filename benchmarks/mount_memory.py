"""Memory of many idle mounts of one image: the sum of PSS over every cowfs process.

    .venv/bin/python benchmarks/mount_memory.py [--mounts 100] [--cold]

Mounts one lower layer N times (each with an upper of its own) through the warm start (or,
with --cold, with COWFS_SUPERVISOR=off: a Python start per mount), reads a file through each so
every daemon has served, then sums Pss from /proc/PID/smaps_rollup over the mounts' daemons and
the supervisor. PSS splits a shared page among its sharers, so the sum is what the mounts cost
the machine together. Every mount is unmounted at the end, also when the run fails.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

COWFS = os.path.join(os.path.dirname(sys.executable), "cowfs")


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            name, _, value = line.partition(":")
            if name in ("Rss", "Pss"):
                fields[name] = int(value.split()[0])
    return fields


def cowfs_processes(merged_paths: set[str], runtime: Path) -> dict[int, str]:
    """Pid and title of each mount's daemon and of this run's supervisor (not another's: it
    would add its own tens of MiB)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if title.startswith(f"cowfs supervisor {runtime}/") or (
                title.startswith("cowfs daemon ")
                and title[len("cowfs daemon "):] in merged_paths):
            found[int(pid)] = title
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mounts", type=int, default=100)
    parser.add_argument("--cold", action="store_true")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        runtime = directory / "runtime"
        runtime.mkdir(mode=0o700)
        environment = {**os.environ, "COWFS_RUNTIME_DIR": str(runtime)}
        if arguments.cold:
            environment["COWFS_SUPERVISOR"] = "off"
        lower = directory / "lower"
        (lower / "etc").mkdir(parents=True)
        (lower / "etc" / "os-release").write_text("ID=bench\n")
        merged_paths: list[Path] = []
        try:
            for number in range(arguments.mounts):
                upper, merged = directory / f"upper{number}", directory / f"merged{number}"
                upper.mkdir()
                merged.mkdir()
                subprocess.run([COWFS, "mount", str(lower), str(upper), str(merged)],
                               env=environment, check=True)
                merged_paths.append(merged)
                (merged / "etc" / "os-release").read_text()
                print(f"\rmounted {number + 1}/{arguments.mounts}", end="", file=sys.stderr)
            print(file=sys.stderr)
            processes = cowfs_processes({str(path) for path in merged_paths}, runtime)
            daemons = [pid for pid, title in processes.items() if title.startswith("cowfs daemon")]
            assert len(daemons) == arguments.mounts, f"found {len(daemons)} daemons"
            totals = {"Rss": 0, "Pss": 0}
            for pid in processes:
                for field, kib in memory_kib(pid).items():
                    totals[field] += kib
            per_mount = {field: kib / arguments.mounts for field, kib in totals.items()}
            start = "cold (a Python start per mount)" if arguments.cold else "warm (supervisor)"
            print(f"{arguments.mounts} idle mounts, {start}: {len(processes)} processes, "
                  f"PSS sum {totals['Pss'] / 1024:.0f} MiB ({per_mount['Pss'] / 1024:.1f} MiB "
                  f"per mount), RSS sum {totals['Rss'] / 1024:.0f} MiB "
                  f"({per_mount['Rss'] / 1024:.1f} MiB per mount)")
        finally:
            for merged in merged_paths:
                subprocess.run([COWFS, "umount", str(merged)], env=environment, check=False)
            subprocess.run([COWFS, "supervisor", "stop"], env=environment, check=False,
                           capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
