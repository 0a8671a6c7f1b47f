"""Layer tars and image layouts built with tarfile, for the OCI tests."""

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import zstandard


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **fields: object
           ) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = 1_600_000_000
    if kind in tarfile.REGULAR_TYPES:
        info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.type in tarfile.REGULAR_TYPES
                            else None)
    return buffer.getvalue()


def compress(data: bytes, compression: str | None) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


MEDIA_TYPES = {None: "application/vnd.oci.image.layer.v1.tar",
               "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
               "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


def write_blob(layout: Path, data: bytes) -> str:
    blob_digest = digest(data)
    path = layout / "blobs" / "sha256" / blob_digest.split(":")[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return blob_digest


def add_image(layout: Path, tag: str, layers: list[bytes],
              compression: str | None = None, diff_ids: list[str] | None = None) -> str:
    """Add an image of plain layer tars (bottom first) to an OCI layout; returns the manifest
    digest. *diff_ids* overrides the config's (to test a mismatch)."""
    layout.mkdir(exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    descriptors = []
    for layer in layers:
        blob = compress(layer, compression)
        descriptors.append({"mediaType": MEDIA_TYPES[compression], "size": len(blob),
                            "digest": write_blob(layout, blob)})
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": diff_ids or [digest(layer) for layer in layers]}}).encode()
    manifest = json.dumps({"schemaVersion": 2,
                           "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "size": len(config), "digest": write_blob(layout, config)},
                           "layers": descriptors}).encode()
    manifest_digest = write_blob(layout, manifest)
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {
        "schemaVersion": 2, "manifests": []}
    index["manifests"].append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "digest": manifest_digest, "size": len(manifest),
                               "annotations": {"org.opencontainers.image.ref.name": tag}})
    index_path.write_text(json.dumps(index))
    return manifest_digest
