"""Container images as layer directories: an OCI image layout or a `docker save` tarball.

Each layer becomes DEST/layers/sha256-<diff id>/, named by the digest of its uncompressed tar,
so a layer that two images share is unpacked once, whatever its compression. A layer directory
appears only whole (ocilayer renames it into place after checking its digests), so one that
exists is complete and is skipped. Every digest the image states is checked: the manifest's
(when asked for by digest), the config's, each blob's, and each layer's diff id against the
config's `rootfs.diff_ids`.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import re
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from cowfs import ocilayer
from cowfs.layers import format_lowerdirs

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
CONTAINERD_NAME_ANNOTATION = "io.containerd.image.name"
INDEX_MEDIA_TYPES = ("application/vnd.oci.image.index.v1+json",
                     "application/vnd.docker.distribution.manifest.list.v2+json")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_BLOB_PATH = re.compile(r"(?:.*/)?blobs/sha256/([0-9a-f]{64})")
_LEGACY_CONFIG_PATH = re.compile(r"([0-9a-f]{64})\.json")
# Go's names for the machine, as image platforms spell them.
_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386",
                  "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


class ImageError(Exception):
    """An image that cannot be unpacked; the message is one line for the user."""


@dataclasses.dataclass
class UnpackResult:
    layers: list[str]        # layer directories, bottom first (the image's order)
    lowerdir: str            # top first, colon-separated, for `cowfs mount` and overlayfs
    lowerdir_file: str       # where the lowerdir string was written
    unpacked: int            # layers unpacked now; the others were there already


@dataclasses.dataclass
class _Layer:
    path: str                # the blob, in the image's storage
    blob_digest: str | None  # None where the image does not say (old docker save layers)
    diff_id: str


def unpack_image(source: str, destination: str, *, ref: str | None = None,
                 whiteouts: str = "kernel",
                 progress: Callable[[str], None] | None = None) -> UnpackResult:
    """Unpack the image at *source* (a layout directory or a tarball) under *destination*."""
    report = progress or (lambda _line: None)
    with _open_storage(source) as storage:
        name, layers = _read_image(storage, source, ref)
        layer_root = os.path.join(os.path.abspath(destination), "layers")
        os.makedirs(layer_root, exist_ok=True)
        directories: list[str] = []
        unpacked = 0
        for number, layer in enumerate(layers, 1):
            target = os.path.join(layer_root, "sha256-" + _hex(layer.diff_id))
            label = f"layer {number}/{len(layers)} {layer.diff_id[:19]}"
            if os.path.isdir(target):
                report(f"{label}: already unpacked")
            else:
                _unpack_layer(storage, layer, target, label, report, whiteouts)
                unpacked += 1
            directories.append(target)
    lowerdir = format_lowerdirs(list(reversed(directories)))
    lowerdir_file = os.path.join(destination, f"{_file_name(name)}.lowerdir")
    _write_atomically(lowerdir_file, lowerdir + "\n")
    return UnpackResult(directories, lowerdir, lowerdir_file, unpacked)


def _read_image(storage: "_Storage", source: str, ref: str | None) -> tuple[str, list[_Layer]]:
    """The image's name and layers, bottom first; a malformed document is an ImageError."""
    try:
        if storage.exists("manifest.json"):
            return _docker_image(storage, ref)
        if storage.exists("index.json"):
            return _oci_image(storage, ref)
    except ocilayer.LayerError as exc:           # a path in a document that leaves the image
        raise ImageError(str(exc)) from None
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ImageError(f"malformed image document in {source}: {exc!r}") from None
    raise ImageError(f"{source} is neither an OCI image layout (index.json) nor a "
                     f"docker save archive (manifest.json)")


def _hex(digest: str) -> str:
    match = _DIGEST.fullmatch(digest)
    if match is None:
        raise ImageError(f"unsupported or malformed digest {digest!r} (expected sha256:HEX)")
    return match.group(1)


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "image"


def _write_atomically(path: str, text: str) -> None:
    handle, partial = tempfile.mkstemp(prefix=".lowerdir.", dir=os.path.dirname(path))
    try:
        with os.fdopen(handle, "w") as output:
            output.write(text)
        os.chmod(partial, 0o644)
        os.rename(partial, path)
    except BaseException:
        os.unlink(partial)
        raise


