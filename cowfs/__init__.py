"""cowfs: a copy-on-write union filesystem in userspace, in the kernel overlayfs format.

The public API: open a layer stack and read the merged tree without FUSE (`Union`), or mount it
(`mounted`, `open_mounted` under trio). docs/library.md shows them at work.
"""

from cowfs.fuse_extensions import KernelFeatures
from cowfs.handle import KernelOptions, Mounted, MountError, mount_stack, mounted, open_mounted
from cowfs.layers import LayerStack, LayoutError, open_stack, parse_lowerdirs
from cowfs.lookup import Directory, Entry, Name
from cowfs.union import Union
from cowfs.whiteout import FormatOptions

__version__ = "0.1.0"

# Loaded on first use: tar and digest handling is not needed to mount or run (start-up time).
_LAZY = {"ImageError": "cowfs.ociimage", "unpack_image": "cowfs.ociimage",
         "LayerError": "cowfs.ocilayer", "export_layer": "cowfs.ocilayer",
         "import_layer": "cowfs.ocilayer"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cowfs' has no attribute {name!r}")

__all__ = [
    "Directory",
    "Entry",
    "FormatOptions",
    "ImageError",
    "KernelFeatures",
    "KernelOptions",
    "LayerError",
    "LayerStack",
    "LayoutError",
    "MountError",
    "Mounted",
    "Name",
    "Union",
    "__version__",
    "export_layer",
    "import_layer",
    "mount_stack",
    "mounted",
    "open_mounted",
    "open_stack",
    "parse_lowerdirs",
    "unpack_image",
]
