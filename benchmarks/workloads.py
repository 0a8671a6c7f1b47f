"""What is timed: copy-up cost and the general overhead of a union, one function each.

A workload gets a fresh mount and returns its metrics. On the native target a copy-up workload
times what a copy-up cannot beat: an in-kernel copy (`copy_file_range`, holes skipped) of the
file into a new file on the same disk, then the same write. Whatever a workload changes in the
native tree it puts back untimed, since the native tree is shared by all rounds.

Every measurement starts after `sync` (so earlier writes are not flushed inside it) and, unless
it is a warm one, after dropping the page, dentry and inode caches.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.layers import (
    DPKG,
    SPARSE_REL,
    Package,
    Sizes,
    base_status,
    compare_trees,
    copyup_rel,
    expected_tree,
    human_size,
    many_rel,
    package_plan,
    read_tree,
    rootfs_files,
    rootfs_stack,
    size_label,
    small_content,
    status_stanza,
    walk,
)
from benchmarks.residency import Canary, reclaim_between, reclaim_counters
from benchmarks.targets import Mounted

BLOCK_BYTES = 1 << 20
WARM_ATTEMPTS = 3      # a warm pass found cold is timed again, at most this many times in all
CONCURRENT_WRITERS = 4
now_ns = time.perf_counter_ns


class WorkloadError(Exception):
    """The workload ran but the filesystem gave a wrong result (not a timing problem)."""


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str          # s | us | KiB
    label: str = ""    # appended to the workload's label


TIME = Metric("time", "s")


@dataclass
class Env:
    """What workloads need besides the mount: sizes, tools, the tarball, cache control."""

    sizes: Sizes
    fio: str | None
    tarball: Path | None
    native_sources: dict[str, Path]   # natively, file data is read from the lower file
    can_drop_caches: bool = True
    last_warmth: Warmth | None = None   # set by a warm workload, read (and reset) by the runner

    def settle(self, *, cold: bool) -> None:
        """Flush earlier writes; for a cold measurement also drop every cache."""
        os.sync()
        if cold and self.can_drop_caches:
            try:
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
            except OSError:
                self.can_drop_caches = False


Run = Callable[[Mounted, Env], dict[str, float]]


@dataclass(frozen=True)
class Warmth:
    """Whether a warm measurement's timed pass was checked warm, after how many attempts."""

    warm: bool
    attempts: int
    problems: tuple[str, ...] = ()    # why each cold attempt was found cold


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    group: str                       # copy-up | overhead
    stack: str                       # the lower stack it runs over
    run: Run
    metrics: tuple[Metric, ...] = (TIME,)
    needs: str | None = None         # a tool that must exist ("fio")
    plot: tuple[str, float] | None = None   # (series, x) for the report's plots
    warm: bool = False               # its timed pass is checked to have run on warm caches


def seconds_since(start_ns: int) -> float:
    return (now_ns() - start_ns) / 1e9


# ---- helpers

def append_byte(path: Path) -> None:
    """The first write: open for append, write one byte, close."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)


def copy_in_kernel(source: Path, target: Path) -> None:
    """Copy with copy_file_range, extent by extent (SEEK_DATA/SEEK_HOLE): the native floor."""
    source_fd = os.open(source, os.O_RDONLY)
    try:
        target_fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            size = os.fstat(source_fd).st_size
            offset = 0
            while offset < size:
                try:
                    start = os.lseek(source_fd, offset, os.SEEK_DATA)
                except OSError:
                    break          # ENXIO: only a hole is left
                end = os.lseek(source_fd, start, os.SEEK_HOLE)
                while start < end:
                    copied = os.copy_file_range(source_fd, target_fd, end - start, start, start)
                    if copied == 0:
                        break
                    start += copied
                offset = end
            os.ftruncate(target_fd, size)
        finally:
            os.close(target_fd)
    finally:
        os.close(source_fd)


def expect_size(path: Path, size: int) -> None:
    actual = os.stat(path).st_size
    if actual != size:
        raise WorkloadError(f"{path.name} is {actual} bytes after the write, not {size}")


def data_path(mount: Mounted, env: Env, rel: str) -> Path:
    """Where *rel*'s data is read: the merged file, or natively the lower file itself."""
    return env.native_sources[rel] if mount.target.is_native else mount.merged / rel