def _unpack_layer(storage: "_Storage", layer: _Layer, target: str, label: str,
                  report: Callable[[str], None], whiteouts: str) -> None:
    def verify(digests: ocilayer.LayerDigests) -> None:
        if layer.blob_digest is not None and digests.blob_digest != layer.blob_digest:
            raise ImageError(f"{label}: blob {layer.path} has digest {digests.blob_digest}, "
                             f"expected {layer.blob_digest}")
        if digests.diff_id != layer.diff_id:
            raise ImageError(f"{label}: the uncompressed layer has digest {digests.diff_id}, "
                             f"but the config's diff_id is {layer.diff_id}")

    started = time.monotonic()
    with storage.open(layer.path) as blob:
        try:
            digests = ocilayer.import_layer(blob, target, whiteouts=whiteouts, verify=verify)
        except ocilayer.LayerError as exc:
            if os.path.isdir(target):   # another unpack of a shared layer came first
                report(f"{label}: unpacked by another process")
                return
            raise ImageError(f"{label}: {exc}") from None
    report(f"{label}: {digests.blob_bytes} bytes ({digests.tar_bytes} uncompressed), "
           f"unpacked in {time.monotonic() - started:.1f} s")


# -- where the image is -----------------------------------------------------------------------


class _Storage:
    """Files of an image by relative path, in a directory or inside a tar."""

    def exists(self, path: str) -> bool:
        raise NotImplementedError

    def open(self, path: str) -> BinaryIO:
        raise NotImplementedError

    def read(self, path: str, digest: str | None = None) -> bytes:
        """The whole (small) file, checked against *digest* when one is given."""
        with self.open(path) as stream:
            data = stream.read()
        if digest is not None:
            actual = "sha256:" + hashlib.sha256(data).hexdigest()
            if actual != digest:
                raise ImageError(f"{path} has digest {actual}, expected {digest}")
        return data

    def read_json(self, path: str, digest: str | None = None) -> Any:
        try:
            return json.loads(self.read(path, digest))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ImageError(f"{path} is not valid JSON: {exc}") from None


class _Directory(_Storage):
    def __init__(self, root: str) -> None:
        self.root = root

    def _path(self, path: str) -> str:
        components = ocilayer.split_member_name(path, "image path")
        return os.path.join(self.root, *components)

    def exists(self, path: str) -> bool:
        return os.path.isfile(self._path(path))

    def open(self, path: str) -> BinaryIO:
        try:
            return open(self._path(path), "rb")
        except OSError as exc:
            raise ImageError(f"cannot read {path} in the image: {exc.strerror}") from None


class _Archive(_Storage):
    def __init__(self, archive: tarfile.TarFile) -> None:
        self.archive = archive
        self.members = {"/".join(ocilayer.split_member_name(member.name, "image path")): member
                        for member in archive.getmembers() if member.isreg()}

    def exists(self, path: str) -> bool:
        return "/".join(ocilayer.split_member_name(path, "image path")) in self.members

    def open(self, path: str) -> BinaryIO:
        member = self.members.get("/".join(ocilayer.split_member_name(path, "image path")))
        stream = self.archive.extractfile(member) if member is not None else None
        if stream is None:
            raise ImageError(f"{path} is missing from the image archive")
        return stream  # type: ignore[return-value]


@contextlib.contextmanager
def _open_storage(source: str) -> Iterator[_Storage]:
    if os.path.isdir(source):
        yield _Directory(source)
        return
    try:
        archive = tarfile.open(source, "r:*")  # noqa: SIM115 (closed by the with below)
    except (OSError, tarfile.TarError) as exc:
        raise ImageError(f"cannot read image {source}: {exc}") from None
    with archive:
        try:
            yield _Archive(archive)
        except (tarfile.TarError, EOFError) as exc:
            raise ImageError(f"cannot read image {source}: {exc}") from None


# -- OCI image layout -------------------------------------------------------------------------


def _blob_path(digest: str) -> str:
    return f"blobs/sha256/{_hex(digest)}"


