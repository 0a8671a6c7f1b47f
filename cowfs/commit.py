"""Save what a run changed (its upper layer) as a new read-only layer directory.

The upper is already in the kernel overlay format, which cowfs and the kernel both read in a
lower layer: whiteouts, opaque directories and redirects keep their meaning when the new layer
is stacked on the same lowers. Two things do not travel: metadata-only copies (their data is in
the lowers, and a lower layer's metacopy is not followed) get their data from the merged view,
and cowfs's private bookkeeping xattrs are dropped. An upper holding a `.wh.` name (which cowfs
never makes, but the kernel's overlay lets a user make) is refused: stacked as a lower, the new
layer would read it as an OCI whiteout or opaque marker.
"""

import logging
import os
import shutil
import subprocess

from cowfs import whiteout

log = logging.getLogger(__name__)

_PRIVATE_KEYS = (whiteout.ORIGIN_INO, whiteout.LINK_COUNT, whiteout.METACOPY)


class CommitError(Exception):
    """The layer could not be written; nothing is left at the target."""


def commit_upper(upper: str, merged: str, target: str) -> None:
    """Write the upper's changes to *target* (which must not exist), made whole or not at all.

    *merged* is the live mount, read for the data of metadata-only copies.
    """
    if os.path.lexists(target):
        raise CommitError(f"layer directory {target} exists already")
    staging = f"{target}.cowfs-partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        # cp -a keeps what a layer is made of: devices (whiteouts), xattrs, owners, times,
        # hard links within the tree, sparse files.
        copied = subprocess.run(["cp", "-a", "--reflink=auto", "--sparse=always", upper, staging],
                                capture_output=True, text=True, check=False)
        if copied.returncode != 0:
            raise CommitError(f"cannot copy {upper}: {copied.stderr.strip()}")
        _make_self_contained(staging, merged)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("committed %s as layer %s", upper, target)


def _overlay_names(*keys: str) -> set[str]:
    return {prefix + key for prefix in whiteout.OVERLAY_XATTR_PREFIXES for key in keys}


_PRIVATE = _overlay_names(*_PRIVATE_KEYS)
_METACOPY = _overlay_names(whiteout.METACOPY)
_REDIRECT = _overlay_names(whiteout.REDIRECT)   # a file's points at its metacopy data


def _make_self_contained(layer: str, merged: str) -> None:
    for directory, subdirectories, files in os.walk(layer):
        for name in [*subdirectories, *files]:
            path = os.path.join(directory, name)
            if whiteout.is_oci_name(name):
                raise CommitError(f"cannot commit {os.path.relpath(path, layer)}: a lower "
                                  f"layer reads this name as a whiteout")
            stored = set(os.listxattr(path, follow_symlinks=False))
            if stored & _METACOPY:
                _fill_data(path, os.path.join(merged, os.path.relpath(path, layer)))
            dropped = _PRIVATE if name in subdirectories else _PRIVATE | _REDIRECT
            for attribute in stored & dropped:
                os.removexattr(path, attribute, follow_symlinks=False)


def _fill_data(path: str, merged_path: str) -> None:
    """A metadata-only copy gets its data, read through the merged view; times are kept."""
    st = os.lstat(path)
    with open(merged_path, "rb") as source, open(path, "r+b") as target:
        shutil.copyfileobj(source, target, 1 << 20)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
