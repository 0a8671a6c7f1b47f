"""The lower layers every target is measured over, built once per run, and the tree check.

Each stack is a list of lower directories (topmost first) plus the flattened tree it must show:
that tree is also written out as the native target's directory, and every target's merged view
is compared with it before anything is timed. The lowers are never written afterwards; a
snapshot taken here proves at the end that no copy-up wrote to them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import sysconfig
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HASHED_MAX_BYTES = 64 * 1024   # content is compared for files up to this size
BLOCK_BYTES = 1 << 20
MAIN_LOWERS = 5
OPAQUE_XATTR = "trusted.overlay.opaque"


@dataclass(frozen=True)
class Sizes:
    """How big each workload is: the modes (smoke, quick, full) differ only here."""

    rounds: int
    copyup: tuple[int, ...]          # first write to lower files of these sizes
    sparse_size: int
    sparse_data: int
    meta_file: int                   # chmod, chown, utime, setxattr on a lower file this big
    many_files: int                  # copy-ups of 4 KiB files, one after the other
    concurrent_file: int             # 4 writers to one lower file this big
    stat_files: int
    stat_depths: tuple[int, ...]
    big_dir_entries: int
    seq_file: int                    # sequential read (a lower file) and write (a new file)
    fio_seconds: float
    untar_files: int | None          # None: the whole standard library
    rm_files: int
    rootfs_files: int                # the rootfs packages are installed into
    packages: int                    # packages installed, dpkg-like
    package_files: int               # files each package unpacks

    def lower_files(self) -> set[int]:
        return {*self.copyup, self.meta_file, self.concurrent_file, self.seq_file}


@dataclass(frozen=True)
class FileSpec:
    """A file (or symlink, whiteout, directory) in one lower layer."""

    rel: str
    layer: int
    kind: str = "file"        # file | sparse | symlink | whiteout | dir | opaque-dir
    size: int = 0
    data: bytes = b""         # small files: the content; symlinks: the target
    sparse_data: int = 0      # sparse files: bytes of data in the middle

    def content_hash(self) -> str | None:
        if self.kind == "file" and 0 < self.size <= HASHED_MAX_BYTES:
            return hashlib.sha256(self.data).hexdigest()
        return None


@dataclass
class Stack:
    """Lower layers (index 0 on top) and the flattened tree they must show."""

    name: str
    layers: int
    specs: list[FileSpec] = field(default_factory=list)   # everything written to the lowers
    visible: list[FileSpec] = field(default_factory=list)  # what the merged view shows
    lowers: list[Path] = field(default_factory=list)
    native: Path | None = None

    def add(self, spec: FileSpec, *, visible: bool = True) -> None:
        self.specs.append(spec)
        if visible:
            self.visible.append(spec)


def small_content(rel: str, size: int) -> bytes:
    seed = hashlib.sha256(rel.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def size_label(size: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


def human_size(size: int) -> str:
    """4 KiB, 512 MiB, 1 GiB: for labels."""
    label = size_label(size)
    return f"{label[:-1]} {label[-1]}iB" if label[-1] in "KMG" else f"{size} B"


def copyup_rel(size: int) -> str:
    return f"copyup/f-{size_label(size)}"


SPARSE_REL = "copyup/sparse"


# ---- building

def _write_big(path: Path, size: int) -> None:
    block = hashlib.sha256(path.name.encode()).digest() * (BLOCK_BYTES // 32)
    with open(path, "wb") as file:
        remaining = size
        while remaining:
            chunk = min(remaining, BLOCK_BYTES)
            file.write(block[:chunk])
            remaining -= chunk


def _write_sparse(path: Path, size: int, data_bytes: int) -> None:
    with open(path, "wb") as file:
        file.truncate(size)
        if data_bytes:
            file.seek(size // 4)
            file.write(small_content(path.name, BLOCK_BYTES) * (data_bytes // BLOCK_BYTES)
                       or small_content(path.name, data_bytes))


def write_spec(root: Path, spec: FileSpec) -> None:
    """Write *spec* under *root*, making its parent directories."""
    path = root / spec.rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if spec.kind in ("dir", "opaque-dir"):
        path.mkdir(exist_ok=True)
        if spec.kind == "opaque-dir":
            os.setxattr(path, OPAQUE_XATTR, b"y")
    elif spec.kind == "symlink":
        os.symlink(spec.data, path)
    elif spec.kind == "whiteout":
        os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
    elif spec.kind == "sparse":
        _write_sparse(path, spec.size, spec.sparse_data)
    elif spec.size > HASHED_MAX_BYTES:
        _write_big(path, spec.size)
    else:
        path.write_bytes(spec.data)


def build_stack(stack: Stack, root: Path) -> None:
    """Write the lowers and the native (flattened) copy of *stack* under *root*."""
    stack.lowers = [root / stack.name / f"l{index}" for index in range(stack.layers)]
    for lower in stack.lowers:
        lower.mkdir(parents=True)
    for spec in stack.specs:
        write_spec(stack.lowers[spec.layer], spec)
    stack.native = root / f"native-{stack.name}"
    stack.native.mkdir(parents=True)
    for spec in stack.visible:
        flat = spec if spec.kind != "opaque-dir" else FileSpec(spec.rel, 0, "dir")
        if spec.kind in ("file", "sparse") and spec.size > HASHED_MAX_BYTES:
            # Native reads the lower file itself (see native_source); this is a stand-in.
            flat = FileSpec(spec.rel, 0, "sparse", spec.size, sparse_data=0)
        write_spec(stack.native, flat)


def native_sources(stack: Stack) -> dict[str, Path]:
    """For each visible regular file, the lower file that provides it.

    The native target reads file data from there: the very blocks the union targets read. On a
    virtual machine the host caches the guest's disk, and a separate native copy, read once a
    round where the lower file is read by every union target, was measured colder there
    (cold sequential reads 4x slower than through overlayfs).
    """
    return {spec.rel: stack.lowers[spec.layer] / spec.rel for spec in stack.visible
            if spec.kind in ("file", "sparse")}


def add_file(stack: Stack, rel: str, layer: int, size: int, *, visible: bool = True) -> None:
    data = small_content(rel, size) if size <= HASHED_MAX_BYTES else b""
    stack.add(FileSpec(rel, layer, "file", size, data), visible=visible)


def main_stack(sizes: Sizes) -> Stack:
    """Five lowers: copy-up files, a big directory, trees to delete, union semantics."""
    stack = Stack("main", MAIN_LOWERS)
    bottom = MAIN_LOWERS - 1
    for size in sorted(sizes.lower_files()):
        add_file(stack, copyup_rel(size), bottom, size)
    stack.add(FileSpec(SPARSE_REL, bottom, "sparse", sizes.sparse_size,
                       sparse_data=sizes.sparse_data))
    for index in range(sizes.many_files):
        add_file(stack, many_rel(index), index % MAIN_LOWERS, 4096)
    for index in range(sizes.big_dir_entries):
        add_file(stack, f"big/e{index:05d}", index % MAIN_LOWERS, 0)
    for index in range(sizes.rm_files):
        add_file(stack, f"rmtree/d{index // 50:03d}/f{index:05d}", index % MAIN_LOWERS,
                 index % 3000)
    stack.add(FileSpec("untar", 2, "dir"))
    _add_semantics(stack)
    return stack


def many_rel(index: int) -> str:
    return f"many/d{index // 100:03d}/f{index:05d}"


def _add_semantics(stack: Stack) -> None:
    """A shadowed file, a whiteout, an opaque directory, a symlink: the check sees the union."""
    add_file(stack, "semantics/shadow.txt", 0, 3)
    add_file(stack, "semantics/shadow.txt", 2, 200, visible=False)
    add_file(stack, "semantics/gone/keep.txt", 3, 10)
    add_file(stack, "semantics/gone/x.txt", 3, 10, visible=False)
    stack.add(FileSpec("semantics/gone/x.txt", 1, "whiteout"), visible=False)
    stack.add(FileSpec("semantics/opaque", 0, "opaque-dir"))
    add_file(stack, "semantics/opaque/visible.txt", 0, 5)
    add_file(stack, "semantics/opaque/hidden.txt", 2, 5, visible=False)
    stack.add(FileSpec("semantics/link", 1, "symlink", data=b"shadow.txt"))


def stat_stack(depth: int, files: int) -> Stack:
    """*files* small files in 100-file directories; each directory is in every layer."""
    stack = Stack(f"stat{depth}", depth)
    directories = max(1, files // 100)
    for layer in range(depth):
        for directory in range(directories):
            stack.add(FileSpec(f"tree/d{directory:03d}", layer, "dir"), visible=layer == 0)
    for index in range(files):
        add_file(stack, f"tree/d{index % directories:03d}/f{index:05d}", index % depth,
                 index % 65)
    return stack


# ---- the rootfs a package manager installs into

ROOTFS_LOWERS = 2
ROOTFS_DIRS = ("usr/bin", "usr/lib/x86_64-linux-gnu", "usr/share/doc", "etc")
# Small files as in a distribution's packages: many tiny ones, some of a few pages, few at 64 KiB.
PACKAGE_FILE_SIZES = (0, 37, 190, 512, 1300, 2900, 4096, 7000, 12000, 24000, 40000, 65536)
DPKG = "var/lib/dpkg"
BASE_STATUS_STANZAS = 150


def _pick(text: str, choices: tuple[int, ...]) -> int:
    """A deterministic choice by *text*'s hash (no random state shared between modes)."""
    return choices[hashlib.sha256(text.encode()).digest()[0] % len(choices)]