def _oci_image(storage: _Storage, ref: str | None) -> tuple[str, list[_Layer]]:
    index = storage.read_json("index.json")
    descriptor = _choose_manifest(index.get("manifests", []), ref)
    name = ref or descriptor.get("annotations", {}).get(REF_NAME_ANNOTATION) or "image"
    while descriptor.get("mediaType") in INDEX_MEDIA_TYPES:
        nested = storage.read_json(_blob_path(descriptor["digest"]), descriptor["digest"])
        descriptor = _choose_platform(nested.get("manifests", []))
    manifest = storage.read_json(_blob_path(descriptor["digest"]), descriptor["digest"])
    config_digest = manifest.get("config", {}).get("digest", "")
    config = storage.read_json(_blob_path(config_digest), config_digest)
    blobs = [(_blob_path(layer["digest"]), layer["digest"], layer.get("mediaType", ""))
             for layer in manifest.get("layers", [])]
    for _, digest, media_type in blobs:
        if "encrypted" in media_type:
            raise ImageError(f"layer {digest} is encrypted ({media_type}): not supported")
    return name, _pair_with_diff_ids([(path, digest) for path, digest, _ in blobs], config)


def _choose_manifest(manifests: list[dict[str, Any]], ref: str | None) -> dict[str, Any]:
    if ref is not None and ref.startswith("sha256:"):
        found = [item for item in manifests if item.get("digest") == ref]
    elif ref is not None:
        found = [item for item in manifests
                 if ref in (item.get("annotations", {}).get(REF_NAME_ANNOTATION),
                            item.get("annotations", {}).get(CONTAINERD_NAME_ANNOTATION))]
    else:
        found = manifests
    if len(found) == 1:
        return found[0]
    names = sorted({item.get("annotations", {}).get(REF_NAME_ANNOTATION) or item.get("digest")
                    for item in manifests})
    if not found:
        raise ImageError(f"no image {ref!r} in the layout; it holds: {', '.join(names)}")
    raise ImageError(f"the layout holds several images, choose one with --ref: "
                     f"{', '.join(names)}")


def _choose_platform(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    architecture = _ARCHITECTURES.get(platform.machine(), platform.machine())
    for item in manifests:
        wanted = item.get("platform", {})
        if wanted.get("os") == "linux" and wanted.get("architecture") == architecture:
            return item
    raise ImageError(f"the image index has no manifest for linux/{architecture}")


def _pair_with_diff_ids(blobs: list[tuple[str, str | None]], config: Any) -> list[_Layer]:
    diff_ids = config.get("rootfs", {}).get("diff_ids", []) if isinstance(config, dict) else []
    if len(diff_ids) != len(blobs):
        raise ImageError(f"the manifest lists {len(blobs)} layers but the config has "
                         f"{len(diff_ids)} diff_ids")
    layers = []
    for (path, digest), diff_id in zip(blobs, diff_ids, strict=True):
        _hex(diff_id)                # checked before it names a directory
        layers.append(_Layer(path, digest, diff_id))
    return layers


# -- docker save ------------------------------------------------------------------------------


def _docker_image(storage: _Storage, ref: str | None) -> tuple[str, list[_Layer]]:
    entries = storage.read_json("manifest.json")
    if not isinstance(entries, list) or not entries:
        raise ImageError("manifest.json lists no image")
    entry = _choose_docker_entry(storage, entries, ref)
    config_path = entry.get("Config", "")
    config = storage.read_json(config_path, _digest_in_path(config_path))
    blobs = [(path, _digest_in_path(path)) for path in entry.get("Layers", [])]
    tags = entry.get("RepoTags") or []
    return ref or (tags[0] if tags else "image"), _pair_with_diff_ids(blobs, config)


def _digest_in_path(path: str) -> str | None:
    """The digest a content-addressed name states (`blobs/sha256/HEX`, `HEX.json`)."""
    for pattern in (_BLOB_PATH, _LEGACY_CONFIG_PATH):
        match = pattern.fullmatch(path)
        if match is not None:
            return "sha256:" + match.group(1)
    return None


def _choose_docker_entry(storage: _Storage, entries: list[dict[str, Any]],
                         ref: str | None) -> dict[str, Any]:
    if ref is None:
        if len(entries) == 1:
            return entries[0]
        tags = sorted(tag for entry in entries for tag in entry.get("RepoTags") or [])
        raise ImageError(f"the archive holds several images, choose one with --ref: "
                         f"{', '.join(tags)}")
    for entry in entries:
        if ref.startswith("sha256:"):
            config = entry.get("Config", "")
            digest = _digest_in_path(config) or \
                "sha256:" + hashlib.sha256(storage.read(config)).hexdigest()
            if digest == ref:
                return entry
        elif ref in (entry.get("RepoTags") or []) or f"{ref}:latest" in (
                entry.get("RepoTags") or []):
            return entry
    raise ImageError(f"no image {ref!r} in the archive")
