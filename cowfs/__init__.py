"""cowfs: a copy-on-write union filesystem in userspace, in the kernel overlayfs format.

The public API: open a layer stack and read the merged tree without FUSE (`Union`), or mount it
(`mounted`, `open_mounted` under trio). docs/library.md shows them at work.
"""

from cowfs.handle import Mounted, MountError, mount_stack, mounted, open_mounted
from cowfs.layers import LayerStack, LayoutError, open_stack, parse_lowerdirs
from cowfs.lookup import Directory, Entry
from cowfs.ociimage import ImageError, unpack_image
from cowfs.ocilayer import LayerError, export_layer, import_layer
from cowfs.union import Union

__version__ = "0.1.0"

__all__ = [
    "Directory",
    "Entry",
    "ImageError",
    "LayerError",
    "LayerStack",
    "LayoutError",
    "MountError",
    "Mounted",
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
