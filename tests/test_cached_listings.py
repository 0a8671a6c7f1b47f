"""A listing the kernel caches is never stale: after each change made through the mount
(create, unlink, rename in and out, rmdir, mkdir, copy-up, a directory moved by redirect,
exchange), cowfs lists what the kernel's overlayfs lists, by path and through directory fds
held open since the start and rewound (`os.listdir(fd)`)."""

import contextlib
import errno
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import kernel_overlay, mounted_cowfs

from cowfs import _libc

pytestmark = pytest.mark.mounts

# cowfs's defaults, which the kernel needs spelled out.
KERNEL_OPTIONS = "redirect_dir=on,metacopy=on"
HELD = ["", "a", "a/sub", "a/sub/deep", "b", "c", "e"]


def make_lower(lower: Path) -> None:
    for directory in ("a/sub/deep", "b", "c", "e"):
        (lower / directory).mkdir(parents=True)
    for name in ("a/x", "a/y", "a/sub/z", "a/sub/deep/d", "b/w", "f", "e/1", "e/2", "e/3"):
        (lower / name).write_text(name)


def exchange(root: Path, one: str, other: str) -> None:
    _libc.renameat2(-100, str(root / one), -100, str(root / other), _libc.RENAME_EXCHANGE)


STEPS: dict[str, Callable[..., None]] = {
    "create": lambda root, name: (root / name).write_text("new"),
    "unlink": lambda root, name: os.unlink(root / name),
    "mkdir": lambda root, name: os.mkdir(root / name),
    "rmdir": lambda root, name: os.rmdir(root / name),
    "rename": lambda root, old, new: os.rename(root / old, root / new),
    "chmod": lambda root, name: os.chmod(root / name, 0o700),       # copies a directory up
    "exchange": exchange,
}

SEQUENCES = {
    "create and unlink": [("create", "a/new"), ("unlink", "a/x"), ("create", "a/x"),
                          ("unlink", "a/new"), ("create", "c/first"), ("unlink", "c/first")],
    "rename in and out": [("rename", "a/y", "b/y"), ("rename", "b/w", "a/w"),
                          ("rename", "a/w", "a/w2"), ("rename", "b/y", "y"),
                          ("rename", "a/x", "b/x"), ("rename", "f", "a/x"),
                          ("rename", "a/x", "b/x")],
    "directories": [("mkdir", "a/n"), ("create", "a/n/f"), ("unlink", "a/n/f"),
                    ("rmdir", "a/n"), ("mkdir", "a/n"), ("rmdir", "c"), ("mkdir", "c"),
                    ("create", "c/again"), ("unlink", "e/1"), ("unlink", "e/2"),
                    ("unlink", "e/3"), ("rmdir", "e"), ("mkdir", "e"), ("create", "e/1")],
    "copy-up and redirects": [("chmod", "a/sub"), ("create", "a/sub/q"),
                              ("rename", "a/sub", "b/moved"), ("create", "b/moved/deep/r"),
                              ("unlink", "b/moved/z"), ("rename", "b/moved/deep", "c/deep"),
                              ("mkdir", "a/sub"), ("rename", "c/deep", "a/sub/deep"),
                              ("unlink", "a/sub/deep/d"), ("unlink", "a/sub/deep/r"),
                              ("rmdir", "a/sub/deep"), ("rename", "b/moved", "a/sub/back")],
    "exchange": [("exchange", "a", "b"), ("create", "a/in-old-b"), ("exchange", "a/w", "b/x"),
                 ("exchange", "b/sub", "e"), ("create", "b/sub/2b")],
}


def attempt(step: tuple[str, ...], root: Path) -> str:
    try:
        STEPS[step[0]](root, *step[1:])
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "ok"


def listing_of(root: Path) -> dict[str, list[tuple[str, bool]]]:
    """Every directory's entries (name, is a directory), each read twice (the second from the
    kernel's cache on cowfs), and its d_ino checked against stat."""
    tree = {}
    for directory, _, _ in os.walk(root):
        shown = []
        for _ in range(2):
            with os.scandir(directory) as entries:
                shown.append(sorted((entry.name, entry.is_dir(follow_symlinks=False),
                                     entry.inode() == entry.stat(follow_symlinks=False).st_ino)
                                    for entry in entries))
        assert shown[0] == shown[1], directory
        tree[os.path.relpath(directory, root)] = shown[0]
    return tree


def held_listings(fds: dict[str, int]) -> dict[str, list[str] | str]:
    shown: dict[str, list[str] | str] = {}
    for name, fd in fds.items():
        try:
            shown[name] = sorted(os.listdir(fd))      # rewinds the fd
        except OSError as exc:
            shown[name] = errno.errorcode[exc.errno]
    return shown


@pytest.mark.parametrize("sequence", SEQUENCES)
def test_listings_follow_changes_as_the_kernels_do(layer_dirs, sequence: str) -> None:
    lower, cowfs_upper, kernel_upper, cowfs_merged, kernel_merged = layer_dirs(
        "lower", "cowfs-upper", "kernel-upper", "cowfs", "kernel")
    make_lower(lower)
    with contextlib.ExitStack() as stack:
        stack.enter_context(kernel_overlay([lower], kernel_merged, kernel_upper,
                                           KERNEL_OPTIONS))
        stack.enter_context(mounted_cowfs([lower], cowfs_merged, cowfs_upper))
        roots = {"cowfs": cowfs_merged, "kernel": kernel_merged}
        held: dict[str, dict[str, int]] = {"cowfs": {}, "kernel": {}}
        for implementation, root in roots.items():
            for name in HELD:
                fd = os.open(root / name, os.O_RDONLY | os.O_DIRECTORY)
                stack.callback(os.close, fd)
                held[implementation][name] = fd
        for implementation in roots:
            listing_of(roots[implementation])          # every listing cached before changes
            held_listings(held[implementation])
        for step in SEQUENCES[sequence]:
            results = {implementation: attempt(step, root) for implementation, root in
                       roots.items()}
            assert results["cowfs"] == results["kernel"], step
            assert listing_of(cowfs_merged) == listing_of(kernel_merged), step
            assert held_listings(held["cowfs"]) == held_listings(held["kernel"]), step
        statistics = json.loads(os.getxattr(cowfs_merged, "trusted.cowfs.stats"))
        assert statistics["kernel_features"]["cache_listings"]
        assert statistics["cached_listing_replies"] > 0
