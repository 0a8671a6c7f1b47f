"""cowfs: a copy-on-write union filesystem in userspace, in the kernel overlayfs format.

The public API: open a layer stack and read the merged tree without FUSE (`Union`), or mount it
(`mounted`, `open_mounted` under trio). docs/library.md shows them at work.
"""

TYPE_CHECKING = False    # typing costs ~8 ms to import; the command front must start fast

__version__ = "0.1.0"

# Loaded on first use, so that `import cowfs` costs next to nothing: the `cowfs` command's
# front (`cowfs.client`) lives in this package and must start in milliseconds.
_LAZY = {"KernelFeatures": "cowfs.fuse_extensions",
         **dict.fromkeys(("KernelOptions", "Mounted", "MountError", "mount_stack", "mounted",
                          "mounts", "open_mounted"), "cowfs.handle"),
         "ControlError": "cowfs.control",
         **dict.fromkeys(("LayerStack", "LayoutError", "open_stack", "parse_lowerdirs"),
                         "cowfs.layers"),
         "Directory": "cowfs.lookup", "Entry": "cowfs.lookup", "Name": "cowfs.lookup",
         "Union": "cowfs.union", "FormatOptions": "cowfs.whiteout",
         "ImageError": "cowfs.ociimage", "unpack_image": "cowfs.ociimage",
         "LayerError": "cowfs.ocilayer", "export_layer": "cowfs.ocilayer",
         "import_layer": "cowfs.ocilayer"}

if TYPE_CHECKING:
    from cowfs.control import ControlError
    from cowfs.fuse_extensions import KernelFeatures
    from cowfs.handle import (
        KernelOptions,
        Mounted,
        MountError,
        mount_stack,
        mounted,
        mounts,
        open_mounted,
    )
    from cowfs.layers import LayerStack, LayoutError, open_stack, parse_lowerdirs
    from cowfs.lookup import Directory, Entry, Name
    from cowfs.ociimage import ImageError, unpack_image
    from cowfs.ocilayer import LayerError, export_layer, import_layer
    from cowfs.union import Union
    from cowfs.whiteout import FormatOptions


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cowfs' has no attribute {name!r}")

__all__ = [
    "ControlError",
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
    "mounts",
    "open_mounted",
    "open_stack",
    "parse_lowerdirs",
    "unpack_image",
]