def rootfs_files(count: int) -> list[tuple[str, int]]:
    """The rootfs's files (path, size), spread over a few system directories."""
    files = []
    for index in range(count):
        directory = ROOTFS_DIRS[index % len(ROOTFS_DIRS)]
        if directory == "usr/share/doc":
            directory = f"usr/share/doc/base{index // 40:03d}"
        rel = f"{directory}/base{index:05d}"
        files.append((rel, _pick(rel, PACKAGE_FILE_SIZES)))
    return files


def status_stanza(name: str, files: int) -> bytes:
    """One package's entry in dpkg's status database."""
    return (f"Package: {name}\nStatus: install ok installed\nPriority: optional\n"
            f"Section: misc\nInstalled-Size: {files * 4}\nMaintainer: Bench <bench@example.org>\n"
            f"Architecture: amd64\nVersion: 1.0-{files}\n"
            f"Description: synthetic package {name}\n\n").encode()


def base_status(rootfs_file_count: int) -> bytes:
    """The status database the rootfs ships (kept under HASHED_MAX_BYTES: its content is
    compared by the tree check)."""
    stanzas = min(BASE_STATUS_STANZAS, max(1, rootfs_file_count // 20))
    return b"".join(status_stanza(f"base{index:03d}", 20) for index in range(stanzas))


@dataclass(frozen=True)
class Package:
    """What installing one package does to the rootfs."""

    name: str
    files: tuple[tuple[str, int], ...]     # (path, size) unpacked, each as path.dpkg-new
    replaced: frozenset[str]               # of those, the ones over rootfs files
    new_dirs: tuple[str, ...]              # directories it creates (parents first)
    hard_links: tuple[tuple[str, str], ...]   # (existing path, new link)
    symlinks: tuple[tuple[str, str], ...]     # (link path, target)
    removed: tuple[str, ...]               # rootfs files it deletes (whiteouts in a union)

    def content(self, rel: str, size: int) -> bytes:
        """The package's version of *rel*: never the rootfs's, so a missed rename shows."""
        return small_content(f"{self.name}/{rel}", size)

    @property
    def list_rel(self) -> str:
        return f"{DPKG}/info/{self.name}.list"


def package_plan(sizes: Sizes) -> list[Package]:
    """The packages to install, deterministic: every fourth file replaces a rootfs file,
    half the rest go to existing directories and half to the package's own new ones."""
    rootfs = rootfs_files(sizes.rootfs_files)
    # Rootfs files, each used once: replaced ones from the front, removed ones from the back.
    replaceable = iter(rootfs[::3])
    removable = iter(reversed(rootfs[1::3]))
    linkable = iter(rootfs[2::3])
    packages = []
    for number in range(sizes.packages):
        name = f"pkg{number:03d}"
        own = f"usr/share/{name}"
        files: list[tuple[str, int]] = []
        replaced = set()
        for index in range(sizes.package_files):
            if index % 4 == 0 and (spare := next(replaceable, None)):
                rel, size = spare[0], _pick(f"{name}/{index}", PACKAGE_FILE_SIZES)
                replaced.add(rel)
            elif index % 2:
                directory = ROOTFS_DIRS[index % len(ROOTFS_DIRS)]
                rel = f"{directory}/{name}-{index:03d}"
                size = _pick(rel, PACKAGE_FILE_SIZES)
            else:
                rel = f"{own}/{'data/' if index % 3 else ''}{name}-{index:03d}"
                size = _pick(rel, PACKAGE_FILE_SIZES)
            files.append((rel, size))
        new_files = [rel for rel, _ in files if rel not in replaced]
        links = [(new_files[0], f"usr/bin/{name}-hardlink")]
        if lower := next(linkable, None):
            links.append((lower[0], f"usr/bin/{name}-alias"))
        symlinks = ((f"usr/lib/x86_64-linux-gnu/lib{name}.so", f"/{new_files[-1]}"),
                    (f"etc/{name}.conf", f"/{new_files[0]}"))
        removed = tuple(spare[0] for spare in (next(removable, None), next(removable, None))
                        if spare)
        packages.append(Package(name, tuple(files), frozenset(replaced),
                                (own, f"{own}/data"), tuple(links), symlinks, removed))
    return packages


def rootfs_stack(sizes: Sizes) -> Stack:
    """A rootfs-like tree over two lowers (a base and one more layer), with dpkg's database."""
    stack = Stack("rootfs", ROOTFS_LOWERS)
    for index, (rel, size) in enumerate(rootfs_files(sizes.rootfs_files)):
        add_file(stack, rel, index % ROOTFS_LOWERS, size)
    status = base_status(sizes.rootfs_files)
    stack.add(FileSpec(f"{DPKG}/status", 0, "file", len(status), status))
    stack.add(FileSpec(f"{DPKG}/status-old", 1, "file", len(status), status))
    stack.add(FileSpec(f"{DPKG}/info", 1, "dir"))
    return stack


def make_tarball(path: Path, max_files: int | None) -> int:
    """A tar of this interpreter's standard library (a real source tree); returns its files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    count = 0
    with tarfile.open(path, "w") as tar:
        for directory, subdirectories, names in os.walk(stdlib):
            subdirectories[:] = sorted(name for name in subdirectories
                                       if name != "site-packages")
            for name in sorted(names):
                if max_files is not None and count >= max_files:
                    return count
                full = Path(directory, name)
                tar.add(full, arcname=str(Path("stdlib") / full.relative_to(stdlib)),
                        recursive=False)
                count += 1
    return count


# ---- checking

Tree = dict[str, tuple[str, int, str | None]]


def expected_tree(stack: Stack) -> Tree:
    """What the merged view must show: type, size (files) and hash (small files) per path."""
    tree: Tree = {}
    for spec in stack.visible:
        parts = spec.rel.split("/")
        for depth in range(1, len(parts)):
            tree["/".join(parts[:depth])] = ("d", 0, None)
        if spec.kind in ("dir", "opaque-dir"):
            tree[spec.rel] = ("d", 0, None)
        elif spec.kind == "symlink":
            tree[spec.rel] = ("l", 0, spec.data.decode())
        else:
            tree[spec.rel] = ("f", spec.size, spec.content_hash())
    return tree


def walk(root: Path, rel: str = "") -> Iterator[tuple[str, os.DirEntry[str]]]:
    with os.scandir(root / rel if rel else root) as entries:
        for entry in entries:
            path = f"{rel}/{entry.name}" if rel else entry.name
            yield path, entry
            if entry.is_dir(follow_symlinks=False):
                yield from walk(root, path)


def read_tree(root: Path) -> Tree:
    tree: Tree = {}
    for rel, entry in walk(root):
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            tree[rel] = ("d", 0, None)
        elif stat.S_ISLNK(st.st_mode):
            tree[rel] = ("l", 0, os.readlink(entry.path))
        elif stat.S_ISREG(st.st_mode):
            digest = None
            if 0 < st.st_size <= HASHED_MAX_BYTES:
                digest = hashlib.sha256(Path(entry.path).read_bytes()).hexdigest()
            tree[rel] = ("f", st.st_size, digest)
        else:
            tree[rel] = (f"mode {st.st_mode:o}", 0, None)
    return tree


def compare_trees(expected: Tree, actual: Tree, limit: int = 5) -> list[str]:
    """Human-readable differences, at most *limit*; empty when the trees agree."""
    problems = [f"missing {rel}" for rel in sorted(expected.keys() - actual.keys())]
    problems += [f"unexpected {rel}" for rel in sorted(actual.keys() - expected.keys())]
    problems += [f"{rel}: {actual[rel]} instead of {expected[rel]}"
                 for rel in sorted(expected.keys() & actual.keys())
                 if expected[rel] != actual[rel]]
    if len(problems) > limit:
        problems = [*problems[:limit], f"... {len(problems) - limit} more"]
    return problems


Snapshot = dict[str, tuple[int, int, int, int]]


def snapshot_lowers(stacks: list[Stack]) -> Snapshot:
    """Mode, size, mtime and ctime of everything in the lowers (ctime catches chmod/xattrs)."""
    snapshot: Snapshot = {}
    for stack in stacks:
        for lower in stack.lowers:
            for rel, entry in walk(lower):
                st = entry.stat(follow_symlinks=False)
                snapshot[f"{lower}/{rel}"] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                              st.st_ctime_ns)
    return snapshot


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
