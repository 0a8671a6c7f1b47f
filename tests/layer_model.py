"""Layer stacks as plain data: generate them, write them to disk, and flatten them in Python.

The oracle tests draw a `Stack` with hypothesis, write its layers to directories and compare
what cowfs shows with what the kernel's overlayfs shows. The kernel does not read the OCI
dialect (`.wh.NAME`, `.wh..wh..opq`), so `flatten` computes the merged tree of a stack in a
few lines of Python instead; the kernel-dialect test checks that model against the kernel too,
so the OCI test does not rest on an unchecked model.
"""

import dataclasses
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from hypothesis import strategies as st

Dialect = Literal["kernel", "oci"]
# "y": opaque, lower layers hidden; "x": holds xattr whiteouts, not opaque (kernel dialect only).
Opacity = Literal["", "y", "x"]

MAX_LAYERS = 5
POOL_SIZES = ((3, 6), (2, 4), (2, 3))   # (min, max) names to choose from, per directory level
MAX_DEPTH = len(POOL_SIZES)             # name levels: the root's children are level 0
OWNERS = (0, 1000, 65534)
USER_XATTRS = ("user.a", "user.b:c", "user.x y")

OCI_WHITEOUT_PREFIX = ".wh."
OCI_OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_OPAQUE = "trusted.overlay.opaque"
OVERLAY_WHITEOUT = "trusted.overlay.whiteout"


@dataclasses.dataclass
class File:
    content: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    xattrs: dict[str, bytes] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Symlink:
    target: str
    uid: int = 0
    gid: int = 0


@dataclasses.dataclass
class Fifo:
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@dataclasses.dataclass
class Device:
    """A device node other than a char device 0/0, which would be a whiteout."""

    block: bool
    major: int
    minor: int
    mode: int = 0o644
    uid: int = 0
    gid: int = 0

    @property
    def rdev(self) -> int:
        return os.makedev(self.major, self.minor)


@dataclasses.dataclass
class Whiteout:
    """Hides the name in lower layers: a 0/0 char device, or an OCI `.wh.NAME` file."""


@dataclasses.dataclass
class XattrWhiteout:
    """An empty file with `trusted.overlay.whiteout`; only honoured in an opaque=x directory."""


@dataclasses.dataclass
class HardLink:
    """Another name for the File at *target* ("dir/name") in the same layer."""

    target: str


@dataclasses.dataclass
class Dir:
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    xattrs: dict[str, bytes] = dataclasses.field(default_factory=dict)
    opaque: Opacity = ""
    children: dict[str, "Node"] = dataclasses.field(default_factory=dict)
    # OCI dialect: names with both an entry here and a `.wh.NAME` marker. The spec says the
    # marker hides the lower layers' NAME only, so this layer's NAME shows, merged with nothing.
    whiteouts_beside: tuple[str, ...] = ()


Node = File | Symlink | Fifo | Device | Whiteout | XattrWhiteout | HardLink | Dir


# -- the stack and how it reads in a failure report -----------------------------------------


@dataclasses.dataclass
class Stack:
    """Layers top first, each a layer root directory."""

    dialect: Dialect
    layers: list[Dir]

    def describe(self) -> str:
        lines = [f"{self.dialect} stack, {len(self.layers)} layer(s), top first:"]
        for index, root in enumerate(self.layers):
            lines.append(f"layer {index}: {_describe_node(root)}")
            lines.extend(_describe_children(root, "  "))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.describe()

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """Hypothesis prints a falsifying example with this: the tree, one entry a line."""
        printer.text("\n" + self.describe())


def _describe_children(directory: Dir, indent: str) -> Iterator[str]:
    for name, node in directory.children.items():
        yield f"{indent}{name!r}: {_describe_node(node)}"
        if isinstance(node, Dir):
            yield from _describe_children(node, indent + "  ")


def _owner_mode(node: File | Fifo | Device | Dir) -> str:
    xattrs = f" xattrs={node.xattrs!r}" if node.xattrs else ""
    return f"{node.mode:#o} {node.uid}:{node.gid}{xattrs}"