def first_write_target(mount: Mounted, env: Env, rel: str) -> Path:
    """Where the first write goes: the merged file, or natively a fresh in-kernel copy."""
    if not mount.target.is_native:
        return mount.merged / rel
    copy = mount.scratch / Path(rel).name
    copy_in_kernel(data_path(mount, env, rel), copy)
    return copy


def upper_path(mount: Mounted, rel: str) -> Path:
    if mount.upper is None:
        return mount.scratch / Path(rel).name
    return mount.upper / rel


# ---- copy-up

def first_write(size: int) -> Run:
    def run(mount: Mounted, env: Env) -> dict[str, float]:
        rel = copyup_rel(size)
        env.settle(cold=True)
        start = now_ns()
        append_byte(first_write_target(mount, env, rel))
        elapsed = seconds_since(start)
        expect_size(mount.merged / rel if mount.upper else mount.scratch / Path(rel).name,
                    size + 1)
        return {"time": elapsed}
    return run


def first_write_sparse(mount: Mounted, env: Env) -> dict[str, float]:
    env.settle(cold=True)
    start = now_ns()
    append_byte(first_write_target(mount, env, SPARSE_REL))
    elapsed = seconds_since(start)
    upper = upper_path(mount, SPARSE_REL)
    return {"time": elapsed, "upper_kib": os.stat(upper).st_blocks * 512 / 1024}


def _chmod(path: Path) -> Callable[[], None]:
    mode = os.stat(path).st_mode & 0o7777
    os.chmod(path, 0o600)
    return lambda: os.chmod(path, mode)


def _chown(path: Path) -> Callable[[], None]:
    st = os.stat(path)
    os.chown(path, 1000, 1000)
    return lambda: os.chown(path, st.st_uid, st.st_gid)


def _utime(path: Path) -> Callable[[], None]:
    st = os.stat(path)
    os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    return lambda: os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _setxattr(path: Path) -> Callable[[], None]:
    os.setxattr(path, "user.bench", b"1")
    return lambda: os.removexattr(path, "user.bench")


METADATA_CHANGES: dict[str, Callable[[Path], Callable[[], None]]] = {
    "chmod": _chmod, "chown": _chown, "utime": _utime, "setxattr": _setxattr,
}


def metadata_change(name: str, size: int) -> Run:
    """A metadata change that copies up (the first change to a lower file); returns an undo."""
    change = METADATA_CHANGES[name]

    def run(mount: Mounted, env: Env) -> dict[str, float]:
        path = mount.merged / copyup_rel(size)
        env.settle(cold=True)
        start = now_ns()
        undo = change(path)
        elapsed = seconds_since(start)
        if mount.target.is_native:
            undo()
        return {"time": elapsed, "upper_kib": _upper_kib(mount, copyup_rel(size))}
    return run


def _upper_kib(mount: Mounted, rel: str) -> float:
    if mount.upper is None:
        return 0.0
    return os.stat(mount.upper / rel).st_blocks * 512 / 1024


def many_copy_ups(mount: Mounted, env: Env) -> dict[str, float]:
    """The first write to each of many 4 KiB lower files; per-file latency."""
    latencies = []
    env.settle(cold=True)
    for index in range(env.sizes.many_files):
        rel = many_rel(index)
        start = now_ns()
        if mount.target.is_native:
            copy = mount.scratch / f"f{index}"
            copy_in_kernel(data_path(mount, env, rel), copy)
            append_byte(copy)
        else:
            append_byte(mount.merged / rel)
        latencies.append(seconds_since(start))
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    return {"time": sum(latencies), "p50": statistics.median(latencies), "p99": p99}


def concurrent_writers(mount: Mounted, env: Env) -> dict[str, float]:
    """Four threads open the same lower file for append at once: one copy-up, four writes."""
    size = env.sizes.concurrent_file
    rel = copyup_rel(size)
    env.settle(cold=True)
    barrier = threading.Barrier(CONCURRENT_WRITERS + 1)
    errors: list[BaseException] = []
    start = now_ns()
    path = first_write_target(mount, env, rel)

    def writer() -> None:
        barrier.wait()
        try:
            append_byte(path)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(CONCURRENT_WRITERS)]
    for thread in threads:
        thread.start()
    barrier.wait()
    for thread in threads:
        thread.join()
    elapsed = seconds_since(start)
    if errors:
        raise WorkloadError(f"a writer failed: {errors[0]}")
    expect_size(path, size + CONCURRENT_WRITERS)
    return {"time": elapsed}


