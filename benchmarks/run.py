"""`python -m benchmarks [--smoke|--quick|--full] [--out DIR] [--targets A,B,...]`.

One run: build the lower stacks once, check every target's merged view against the flattened
tree, then time each workload on every target, round after round (A B C D, A B C D, ...), each
time on a fresh mount, and write results.md, results.json and plots to --out.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from benchmarks import layers, report, targets
from benchmarks.layers import Sizes, Stack
from benchmarks.targets import Target, Tools
from benchmarks.workloads import (
    WARM_ATTEMPTS,
    WARM_STAT_ALLOWED,
    Env,
    Workload,
    all_workloads,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
EXIT_PROBLEMS = 3       # outputs written, but a check failed or a workload went wrong
EXIT_INTERRUPTED = 130

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
MODES: dict[str, Sizes] = {
    "smoke": Sizes(rounds=1, copyup=(4 * KIB, 64 * KIB, MIB), sparse_size=16 * MIB,
                   sparse_data=MIB, meta_file=MIB, many_files=20, concurrent_file=MIB,
                   stat_files=100, stat_depths=(1, 2, 5, 10), big_dir_entries=200,
                   seq_file=4 * MIB, fio_seconds=0.5, untar_files=100, rm_files=50,
                   rootfs_files=400, packages=5, package_files=12),
    "quick": Sizes(rounds=1, copyup=(4 * KIB, 64 * KIB, MIB, 16 * MIB), sparse_size=64 * MIB,
                   sparse_data=MIB, meta_file=16 * MIB, many_files=100,
                   concurrent_file=16 * MIB, stat_files=1000, stat_depths=(1, 2, 5, 10),
                   big_dir_entries=2000, seq_file=64 * MIB, fio_seconds=2, untar_files=1500,
                   rm_files=500, rootfs_files=3000, packages=20, package_files=30),
    "full": Sizes(rounds=5, copyup=(4 * KIB, 64 * KIB, MIB, 16 * MIB, 64 * MIB, 512 * MIB),
                  sparse_size=GIB, sparse_data=MIB, meta_file=512 * MIB, many_files=1000,
                  concurrent_file=64 * MIB, stat_files=10000, stat_depths=(1, 2, 5, 10),
                  big_dir_entries=10000, seq_file=512 * MIB, fio_seconds=5, untar_files=None,
                  rm_files=2000, rootfs_files=5000, packages=40, package_files=50),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Copy-up cost and overhead of cowfs beside native ext4, kernel overlayfs "
                    "and fuse-overlayfs. Needs root (mounts, drop_caches).",
        epilog=f"targets: {', '.join(targets.NAMED_TARGETS)}, or cowfs:OPTS (cowfs mounted "
               f"with -o OPTS). Exit status: 0 all well, {EXIT_PROBLEMS} outputs written but a "
               f"check or workload failed, 2 bad arguments, {EXIT_INTERRUPTED} interrupted.")
    mode = parser.add_mutually_exclusive_group()
    for name, text in (("smoke", "tiny sizes: a test of the harness itself (<1 min)"),
                       ("quick", "small sizes, one round (about a minute; the default)"),
                       ("full", "the issue's sizes, 5 rounds (under ~30 min)")):
        mode.add_argument(f"--{name}", dest="mode", action="store_const", const=name,
                          help=text)
    parser.add_argument("--out", type=Path, help="where results go (default: "
                        "benchmarks/results/DATE-HOST for --full, else under "
                        "benchmarks/results/tmp/)")
    parser.add_argument("--work", type=Path, default=RESULTS / "tmp",
                        help="where layers and mounts are made; on a disk, not tmpfs "
                             "(default: %(default)s)")
    parser.add_argument("--targets", help="comma-separated (default: every available one; "
                        "cowfs-strict when this cowfs accepts -o fsync=strict)")
    parser.add_argument("--only", help="comma-separated workload key prefixes to run "
                        "(first_write,stat,...)")
    parser.add_argument("--rounds", type=int, help="override the mode's number of rounds")
    parser.add_argument("--fuse-overlayfs", metavar="PROGRAM",
                        default=shutil.which("fuse-overlayfs"),
                        help="the fuse-overlayfs program (default: found on PATH)")
    parser.add_argument("--keep", action="store_true", help="keep the layers afterwards")
    args = parser.parse_args(argv)
    args.mode = args.mode or "quick"
    return args


class Progress:
    """One line per step on stderr; on a terminal a single line rewritten in place."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()
        self.total = 0
        self.done = 0
        self.width = shutil.get_terminal_size().columns if self.tty else 0

    def _prefix(self) -> str:
        elapsed = time.monotonic() - self.start
        counter = f"{self.done}/{self.total} " if self.total else ""
        return f"[{counter}{elapsed:5.0f}s]"

    def note(self, text: str) -> None:
        """A line that stays (set-up steps, skipped targets, problems)."""
        clear = "\r\x1b[K" if self.tty else ""
        print(f"{clear}bench: {text}", file=sys.stderr, flush=True)

    def step(self, text: str) -> None:
        self.done += 1
        line = f"{self._prefix()} {text}"
        if self.tty:
            print(f"\r\x1b[K{line[:self.width - 1]}", end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.tty:
            print("\r\x1b[K", end="", file=sys.stderr, flush=True)


# ---- the machine

def _command_output(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False,
                                timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text and result.returncode == 0 else "unavailable"


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _fuse_overlayfs_version(program: str | None) -> str:
    """`fuse-overlayfs --version` prints fusermount's version first, then its own, then FUSE's."""
    if program is None:
        return "not installed"
    result = subprocess.run([program, "--version"], capture_output=True, text=True,
                            check=False)
    lines = [line.strip() for line in (result.stdout + result.stderr).splitlines()]
    own = [line for line in lines if line.startswith("fuse-overlayfs")]
    library = [line for line in lines if line.startswith("FUSE library")]
    return ", ".join(own + library) or "unknown"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def is_virtual() -> bool:
    return any(line.startswith("flags") and " hypervisor" in line
               for line in Path("/proc/cpuinfo").read_text().splitlines())


def filesystem_of(path: Path) -> dict[str, str]:
    """The mount *path* is on: type, source and options, from mountinfo."""
    resolved = os.path.realpath(path)
    best: dict[str, str] = {"type": "unknown"}
    best_length = -1
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            point = targets._decode_mountinfo_path(fields[4])
            inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
            if inside and len(point) > best_length:
                separator = fields.index("-")
                best = {"type": fields[separator + 1], "source": fields[separator + 2],
                        "options": fields[separator + 3], "mount point": point}
                best_length = len(point)
    return best


def describe_machine(tools: Tools, work: Path) -> dict[str, str]:
    memory_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text()
                      .splitlines() if line.startswith("MemTotal"))
    filesystem = filesystem_of(work)
    git = _command_output(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    return {
        "cpu": f"{_cpu_model()}, {os.cpu_count()} cores"
               + (" (virtual machine)" if is_virtual() else ""),
        "memory": f"{memory_kib / (1 << 20):.1f} GiB",
        "kernel": f"Linux {platform.release()} {platform.machine()}",
        "filesystem": f"{filesystem['type']} on {filesystem.get('source', '?')} "
                      f"({filesystem.get('options', '')}), layers under {work}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "pyfuse3": _package_version("pyfuse3"),
        "trio": _package_version("trio"),
        "libfuse": _command_output(["pkg-config", "--modversion", "fuse3"]),
        "fuse-overlayfs": _fuse_overlayfs_version(tools.fuse_overlayfs),
        "fio": _command_output(["fio", "--version"]) if shutil.which("fio")
               else "not installed",
        "cowfs": (_command_output([tools.cowfs, "--version"]) if tools.cowfs else "missing")
                 + f", git {git}",
    }


def default_out(mode: str, started: datetime.datetime) -> Path:
    host_kind = f"{'vm' if is_virtual() else 'host'}-{os.cpu_count()}cpu"
    if mode == "full":
        return RESULTS / f"{started:%Y-%m-%d}-{host_kind}"
    return RESULTS / "tmp" / f"{mode}-{started:%Y%m%d-%H%M%S}"


# ---- targets

def choose_targets(args: argparse.Namespace, tools: Tools, work: Path,
                   progress: Progress) -> tuple[list[Target], dict[str, str]]:
    """The targets to measure and, for the others, why not."""
    names = (args.targets.split(",") if args.targets
             else [*targets.DEFAULT_TARGETS, *targets.OPTIONAL_DEFAULT_TARGETS])
    chosen: list[Target] = []
    skipped: dict[str, str] = {}
    for name in dict.fromkeys(name.strip() for name in names if name.strip()):
        target = targets.parse_target(name)
        reason = targets.unavailable_reason(target, tools)
        if reason is None and target.kind == "cowfs" and target.options:
            reason = targets.probe_cowfs_options(target, tools, work)
            if reason and not args.targets:
                progress.note(f"{name} left out: this cowfs does not take "
                              f"-o {','.join(target.options)}")
                continue
        if reason:
            skipped[name] = reason
            progress.note(f"skipping {name}: {reason}")
        else:
            chosen.append(target)
    return chosen, skipped


# ---- the run

@dataclasses.dataclass
class Run:
    args: argparse.Namespace
    sizes: Sizes
    work: Path
    progress: Progress
    tools: Tools
    stacks: dict[str, Stack] = dataclasses.field(default_factory=dict)
    errors: list[str] = dataclasses.field(default_factory=list)
    cowfs_stats: dict[str, Any] = dataclasses.field(default_factory=dict)

    def build_layers(self) -> tuple[Path, int]:
        """The stacks (lowers and native copies) and the tarball, once for the whole run."""
        started = time.monotonic()
        layer_root = self.work / "layers"
        stacks = [layers.main_stack(self.sizes)]
        stacks += [layers.stat_stack(depth, self.sizes.stat_files)
                   for depth in self.sizes.stat_depths]
        stacks.append(layers.rootfs_stack(self.sizes))
        for stack in stacks:
            layers.build_stack(stack, layer_root)
            self.stacks[stack.name] = stack
        tarball = self.work / "stdlib.tar"
        tar_files = layers.make_tarball(tarball, self.sizes.untar_files)
        self.progress.note(f"built {len(stacks)} stacks and a tarball of {tar_files} files "
                           f"in {time.monotonic() - started:.1f} s")
        return tarball, tar_files

    def check_tree(self, target: Target) -> str | None:
        """Compare the merged view of every stack with the flattened tree; None if equal."""
        for stack in self.stacks.values():
            assert stack.native
            with targets.mounted(target, self.tools, stack.lowers, stack.native,
                                 self.work) as mount:
                problems = layers.compare_trees(layers.expected_tree(stack),
                                                layers.read_tree(mount.merged))
            if problems:
                return f"stack {stack.name}: " + "; ".join(problems)
        return None

    def measure(self, workload: Workload, target: Target, env: Env,
                round_index: int) -> dict[str, float] | None:
        stack = self.stacks[workload.stack]
        assert stack.native
        env.last_warmth = None
        try:
            with targets.mounted(target, self.tools, stack.lowers, stack.native,
                                 self.work) as mount:
                metrics = workload.run(mount, env)
                stats = mount.read_cowfs_stats()
        except Exception as exc:
            self.errors.append(f"round {round_index + 1}, {workload.key} on {target.name}: "
                               f"{type(exc).__name__}: {exc}")
            self.progress.note(f"error: {self.errors[-1]}")
            return None
        if stats is not None:
            self.cowfs_stats[f"{workload.key} on {target.name}"] = stats
            self.progress.note(f"{target.name} stats after {workload.key}: "
                               f"{json.dumps(stats, sort_keys=True)}")
        return metrics


def select_workloads(workloads: list[Workload], only: str | None, env: Env,
                     progress: Progress) -> list[Workload]:
    chosen = []
    prefixes = [prefix.strip() for prefix in only.split(",")] if only else []
    for workload in workloads:
        if prefixes and not any(workload.key.startswith(prefix) for prefix in prefixes):
            continue
        if workload.needs == "fio" and env.fio is None:
            progress.note(f"skipping {workload.key}: fio is not installed "
                          "(scripts/install.sh installs it)")
            continue
        chosen.append(workload)
    return chosen


def method_notes(sizes: Sizes, mode: str) -> list[str]:
    notes = [
        "every measurement on a fresh mount (fresh upper and workdir, new temporary "
        "directory); the lower layers are built once per run and never written",
        "rounds interleaved: in each round every workload runs on every target in turn, "
        "the order of targets rotated by one each round",
        "each measurement starts after sync; cold ones also after echo 3 > "
        "/proc/sys/vm/drop_caches (after mounting); warm ones after one untimed pass",
        "native copy-up rows are the floor: an in-kernel copy (copy_file_range, holes "
        "skipped) of the file into a new file on the same disk, then the same write",
        "native reads file data from the lower file itself (the same blocks the union "
        "targets read; on a VM a separate copy is colder in the host's cache), and walks "
        "directories in a flattened copy of the tree",
        "first write = open(O_WRONLY|O_APPEND), write 1 byte, close; kernel overlayfs "
        "fsyncs each copy-up unless mounted volatile",
        "metadata changes: chmod 600, chown 1000:1000, utime, setxattr user.bench; native "
        "changes the file in place (no copy) and is put back untimed",
        "stat = scandir + lstat of every entry of a tree whose every directory is in every "
        "layer; ls -f runs the ls command",
        "warm rows are checked warm (caches here are sometimes dropped from outside): a "
        "256 KiB canary file read after the untimed pass must still be wholly in the page "
        "cache (mincore) before and after the timed pass, /proc/vmstat's drop_pagecache, "
        "drop_slab, slabs_scanned, pgsteal and inodesteal counters must not move during it, "
        f"and on cowfs the daemon's request counters (trusted.cowfs.stats) must show no "
        f"readdir during a warm ls -f and at most one lookup + getattr per directory "
        f"plus {WARM_STAT_ALLOWED} during a warm stat walk; a pass found cold is timed again, "
        f"up to {WARM_ATTEMPTS} times in all, and if still cold its cell is marked 'not warm' "
        "(warm_checked in results.json)",
        "sequential write includes the fsync; fio: psync, one job, page cache on, cold start "
        "(caches dropped before, not between passes: --invalidate=0), mean latency per read",
        "untar: tar -xf into a directory of the lowers (natively: a new directory); "
        "rm -rf: a tree spread over 5 lowers (natively: a fresh copy of it)",
    ]
    if mode != "full":
        notes.append(f"{mode} mode: sizes shrunk (see the labels), {sizes.rounds} round(s)")
    return notes


def run(args: argparse.Namespace, work: Path, out: Path, progress: Progress) -> int:
    """The whole run; returns the exit status."""
    started = datetime.datetime.now()
    sizes = MODES[args.mode]
    if args.rounds:
        sizes = dataclasses.replace(sizes, rounds=args.rounds)
    fuse_overlayfs = args.fuse_overlayfs if args.fuse_overlayfs and os.access(
        args.fuse_overlayfs, os.X_OK) else None
    state = Run(args, sizes, work, progress, Tools(targets.find_cowfs(), fuse_overlayfs))
    filesystem = filesystem_of(work)
    if filesystem["type"] in ("tmpfs", "ramfs"):
        progress.note(f"warning: {work} is on {filesystem['type']}: use --work on a disk")
    chosen, skipped = choose_targets(args, state.tools, work, progress)
    if not chosen:
        progress.note("no target can run")
        return EXIT_PROBLEMS
    progress.note(f"{args.mode} mode, targets: {', '.join(t.name for t in chosen)}")
    tarball, tar_files = state.build_layers()
    snapshot = layers.snapshot_lowers(list(state.stacks.values()))
    tree_check: dict[str, str] = {}
    measured = []
    for target in chosen:
        problem = state.check_tree(target)
        tree_check[target.name] = f"FAILED: {problem}" if problem else "ok"
        progress.note(f"tree check {target.name}: {tree_check[target.name]}")
        if problem:
            skipped[target.name] = "tree check failed"
        else:
            measured.append(target)
    env = Env(sizes, shutil.which("fio"), tarball, layers.native_sources(state.stacks["main"]))
    workloads = select_workloads(all_workloads(sizes, tar_files), args.only, env, progress)
    rows: dict[tuple[str, str], report.Row] = {
        (workload.key, metric.name): report.Row(
            workload.key if metric.name == "time" else f"{workload.key}.{metric.name}",
            workload.label + metric.label, workload.group, metric.unit,
            workload.plot if metric.name == "time" else None)
        for workload in workloads for metric in workload.metrics}
    progress.total = sizes.rounds * len(workloads) * len(measured)
    for round_index in range(sizes.rounds):
        # Rotated each round: no target always runs first after a cache drop.
        shift = round_index % len(measured)
        order = measured[shift:] + measured[:shift]
        for workload in workloads:
            for target in order:
                metrics = state.measure(workload, target, env, round_index)
                warmth = env.last_warmth if metrics and workload.warm else None
                for metric in workload.metrics:
                    value = metrics.get(metric.name) if metrics else None
                    row = rows[workload.key, metric.name]
                    row.values.setdefault(target.name, []).append(value)
                    if workload.warm:
                        row.warmth.setdefault(target.name, []).append(warmth)
                if warmth and warmth.problems:
                    verdict = "warm" if warmth.warm else "NOT warm"
                    progress.note(f"{workload.key} on {target.name}, round {round_index + 1}: "
                                  f"{verdict} after {warmth.attempts} attempt(s): "
                                  + " | ".join(warmth.problems))
                shown = (report.format_value(metrics[workload.metrics[0].name],
                                             workload.metrics[0].unit)
                         if metrics else "error")
                progress.step(f"round {round_index + 1}/{sizes.rounds} {workload.key} "
                              f"{target.name}: {shown}")
    progress.finish()
    lowers_unchanged = layers.snapshot_lowers(list(state.stacks.values())) == snapshot
    if not env.can_drop_caches:
        state.errors.append("could not drop caches (not root?): cold rows are warm")
    results: dict[str, Any] = {
        "mode": args.mode, "started": f"{started:%Y-%m-%d %H:%M}", "rounds": sizes.rounds,
        "sizes": dataclasses.asdict(sizes), "machine": describe_machine(state.tools, work),
        "notes": method_notes(sizes, args.mode), "targets": [t.name for t in measured],
        "skipped_targets": skipped, "tree_check": tree_check, "tarball_files": tar_files,
        "cowfs_stats": state.cowfs_stats, "errors": state.errors,
        "lowers_unchanged": lowers_unchanged,
        "duration_s": (datetime.datetime.now() - started).total_seconds(),
    }
    for notice in report.write_all(results, list(rows.values()), out):
        progress.note(notice)
    progress.note(f"results in {out}/results.md ({results['duration_s']:.0f} s)")
    failed = (state.errors or not lowers_unchanged
              or any(outcome != "ok" for outcome in tree_check.values()))
    return EXIT_PROBLEMS if failed else 0


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    """SIGTERM/SIGHUP: leave through the finally blocks, which unmount everything."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = Progress()
    if os.geteuid() != 0:
        progress.note("warning: not root: only the native target runs, caches stay warm")
    started = datetime.datetime.now()
    out = (args.out or default_out(args.mode, started)).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.work)).resolve()
    atexit.register(targets.unmount_all_active)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    try:
        return run(args, work, out, progress)
    except ValueError as exc:
        progress.note(str(exc))
        return 2
    except KeyboardInterrupt:
        progress.note("interrupted; unmounting")
        return EXIT_INTERRUPTED
    finally:
        targets.unmount_all_active()
        if args.keep:
            progress.note(f"layers kept in {work}")
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(work)