def _describe_node(node: Node) -> str:
    match node:
        case Dir():
            opaque = f" opaque={node.opaque}" if node.opaque else ""
            beside = (f" whiteouts beside entries={list(node.whiteouts_beside)!r}"
                      if node.whiteouts_beside else "")
            return f"dir {_owner_mode(node)}{opaque}{beside}"
        case File():
            content = repr(node.content) if len(node.content) <= 40 else (
                f"{node.content[:16]!r}... ({len(node.content)} bytes)")
            return f"file {_owner_mode(node)} {content}"
        case Symlink():
            return f"symlink -> {node.target!r} {node.uid}:{node.gid}"
        case Fifo():
            return f"fifo {_owner_mode(node)}"
        case Device():
            kind = "block" if node.block else "char"
            return f"{kind} device {node.major}/{node.minor} {_owner_mode(node)}"
        case HardLink():
            return f"hard link to {node.target!r}"
        case Whiteout():
            return "whiteout"
        case XattrWhiteout():
            return "xattr whiteout"
    raise TypeError(node)


# -- writing a stack to disk ------------------------------------------------------------------


def write_stack(stack: Stack, base: Path) -> list[Path]:
    """Create one directory per layer under *base* (l0 on top); returns them top first."""
    paths = []
    for index, root in enumerate(stack.layers):
        path = base / f"l{index}"
        path.mkdir()
        _write_layer(root, path, stack.dialect)
        paths.append(path)
    return paths


def _write_layer(root: Dir, path: Path, dialect: Dialect) -> None:
    links: list[tuple[Path, Path]] = []
    _write_directory(root, path, dialect, path, links)
    for link, target in links:          # once every target exists
        os.link(target, link)
    _apply_directory_attributes(root, path, dialect)


def _write_directory(directory: Dir, path: Path, dialect: Dialect, layer_root: Path,
                     links: list[tuple[Path, Path]]) -> None:
    for name, node in directory.children.items():
        child = path / name
        match node:
            case Dir():
                child.mkdir()
                _write_directory(node, child, dialect, layer_root, links)
                _apply_directory_attributes(node, child, dialect)
            case File():
                child.write_bytes(node.content)
                _apply_attributes(child, node.mode, node.uid, node.gid, node.xattrs)
            case Symlink():
                os.symlink(node.target, child)
                os.chown(child, node.uid, node.gid, follow_symlinks=False)
            case Fifo():
                os.mkfifo(child)
                _apply_attributes(child, node.mode, node.uid, node.gid, {})
            case Device():
                os.mknod(child, (stat.S_IFBLK if node.block else stat.S_IFCHR) | 0o600,
                         node.rdev)
                _apply_attributes(child, node.mode, node.uid, node.gid, {})
            case HardLink():
                links.append((child, layer_root / node.target))
            case Whiteout() if dialect == "oci":
                (path / (OCI_WHITEOUT_PREFIX + name)).touch()
            case Whiteout():
                os.mknod(child, stat.S_IFCHR | 0o000, os.makedev(0, 0))
            case XattrWhiteout():
                assert dialect == "kernel" and directory.opaque == "x", "kernel dialect, in x dirs"
                child.touch()
                os.setxattr(child, OVERLAY_WHITEOUT, b"")
    for name in directory.whiteouts_beside:
        assert dialect == "oci" and name in directory.children, "OCI dialect, beside an entry"
        (path / (OCI_WHITEOUT_PREFIX + name)).touch()


def _apply_directory_attributes(directory: Dir, path: Path, dialect: Dialect) -> None:
    if directory.opaque and dialect == "oci":
        assert directory.opaque == "y", "the OCI dialect has no opaque=x"
        (path / OCI_OPAQUE_MARKER).touch()
    elif directory.opaque:
        os.setxattr(path, OVERLAY_OPAQUE, directory.opaque.encode())
    _apply_attributes(path, directory.mode, directory.uid, directory.gid, directory.xattrs)


