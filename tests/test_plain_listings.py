"""Plain listings (`-o readdirplus=auto`): where no entry's attributes are wanted (`ls -f`,
scandir without stat), the kernel sends plain READDIR and cowfs names each entry from its
layers' directory entries, with no lookup. Such a listing must show what the kernel's
overlayfs shows (names and types), with the inode number stat shows, in directories too large
for the first (readdirplus) batch. Without the option every batch is readdirplus."""

import contextlib
import json
import os
import random
import stat
from pathlib import Path

import pytest
from conftest import kernel_overlay, mounted_cowfs
from layer_model import (
    Device,
    Dir,
    Fifo,
    File,
    Node,
    Stack,
    Symlink,
    Whiteout,
    XattrWhiteout,
    flatten,
    write_stack,
)

pytestmark = pytest.mark.mounts

PLAIN = ("-o", "readdirplus=auto")

# Names per layer in the big directory: the first readdirplus batch of a 32 KiB buffer holds
# about 200 entries, a plain batch about 1,000, so the listing takes several plain batches.
NAMES = 1500
LAYERS = 3
KIND_OF_TYPE = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink"}
KINDS = ("absent", "absent", "file", "file", "symlink", "dir", "fifo", "device", "whiteout")


def big_stack(dialect: str, seed: int) -> Stack:
    """LAYERS layers, each holding a directory `big` with entries of every kind under shared
    names, so every name's topmost copy, and what it hides, varies."""
    chooser = random.Random(seed)
    layers = []
    for index in range(LAYERS):
        # The middle layer's `big` may hold xattr whiteouts (kernel dialect).
        xwhiteouts = dialect == "kernel" and index == 1
        children: dict[str, Node] = {}
        for number in range(NAMES):
            kind = chooser.choice(KINDS + (("xwhiteout",) if xwhiteouts else ()))
            name = f"entry-{number:05}"
            if kind == "file":
                children[name] = File(b"x" * (number % 3))
            elif kind == "symlink":
                children[name] = Symlink(f"target-{number}")
            elif kind == "dir":
                children[name] = Dir()
            elif kind == "fifo":
                children[name] = Fifo()
            elif kind == "device":
                children[name] = Device(block=False, major=1, minor=3)
            elif kind == "whiteout" and index < LAYERS - 1:
                children[name] = Whiteout()
            elif kind == "xwhiteout":
                children[name] = XattrWhiteout()
        layers.append(Dir(children={"big": Dir(children=children,
                                               opaque="x" if xwhiteouts else "")}))
    return Stack(dialect, layers)


def kind_of(entry: os.DirEntry[str]) -> str:
    if entry.is_symlink():
        return "symlink"
    if entry.is_dir(follow_symlinks=False):
        return "dir"
    return "file" if entry.is_file(follow_symlinks=False) else "other"


def plain_listing(directory: Path) -> dict[str, tuple[str, int]]:
    """name -> (kind, d_ino), read with no stat at all (so with plain READDIR)."""
    with os.scandir(directory) as entries:
        return {entry.name: (kind_of(entry), entry.inode()) for entry in entries}


def statistics(merged: Path) -> dict:
    return json.loads(os.getxattr(merged, "trusted.cowfs.stats"))


def check_plain(merged: Path) -> dict[str, str]:
    """A plain listing of merged/big, checked against stat; returns name -> kind."""
    before = statistics(merged)
    listed = plain_listing(merged / "big")
    after = statistics(merged)
    assert after["plain_readdirs"] > before["plain_readdirs"]
    # Only the first batch (readdirplus) looks its names up: not one lookup per entry.
    lookups = after["requests"].get("lookup", 0) - before["requests"].get("lookup", 0)
    assert lookups < len(listed) // 2, (lookups, len(listed))
    for name, (kind, number) in listed.items():
        st = os.lstat(merged / "big" / name)
        assert number == st.st_ino, name
        assert kind == KIND_OF_TYPE.get(stat.S_IFMT(st.st_mode), "other"), name
    return {name: kind for name, (kind, _) in listed.items()}


def changes(root: Path) -> None:
    """Changes through the mount: new names, copy-ups, removals, a renamed directory."""
    big = root / "big"
    names = sorted(os.listdir(big))
    for name in names[::97]:
        path = big / name
        if path.is_symlink() or not path.is_dir():
            os.unlink(path)
    for name in names[5::89]:
        path = big / name
        if path.is_file() and not path.is_symlink():
            with open(path, "ab") as file:      # copies it up
                file.write(b"more")
    directories = [name for name in names if (big / name).is_dir() and
                   not (big / name).is_symlink()]
    os.rename(big / directories[-1], big / "zz-moved")
    for number in range(300):
        (big / f"new-{number:04}").write_bytes(b"")
    os.mkdir(big / "new-dir")
    os.symlink("somewhere", big / "new-link")


@pytest.mark.parametrize("seed", [1, 2])
def test_a_plain_listing_shows_what_the_kernel_shows(layer_dirs, seed: int) -> None:
    base, cowfs_upper, kernel_upper, cowfs_merged, kernel_merged = layer_dirs(
        "base", "cowfs-upper", "kernel-upper", "cowfs", "kernel")
    lowers = write_stack(big_stack("kernel", seed), base)
    with contextlib.ExitStack() as stack:
        stack.enter_context(kernel_overlay(lowers, kernel_merged, kernel_upper,
                                           "redirect_dir=on,metacopy=on"))
        stack.enter_context(mounted_cowfs(lowers, cowfs_merged, cowfs_upper, PLAIN))
        shown = check_plain(cowfs_merged)
        assert shown == {name: kind for name, (kind, _) in
                         plain_listing(kernel_merged / "big").items()}
        assert set(shown.values()) == {"file", "dir", "symlink", "other"}
        changes(cowfs_merged)
        changes(kernel_merged)
        assert check_plain(cowfs_merged) == {name: kind for name, (kind, _) in
                                             plain_listing(kernel_merged / "big").items()}


def test_a_plain_listing_of_oci_layers_shows_what_the_model_shows(layer_dirs) -> None:
    base, merged = layer_dirs("base", "merged")
    layer_stack = big_stack("oci", 3)
    lowers = write_stack(layer_stack, base)
    expected = {}
    for path, visible in flatten(layer_stack).items():
        if path.startswith("big/"):
            expected[path[len("big/"):]] = KIND_OF_TYPE.get(stat.S_IFMT(visible.mode), "other")
    with mounted_cowfs(lowers, merged, extra=PLAIN):
        assert check_plain(merged) == expected


def test_without_the_option_every_batch_carries_attributes(layer_dirs) -> None:
    """The default: a tool that reads a whole directory and then stats it (du, tar, rsync)
    finds every entry's attributes in the kernel, with no LOOKUP per entry."""
    base, merged = layer_dirs("base", "merged")
    lowers = write_stack(big_stack("kernel", 4), base)
    with mounted_cowfs(lowers, merged):
        before = statistics(merged)
        listed = plain_listing(merged / "big")
        for name in listed:
            os.lstat(merged / "big" / name)
        after = statistics(merged)
        assert after["plain_readdirs"] == before["plain_readdirs"] == 0
        assert after["requests"]["readdir"] > before["requests"].get("readdir", 0) + 1
        lookups = after["requests"].get("lookup", 0) - before["requests"].get("lookup", 0)
        assert lookups <= 1, lookups
        assert not after["kernel_features"]["plain_listings"]