# ---- warm passes

@dataclass(frozen=True)
class CacheState:
    """What shows whether caches were dropped: the canary, the kernel's reclaim counters and,
    on cowfs, the requests the daemon has served."""

    canary_resident: bool
    reclaim: dict[str, int]
    requests: dict[str, int] | None

    @classmethod
    def take(cls, mount: Mounted, canary: Canary) -> CacheState:
        stats = mount.read_cowfs_stats()
        requests = stats.get("requests") if stats else None
        return cls(canary.still_warm(), reclaim_counters(),
                   dict(requests) if isinstance(requests, dict) else None)


def cold_signs(before: CacheState, after: CacheState, cold_requests: tuple[str, ...],
               allowed_requests: int) -> list[str]:
    """Why a pass between *before* and *after* did not run warm; empty if it did."""
    signs = []
    if not before.canary_resident:
        signs.append("canary not resident before the pass")
    if not after.canary_resident:
        signs.append("canary evicted during the pass")
    if moved := reclaim_between(before.reclaim, after.reclaim):
        signs.append("kernel dropped or reclaimed caches: "
                     + ", ".join(f"{name} +{count}" for name, count in sorted(moved.items())))
    if before.requests is not None and after.requests is not None:
        served = {name: after.requests.get(name, 0) - before.requests.get(name, 0)
                  for name in cold_requests}
        if sum(served.values()) > allowed_requests:
            signs.append("cowfs served " + ", ".join(f"{count} {name}"
                                                     for name, count in served.items() if count))
    return signs


def time_pass(mount: Mounted, env: Env, pass_once: Callable[[], int], *, cold: bool,
              cold_requests: tuple[str, ...], allowed_requests: int) -> tuple[float, int]:
    """Time *pass_once* with every cache dropped, or warm (`time_warm`)."""
    if not cold:
        return time_warm(mount, env, pass_once, cold_requests, allowed_requests)
    env.settle(cold=True)
    start = now_ns()
    result = pass_once()
    return seconds_since(start), result


def time_warm(mount: Mounted, env: Env, pass_once: Callable[[], int],
              cold_requests: tuple[str, ...], allowed_requests: int) -> tuple[float, int]:
    """Time *pass_once* after an untimed pass, checked warm; retried if found cold.

    Returns the time and the pass's result, and leaves a Warmth in env.last_warmth.
    """
    canary = Canary(mount.scratch / "warm-canary")
    problems: list[str] = []
    for attempt in range(1, WARM_ATTEMPTS + 1):
        pass_once()
        canary.warm()
        env.settle(cold=False)
        before = CacheState.take(mount, canary)
        start = now_ns()
        result = pass_once()
        elapsed = seconds_since(start)
        signs = cold_signs(before, CacheState.take(mount, canary), cold_requests,
                           allowed_requests)
        if not signs:
            env.last_warmth = Warmth(True, attempt, tuple(problems))
            return elapsed, result
        problems.append(f"attempt {attempt}: {'; '.join(signs)}")
    env.last_warmth = Warmth(False, WARM_ATTEMPTS, tuple(problems))
    return elapsed, result


# ---- overhead

# A warm walk finds every name and attribute in the kernel's caches: lookups or getattrs
# reaching cowfs by the hundred mean they were dropped. Allowed: one per directory (a first warm
# pass asks for each listed directory's attributes again) and a few more.
WARM_STAT_REQUESTS = ("lookup", "getattr")
WARM_STAT_ALLOWED = 5
# A warm ls -f reads the listing the kernel cached: a readdir reaching cowfs means it was dropped.
WARM_LS_REQUESTS = ("readdir",)