def _apply_attributes(path: Path, mode: int, uid: int, gid: int,
                      xattrs: dict[str, bytes]) -> None:
    """xattrs, then owner, then mode: chown clears setuid/setgid, so chmod comes last."""
    for attribute, value in xattrs.items():
        os.setxattr(path, attribute, value)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


# -- the model: the merged tree, computed ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Visible:
    """What the merged view shows at one path (the fields the model can know)."""

    mode: int                      # full st_mode
    uid: int
    gid: int
    rdev: int                      # device nodes, else 0
    content: bytes | None          # regular files
    target: str | None             # symlinks
    xattrs: tuple[tuple[str, bytes], ...]   # user.* xattrs, sorted


def flatten(stack: Stack, notes: set[str] | None = None) -> dict[str, Visible]:
    """The merged tree of *stack*: "/"-joined path ("" is the root) to what it shows.

    Top layer wins; a whiteout hides its name in the layers below; an opaque directory hides
    the lower layers' copies of itself; directories merge with directories below them until a
    non-directory, a whiteout or an opaque copy ends the merge. A layer root is never opaque:
    the kernel ignores opaque=y there, and cowfs does so in both dialects.

    *notes*, when given, collects which of these rules the stack exercised.
    """
    tree = {"": _visible_directory(stack.layers[0])}
    _merge(stack, list(enumerate(stack.layers)), "", tree, notes if notes is not None else set())
    return tree


def _merge(stack: Stack, copies: list[tuple[int, Dir]], path: str,
           tree: dict[str, Visible], notes: set[str]) -> None:
    """Add the entries of the merged directory at *path*, whose copies are *copies*."""
    names = dict.fromkeys(name for _, directory in copies for name in directory.children)
    for name in names:
        child_path = f"{path}/{name}" if path else name
        # Each copy's entry under this name, top first: (layer, entry, whiteout beside it).
        found = [(index, node, name in directory.whiteouts_beside)
                 for index, directory in copies
                 if (node := directory.children.get(name)) is not None]
        directories: list[tuple[int, Dir]] = []
        for position, (index, node, whiteout_beside) in enumerate(found):
            below = _kind(found[position + 1][1]) if position + 1 < len(found) else None
            if isinstance(node, Whiteout | XattrWhiteout):
                if below:
                    notes.add(f"{_kind(node)} hides {below}")
                break
            if not isinstance(node, Dir):
                if directories:
                    notes.add(f"dir covers {_kind(node)}")
                    break
                tree[child_path] = _visible_leaf(stack.layers[index], node)
                if isinstance(node, HardLink):
                    notes.add("hard link shown")
                if below:
                    notes.add(f"{_kind(node)} covers {below}")
                break
            if directories:
                notes.add("dir merges with dir")
            directories.append((index, node))
            if node.opaque == "y" or whiteout_beside:
                if below:
                    reason = "opaque dir" if node.opaque == "y" else "whiteout beside dir"
                    notes.add(f"{reason} hides {below}")
                break
        if directories:
            tree[child_path] = _visible_directory(directories[0][1])
            _merge(stack, directories, child_path, tree, notes)


_KINDS = {File: "file", Symlink: "symlink", Fifo: "fifo", Device: "device",
          Whiteout: "whiteout", XattrWhiteout: "xattr whiteout", HardLink: "hard link",
          Dir: "dir"}


def _kind(node: Node) -> str:
    return _KINDS[type(node)]


def _visible_directory(directory: Dir) -> Visible:
    return Visible(stat.S_IFDIR | directory.mode, directory.uid, directory.gid, 0, None, None,
                   tuple(sorted(directory.xattrs.items())))


