"""Memory of one mount through a long walk: RSS fresh, at the walk's peak, and after the kernel
dropped its caches and forgot the nodes, for a few walk-and-forget cycles.

    .venv/bin/python benchmarks/walk_memory.py [--directories 1000] [--files 100] [--cycles 3]

Generates a lower of DIRECTORIES x FILES empty files (100k entries by default) in a temporary
directory, mounts it with an upper through the warm start, and per cycle walks the merged tree
with lstat of every entry, reads the daemon's RSS (/proc/PID/status, VmRSS), writes 3 to
/proc/sys/vm/drop_caches until the daemon reports that the kernel forgot every node, and reads
RSS again. Also prints the daemon's own counts (nodes, entries, shrinks), which say that each
"after" figure was taken when the kernel had forgotten the walk. Unmounts at the end, also when
the run fails.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cowfs

COWFS = os.path.join(os.path.dirname(sys.executable), "cowfs")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def walk(top: Path) -> int:
    seen = 0
    for directory, directories, files in os.walk(top):
        for name in directories + files:
            os.lstat(os.path.join(directory, name))
            seen += 1
    return seen


def held(handle: cowfs.Mounted) -> dict[str, int]:
    statistics = handle.stats()["statistics"]
    assert isinstance(statistics, dict)
    return {name: statistics[name] for name in ("nodes", "entries", "shrinks")}


def forget(handle: cowfs.Mounted, timeout: float = 60) -> dict[str, int]:
    """Drop the kernel's caches until the daemon holds the root alone."""
    deadline = time.monotonic() + timeout
    while True:
        Path("/proc/sys/vm/drop_caches").write_text("3")
        counts = held(handle)
        if counts["nodes"] == 1 or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directories", type=int, default=1000)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--cycles", type=int, default=3)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        lower, upper, merged = (directory / part for part in ("lower", "upper", "merged"))
        for number in range(arguments.directories):
            (lower / f"d{number}").mkdir(parents=True)
            for file in range(arguments.files):
                (lower / f"d{number}" / f"f{file}").touch()
        upper.mkdir()
        merged.mkdir()
        subprocess.run([COWFS, "mount", str(lower), str(upper), str(merged)], check=True)
        try:
            handle = cowfs.Mounted(str(merged))
            pid = handle.stats()["pid"]
            assert isinstance(pid, int)
            fresh = rss_mib(pid)
            print(f"fresh mount: RSS {fresh:.1f} MiB")
            for cycle in range(1, arguments.cycles + 1):
                entries = walk(merged)
                peak = rss_mib(pid)
                walked = held(handle)
                counts = forget(handle)
                after = rss_mib(pid)
                warm = "" if counts["nodes"] == 1 else "  (the kernel kept some nodes)"
                print(f"cycle {cycle}: walked {entries} entries, RSS {peak:.1f} MiB "
                      f"({walked['nodes']} nodes); after drop_caches {after:.1f} MiB "
                      f"({after - fresh:+.1f} MiB of fresh; {counts['nodes']} nodes, "
                      f"{counts['entries']} entries, {counts['shrinks']} shrinks){warm}")
        finally:
            subprocess.run([COWFS, "umount", str(merged)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
