"""`cowfs demo`: mount an example image, show the merged tree and what each layer gives it.

It drives cowfs the way a user does (`cowfs mount`, then `cowfs umount`) and asks the library
(`Union`) which layer supplies each path, so both faces are exercised.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from cowfs import whiteout
from cowfs.layers import open_stack
from cowfs.lookup import Directory
from cowfs.union import Union

DEFAULT_IMAGE = Path(__file__).resolve().parent.parent / "examples" / "image"


def image_layers(image: Path) -> list[Path]:
    """The image's layer directories, top first: they are named in build order, bottom first."""
    layers = sorted((path for path in image.iterdir() if path.is_dir()), reverse=True)
    if not layers:
        raise ValueError(f"{image} holds no layer directories")
    return layers


def run(image_dir: str | None) -> int:
    from cowfs.cli import CliError, command_umount

    image = Path(image_dir) if image_dir else DEFAULT_IMAGE
    if not image.is_dir():
        raise CliError(f"image directory {image} does not exist")
    layers = image_layers(image)
    names = [layer.name for layer in layers]
    print(f"image {image}: {len(layers)} layers, top first: {', '.join(names)}")
    with tempfile.TemporaryDirectory(prefix="cowfs-demo-") as scratch:
        merged = Path(scratch) / "merged"
        merged.mkdir()
        lowerdir = ":".join(str(layer).replace(":", "\\:") for layer in layers)
        subprocess.run([sys.executable, "-m", "cowfs", "mount", lowerdir, str(merged)],
                       check=True)
        try:
            print(f"mounted read-only at {merged}\n")
            show_tree(merged, layers)
        finally:
            command_umount(str(merged))
            print(f"\nunmounted {merged}")
    return 0


def show_tree(merged: Path, layers: list[Path]) -> None:
    """Walk the mount (through FUSE) and name, for each entry, the layers it comes from."""
    contributed: dict[str, int] = {layer.name: 0 for layer in layers}
    with Union(open_stack([str(layer) for layer in layers])) as union:
        print(f"{'merged tree':<40} from layer (a merged directory: all its layers)")
        for path in walk_sorted(merged):
            relative = path.relative_to(merged)
            entry = union.resolve(str(relative))
            assert entry is not None, f"{relative} is in the mount but not in the union"
            sources = [Path(union.stack.layers[index].path).name
                       for index in (entry.layers if isinstance(entry, Directory)
                                     else (entry.layer,))]
            contributed[sources[0]] += 1
            indent = "  " * (len(relative.parts) - 1)
            shown = f"{indent}{path.name}{'/' if path.is_dir() else ''}"
            print(f"{shown:<40} {' + '.join(sources)}")
    print("\nwhat each layer contributes (entries on top) and removes (whiteouts):")
    for layer in layers:
        removed = removed_names(layer)
        print(f"  {layer.name:<10} {contributed[layer.name]:>3} entries"
              + (f"; removes {', '.join(removed)}" if removed else ""))


def walk_sorted(directory: Path) -> list[Path]:
    """Every path under *directory*, depth first, by name: the order a tree is drawn in."""
    paths = []
    for path in sorted(directory.iterdir()):
        paths.append(path)
        if path.is_dir() and not path.is_symlink():
            paths.extend(walk_sorted(path))
    return paths


def removed_names(layer: Path) -> list[str]:
    """What a layer's OCI whiteouts delete: NAME for .wh.NAME, DIR/* for an opaque DIR."""
    removed = []
    for directory, _, files in os.walk(layer):
        relative = Path(directory).relative_to(layer)
        for name in sorted(files):
            if name == whiteout.OCI_OPAQUE_MARKER:
                removed.append(f"{relative}/* (opaque)")
            elif whiteout.is_oci_name(name):
                removed.append(str(relative / name[len(whiteout.OCI_WHITEOUT_PREFIX):]))
    return sorted(removed)