def _visible_leaf(layer_root: Dir, node: Node) -> Visible:
    if isinstance(node, HardLink):
        node = _resolve(layer_root, node.target)
    match node:
        case File():
            return Visible(stat.S_IFREG | node.mode, node.uid, node.gid, 0, node.content, None,
                           tuple(sorted(node.xattrs.items())))
        case Symlink():
            return Visible(stat.S_IFLNK | 0o777, node.uid, node.gid, 0, None, node.target, ())
        case Fifo():
            return Visible(stat.S_IFIFO | node.mode, node.uid, node.gid, 0, None, None, ())
        case Device():
            kind = stat.S_IFBLK if node.block else stat.S_IFCHR
            return Visible(kind | node.mode, node.uid, node.gid, node.rdev, None, None, ())
    raise TypeError(f"not a visible leaf: {node!r}")


def _resolve(layer_root: Dir, path: str) -> Node:
    node: Node = layer_root
    for name in path.split("/"):
        assert isinstance(node, Dir), path
        node = node.children[name]
    return node


# -- strategies -------------------------------------------------------------------------------

# Names an overlay implementation could trip on: spaces, colons (the lowerdir separator),
# commas (the mount option separator), backslashes, dots, non-ASCII.
INTERESTING_NAMES = ("a", "a b", "c:d", "x:y z", "b", " lead", "trail ", "e,f", "g\\h", "..i",
                     ".j", "ü", "-")
NAME_ALPHABET = "ab :,.-_xyz\\é"
# (block, major, minor): /dev/null, a loop device, and the two 0/0-like devices that are not
# whiteouts (only a char device 0/0 is one).
DEVICES = ((False, 1, 3), (True, 7, 0), (True, 0, 0), (False, 0, 1))
SYMLINK_TARGETS = ("/etc/passwd", "/", "/etc", "nowhere", "../a", "a b", "c:d/x", ".", "..",
                   "/nonexistent/path")


def valid_name(name: str) -> bool:
    """A single directory entry name that is no marker of either dialect."""
    return (name not in ("", ".", "..") and "/" not in name and "\0" not in name
            and not name.startswith(OCI_WHITEOUT_PREFIX))


names = st.one_of(st.sampled_from(INTERESTING_NAMES),
                  st.text(NAME_ALPHABET, min_size=1, max_size=6)).filter(valid_name)