def stat_tree(*, cold: bool, expected: int) -> Run:
    """lstat every entry of the tree (what find -ls, ls -lR, a backup do)."""
    def walk_and_stat(root: Path) -> int:
        count = 0
        for _, entry in walk(root):
            entry.stat(follow_symlinks=False)
            count += 1
        return count

    def run(mount: Mounted, env: Env) -> dict[str, float]:
        root = mount.merged / "tree"
        directories = max(1, env.sizes.stat_files // 100) + 1
        elapsed, count = time_pass(mount, env, lambda: walk_and_stat(root), cold=cold,
                                   cold_requests=WARM_STAT_REQUESTS,
                                   allowed_requests=directories + WARM_STAT_ALLOWED)
        if count != expected:
            raise WorkloadError(f"the walk saw {count} entries, not {expected}")
        return {"time": elapsed}
    return run


def list_big_dir(*, cold: bool) -> Run:
    def list_once(directory: Path) -> int:
        result = subprocess.run(["ls", "-f", str(directory)], stdout=subprocess.PIPE,
                                check=True)
        return result.stdout.count(b"\n")

    def run(mount: Mounted, env: Env) -> dict[str, float]:
        directory = mount.merged / "big"
        elapsed, lines = time_pass(mount, env, lambda: list_once(directory), cold=cold,
                                   cold_requests=WARM_LS_REQUESTS, allowed_requests=0)
        if lines != env.sizes.big_dir_entries + 2:
            raise WorkloadError(f"ls -f listed {lines} names, not {env.sizes.big_dir_entries + 2}")
        return {"time": elapsed}
    return run


def sequential_read(mount: Mounted, env: Env) -> dict[str, float]:
    path = data_path(mount, env, copyup_rel(env.sizes.seq_file))
    buffer = bytearray(BLOCK_BYTES)
    env.settle(cold=True)
    start = now_ns()
    total = 0
    with open(path, "rb", buffering=0) as file:
        while count := file.readinto(buffer):
            total += count
    elapsed = seconds_since(start)
    if total != env.sizes.seq_file:
        raise WorkloadError(f"read {total} bytes, not {env.sizes.seq_file}")
    return {"time": elapsed}


def sequential_write(mount: Mounted, env: Env) -> dict[str, float]:
    """A new file, 1 MiB writes, fsync included (else only the page cache is measured)."""
    directory = mount.scratch if mount.target.is_native else mount.merged
    block = os.urandom(BLOCK_BYTES)
    env.settle(cold=True)
    start = now_ns()
    fd = os.open(directory / "seqwrite.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for _ in range(env.sizes.seq_file // BLOCK_BYTES):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"time": seconds_since(start)}


def fio_random_reads(mount: Mounted, env: Env) -> dict[str, float]:
    """fio, 4 KiB random reads (psync, one job) of a lower file for a fixed time."""
    assert env.fio
    rel = copyup_rel(env.sizes.seq_file)
    env.settle(cold=True)
    result = subprocess.run(
        [env.fio, "--name=randread", f"--filename={data_path(mount, env, rel)}", "--rw=randread",
         "--bs=4k", f"--size={env.sizes.seq_file}", "--ioengine=psync", "--invalidate=0",
         "--time_based", f"--runtime={round(env.sizes.fio_seconds * 1000)}ms",
         "--output-format=json"],
        capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise WorkloadError(f"fio failed: {result.stderr.strip()[-200:]}")
    read = json.loads(result.stdout[result.stdout.index("{"):])["jobs"][0]["read"]
    if mount.upper is not None and (mount.upper / rel).exists():
        raise WorkloadError("fio's reads copied the file up")
    return {"read_us": read["lat_ns"]["mean"] / 1000}


def untar(mount: Mounted, env: Env) -> dict[str, float]:
    assert env.tarball
    directory = mount.scratch / "untar" if mount.target.is_native else mount.merged / "untar"
    directory.mkdir(exist_ok=True)
    env.settle(cold=True)
    start = now_ns()
    subprocess.run(["tar", "-xf", str(env.tarball), "-C", str(directory)], check=True)
    return {"time": seconds_since(start)}


def remove_tree(mount: Mounted, env: Env) -> dict[str, float]:
    """rm -rf of a tree in the lowers (whiteouts), natively of a fresh copy of the same tree."""
    if mount.target.is_native:
        tree = mount.scratch / "rmtree"
        shutil.copytree(mount.merged / "rmtree", tree, symlinks=True)
    else:
        tree = mount.merged / "rmtree"
    env.settle(cold=True)
    start = now_ns()
    subprocess.run(["rm", "-rf", str(tree)], check=True)
    elapsed = seconds_since(start)
    if tree.exists():
        raise WorkloadError("rm -rf left the tree")
    return {"time": elapsed}


# ---- a package manager's install

def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def install_package(root: Path, package: Package) -> None:
    """What dpkg does to the filesystem: unpack each file as .dpkg-new with an fsync, rename
    them over their names, links, the file list, the status database, then the removals."""
    for directory in package.new_dirs:
        (root / directory).mkdir()
    for rel, size in package.files:
        _write_synced(root / f"{rel}.dpkg-new", package.content(rel, size))
    for rel, _ in package.files:
        os.rename(root / f"{rel}.dpkg-new", root / rel)
    for existing, link in package.hard_links:
        os.link(root / existing, root / link)
    for link, target in package.symlinks:
        os.symlink(target, root / f"{link}.dpkg-new")
        os.rename(root / f"{link}.dpkg-new", root / link)
    listing = "".join(f"/{rel}\n" for rel, _ in package.files).encode()
    _write_synced(root / f"{package.list_rel}-new", listing)
    os.rename(root / f"{package.list_rel}-new", root / package.list_rel)
    dpkg = root / DPKG
    status = (dpkg / "status").read_bytes() + status_stanza(package.name, len(package.files))
    _write_synced(dpkg / "status-new", status)
    (dpkg / "status-old").unlink(missing_ok=True)
    os.link(dpkg / "status", dpkg / "status-old")
    os.rename(dpkg / "status-new", dpkg / "status")
    for rel in package.removed:
        (root / rel).unlink()


def verify_install(root: Path, plan: list[Package], rootfs_file_count: int) -> None:
    """Every file installed with its content, links linked, removals gone, the database right."""
    def expect(rel: str, data: bytes) -> None:
        try:
            actual = (root / rel).read_bytes()
        except OSError as exc:
            raise WorkloadError(f"after the install, {rel}: {exc.strerror}") from None
        if actual != data:
            raise WorkloadError(f"after the install, {rel} has {len(actual)} wrong bytes")

    status = base_status(rootfs_file_count)
    previous = status
    for package in plan:
        for rel, size in package.files:
            expect(rel, package.content(rel, size))
            if os.path.lexists(root / f"{rel}.dpkg-new"):
                raise WorkloadError(f"{rel}.dpkg-new left behind")
        for existing, link in package.hard_links:
            if not os.path.samefile(root / existing, root / link):
                raise WorkloadError(f"{link} is not a hard link of {existing}")
        for link, target in package.symlinks:
            if os.readlink(root / link) != target:
                raise WorkloadError(f"{link} points to {os.readlink(root / link)}")
        for rel in package.removed:
            if os.path.lexists(root / rel):
                raise WorkloadError(f"{rel} was removed but is still there")
        expect(package.list_rel, "".join(f"/{rel}\n" for rel, _ in package.files).encode())
        previous = status
        status += status_stanza(package.name, len(package.files))
    expect(f"{DPKG}/status", status)
    expect(f"{DPKG}/status-old", previous)
    if os.path.lexists(root / DPKG / "status-new"):
        raise WorkloadError("status-new left behind")


def uninstall_natively(root: Path, plan: list[Package], sizes: Sizes) -> None:
    """Put the native rootfs back as it was (untimed), and prove it with the tree check."""
    original = dict(rootfs_files(sizes.rootfs_files))
    for package in plan:
        for rel, _ in package.files:
            if rel not in package.replaced:
                (root / rel).unlink(missing_ok=True)
        for _, link in package.hard_links:
            (root / link).unlink(missing_ok=True)
        for link, _ in package.symlinks:
            (root / link).unlink(missing_ok=True)
        (root / package.list_rel).unlink(missing_ok=True)
        for directory in reversed(package.new_dirs):
            shutil.rmtree(root / directory, ignore_errors=True)
        for rel in (*package.replaced, *package.removed):
            (root / rel).write_bytes(small_content(rel, original[rel]))
    status = base_status(sizes.rootfs_files)
    for name in ("status", "status-old"):
        (root / DPKG / name).unlink(missing_ok=True)
        (root / DPKG / name).write_bytes(status)
    problems = compare_trees(expected_tree(rootfs_stack(sizes)), read_tree(root))
    if problems:
        raise WorkloadError("the native rootfs was not put back: " + "; ".join(problems))


def package_install(plan: list[Package]) -> Run:
    """Install every package of *plan* into the rootfs, cold, as one timed run."""
    def run(mount: Mounted, env: Env) -> dict[str, float]:
        env.settle(cold=True)
        start = now_ns()
        for package in plan:
            install_package(mount.merged, package)
        os.sync()      # what dpkg leaves unsynced (directories, links) reaches the disk too
        elapsed = seconds_since(start)
        try:
            verify_install(mount.merged, plan, env.sizes.rootfs_files)
        finally:
            if mount.target.is_native:
                uninstall_natively(mount.merged, plan, env.sizes)
        return {"time": elapsed}
    return run


# ---- the list

def all_workloads(sizes: Sizes, tar_files: int) -> list[Workload]:
    """Every workload for *sizes*, in the order they run within a round."""
    workloads = [
        Workload(f"first_write.{size_label(size)}",
                 f"first write, {human_size(size)} lower file", "copy-up", "main",
                 first_write(size), plot=("copy-up", size))
        for size in sizes.copyup
    ]
    workloads.append(Workload(
        "first_write.sparse", f"first write, {human_size(sizes.sparse_size)} sparse file "
        f"({human_size(sizes.sparse_data)} data)", "copy-up", "main", first_write_sparse,
        (TIME, Metric("upper_kib", "KiB", ": KiB allocated in upper"))))
    workloads += [
        Workload(f"{name}.{size_label(sizes.meta_file)}",
                 f"{name}, {human_size(sizes.meta_file)} lower file", "copy-up", "main",
                 metadata_change(name, sizes.meta_file),
                 (TIME, Metric("upper_kib", "KiB", ": KiB allocated in upper")))
        for name in METADATA_CHANGES
    ]
    workloads.append(Workload(
        "many_copy_ups", f"{sizes.many_files} copy-ups of 4 KiB files", "copy-up", "main",
        many_copy_ups,
        (Metric("time", "s", ": total"), Metric("p50", "s", ": p50 per file"),
         Metric("p99", "s", ": p99 per file"))))
    workloads.append(Workload(
        "concurrent_writers", f"{CONCURRENT_WRITERS} concurrent writers, "
        f"{human_size(sizes.concurrent_file)} lower file", "copy-up", "main",
        concurrent_writers))
    for depth in sizes.stat_depths:
        for cold in (True, False):
            temperature = "cold" if cold else "warm"
            workloads.append(Workload(
                f"stat.{depth}.{temperature}",
                f"stat {sizes.stat_files} files, {depth} lower{'s' if depth > 1 else ''}, "
                f"{temperature}", "overhead", f"stat{depth}",
                stat_tree(cold=cold, expected=sizes.stat_files + max(1, sizes.stat_files // 100)),
                plot=(f"stat-{temperature}", depth), warm=not cold))
    for cold in (True, False):
        temperature = "cold" if cold else "warm"
        workloads.append(Workload(
            f"ls.{temperature}", f"ls -f of {sizes.big_dir_entries} entries, 5 lowers, "
            f"{temperature}", "overhead", "main", list_big_dir(cold=cold), warm=not cold))
    label = human_size(sizes.seq_file)
    workloads += [
        Workload("seq_read", f"sequential read, {label}", "overhead", "main", sequential_read),
        Workload("seq_write", f"sequential write + fsync, {label}", "overhead", "main",
                 sequential_write),
        Workload("fio_randread", f"fio 4k random reads, {label} file, "
                 f"{sizes.fio_seconds:g} s", "overhead", "main", fio_random_reads,
                 (Metric("read_us", "us", ": mean latency per read"),),
                 needs="fio"),
        Workload("untar", f"untar of the Python stdlib, {tar_files} files", "overhead", "main",
                 untar),
        Workload("rm_rf", f"rm -rf of a lower tree, {sizes.rm_files} files", "overhead", "main",
                 remove_tree),
    ]
    plan = package_plan(sizes)
    installed = sum(len(package.files) + 1 for package in plan)    # + each file list
    workloads.append(Workload(
        "pkg_install", f"package install (dpkg-like): {len(plan)} packages, {installed} files",
        "real workload", "rootfs", package_install(plan)))
    return workloads