modes = st.integers(0, 0o7777)
owners = st.sampled_from(OWNERS)
xattr_maps = st.dictionaries(st.sampled_from(USER_XATTRS), st.binary(max_size=8), max_size=2)
# Hypothesis leans to small draws; these lean the other way, and still shrink to the least.
present = st.integers(0, 3).map(bool)                            # a pool name: 3 in 4
layer_counts = st.integers(0, 2 * MAX_LAYERS - 2).map(lambda n: 1 + (n + 1) // 2)  # 1: 1 in 9
contents = st.one_of(
    st.binary(max_size=64),
    # A few pages of data: reads cross page and request boundaries.
    st.tuples(st.binary(min_size=1, max_size=8), st.integers(500, 2500)).map(
        lambda pattern_count: pattern_count[0] * pattern_count[1]),
)


@st.composite
def _leaf(draw: st.DrawFn, kind: str, pool_names: list[str]) -> Node:
    match kind:
        case "file":
            return File(draw(contents), draw(modes), draw(owners), draw(owners),
                        draw(xattr_maps))
        case "symlink":
            target = draw(st.one_of(st.sampled_from(SYMLINK_TARGETS),
                                    st.sampled_from(pool_names)))
            return Symlink(target, draw(owners), draw(owners))
        case "fifo":
            return Fifo(draw(modes), draw(owners), draw(owners))
        case "device":
            block, major, minor = draw(st.sampled_from(DEVICES))
            return Device(block, major, minor, draw(modes), draw(owners), draw(owners))
        case "whiteout":
            return Whiteout()
        case "xattr whiteout":
            return XattrWhiteout()
    raise ValueError(kind)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What all layers of one stack share, so that their paths overlap.

    Each directory level draws its names from one small pool, and each name has a preferred
    kind that most layers use: the same path then turns up in several layers, mostly as the
    same kind (directories merge, files cover files) and sometimes as another.
    """

    dialect: Dialect
    pools: list[list[str]]                   # per level
    preferred: list[dict[str, str]]          # per level: name -> kind
    whiteouts_beside: bool


# Directories are drawn more often than each other kind: they make the overlaps.
KINDS = ("file", "dir", "dir", "dir", "symlink", "fifo", "device", "whiteout")
uses_preferred_kind = st.integers(0, 2).map(bool)   # 2 in 3; shrinks to a free choice


@st.composite
def _directory(draw: st.DrawFn, plan: _Plan, level: int, opacities: list[Opacity]) -> Dir:
    directory = Dir(draw(modes), draw(owners), draw(owners), draw(xattr_maps),
                    draw(st.sampled_from(opacities)))
    child_opacities: list[Opacity] = ["", "y", "x"] if plan.dialect == "kernel" else ["", "y"]
    kinds = [kind for kind in KINDS if kind != "dir" or level + 1 < MAX_DEPTH]
    if directory.opaque == "x":
        kinds += ["xattr whiteout", "xattr whiteout"]
    pool = plan.pools[level]
    for name in pool:
        if not draw(present):
            continue
        kind = plan.preferred[level][name]
        if kind not in kinds or not draw(uses_preferred_kind):
            kind = draw(st.sampled_from(kinds))
        if kind == "whiteout" and directory.opaque == "x":
            kind = draw(st.sampled_from(["whiteout", "xattr whiteout"]))
        if kind == "dir":
            directory.children[name] = draw(_directory(plan, level + 1, child_opacities))
        else:
            directory.children[name] = draw(_leaf(kind, pool))
    if plan.whiteouts_beside:
        entries = [name for name, node in directory.children.items()
                   if not isinstance(node, Whiteout)]
        directory.whiteouts_beside = tuple(
            draw(st.lists(st.sampled_from(entries), unique=True)) if entries else [])
    return directory


def walk(directory: Dir, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Node]]:
    yield path, directory
    for name, node in directory.children.items():
        if isinstance(node, Dir):
            yield from walk(node, (*path, name))
        else:
            yield (*path, name), node


@st.composite
def _layer(draw: st.DrawFn, plan: _Plan) -> Dir:
    # Opaque markers on a layer root are generated too: they must change nothing.
    root_opacities: list[Opacity] = ["", "y", "x"] if plan.dialect == "kernel" else ["", "y"]
    root = draw(_directory(plan, 0, root_opacities))
    entries = list(walk(root))
    files = ["/".join(path) for path, node in entries if isinstance(node, File)]
    directories = [(path, node) for path, node in entries if isinstance(node, Dir)]
    if not files:
        return root
    for _ in range(draw(st.integers(0, 2))):
        target = draw(st.sampled_from(files))
        path, directory = draw(st.sampled_from(directories))
        free = [name for name in plan.pools[len(path)] if name not in directory.children]
        if free:
            directory.children[draw(st.sampled_from(free))] = HardLink(target)
    return root


@st.composite
def stacks(draw: st.DrawFn, dialect: Dialect, *, whiteouts_beside: bool = False) -> Stack:
    """A stack of 1 to 5 layers whose paths overlap (see _Plan) in every way.

    *whiteouts_beside* (OCI only) also puts `.wh.NAME` markers beside entries named NAME.
    """
    assert dialect == "oci" or not whiteouts_beside
    count = draw(layer_counts)
    pools = [draw(st.lists(names, min_size=low, max_size=high, unique=True))
             for low, high in POOL_SIZES]
    preferred = [{name: draw(st.sampled_from(KINDS)) for name in pool} for pool in pools]
    plan = _Plan(dialect, pools, preferred, whiteouts_beside)
    return Stack(dialect, [draw(_layer(plan)) for _ in range(count)])


# Reading a mounted tree, for the tests that compare one.


def read_all(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def user_xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    names = sorted(name for name in os.listxattr(path, follow_symlinks=False)
                   if name.startswith("user."))
    return tuple((name, os.getxattr(path, name, follow_symlinks=False)) for name in names)
