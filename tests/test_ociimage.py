"""Images as layer directories (cowfs.ociimage): OCI layouts and docker save tarballs, built by
the tests with tarfile and by real tools (umoci, skopeo)."""

import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import cowfs_command
from oci_tars import add_image, digest, member, tar_bytes

from cowfs import ociimage
from cowfs.ociimage import ImageError

BASE = tar_bytes([member("etc/", tarfile.DIRTYPE), member("etc/os", data=b"base\n"),
                  member("etc/old", data=b"old\n")])
APP = tar_bytes([member("etc/.wh.old"), member("app/", tarfile.DIRTYPE),
                 member("app/run", data=b"#!/bin/sh\n", mode=0o755)])
OTHER = tar_bytes([member("other", data=b"other\n")])


def layer_dir(destination: Path, layer: bytes) -> Path:
    return destination / "layers" / ("sha256-" + digest(layer).split(":")[1])


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_layout_unpacks_to_layer_directories(tmp_path: Path, compression: str | None) -> None:
    layout = tmp_path / "layout"
    add_image(layout, "v1", [BASE, APP], compression)
    result = ociimage.unpack_image(str(layout), str(tmp_path / "dest"), ref="v1")
    base, app = layer_dir(tmp_path / "dest", BASE), layer_dir(tmp_path / "dest", APP)
    assert result.layers == [str(base), str(app)]
    assert result.lowerdir == f"{app}:{base}"            # topmost first
    assert Path(result.lowerdir_file).read_text() == result.lowerdir + "\n"
    assert Path(result.lowerdir_file).name == "v1.lowerdir"
    assert (base / "etc/os").read_bytes() == b"base\n"
    assert stat.S_ISCHR((app / "etc/old").lstat().st_mode)
    assert (app / "app/run").stat().st_mode & 0o777 == 0o755


def test_shared_layers_are_unpacked_once(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    add_image(layout, "one", [BASE, APP])
    add_image(layout, "two", [BASE, OTHER], "gzip")   # the same diff id, compressed otherwise
    destination = tmp_path / "dest"
    lines: list[str] = []
    first = ociimage.unpack_image(str(layout), str(destination), ref="one", progress=lines.append)
    inode = layer_dir(destination, BASE).stat().st_ino
    second = ociimage.unpack_image(str(layout), str(destination), ref="two",
                                   progress=lines.append)
    assert (first.unpacked, second.unpacked) == (2, 1)
    assert layer_dir(destination, BASE).stat().st_ino == inode
    assert "already unpacked" in lines[2] and "bytes" in lines[0]
    assert sorted(os.listdir(destination / "layers")) == sorted(
        "sha256-" + digest(layer).split(":")[1] for layer in (BASE, APP, OTHER))
    with pytest.raises(ImageError, match="several images"):
        ociimage.unpack_image(str(layout), str(destination))


def test_manifest_chosen_by_digest(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    add_image(layout, "one", [BASE])
    manifest = add_image(layout, "two", [OTHER])
    result = ociimage.unpack_image(str(layout), str(tmp_path / "dest"), ref=manifest)
    assert result.layers == [str(layer_dir(tmp_path / "dest", OTHER))]
    with pytest.raises(ImageError, match="no image"):
        ociimage.unpack_image(str(layout), str(tmp_path / "dest"), ref="three")


def test_corrupt_blob_is_refused(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    add_image(layout, "v1", [BASE, APP])
    blob = layout / "blobs/sha256" / digest(BASE).split(":")[1]
    blob.write_bytes(blob.read_bytes().replace(b"base\n", b"evil\n"))   # still a valid tar
    with pytest.raises(ImageError, match=f"blob .* has digest .*, expected {digest(BASE)}"
                       ) as raised:
        ociimage.unpack_image(str(layout), str(tmp_path / "dest"))
    assert "\n" not in str(raised.value)
    assert os.listdir(tmp_path / "dest" / "layers") == []


def test_diff_id_mismatch_is_refused(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    add_image(layout, "v1", [BASE, APP], "zstd", diff_ids=[digest(BASE), digest(OTHER)])
    destination = tmp_path / "dest"
    with pytest.raises(ImageError, match="diff_id") as raised:
        ociimage.unpack_image(str(layout), str(destination))
    assert digest(OTHER) in str(raised.value)
    assert os.listdir(destination / "layers") == [layer_dir(destination, BASE).name]
    assert not list(destination.glob("*.lowerdir"))


def test_hostile_diff_id_names_no_directory(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    add_image(layout, "v1", [BASE], diff_ids=["sha256:../../escape"])
    with pytest.raises(ImageError, match="malformed digest"):
        ociimage.unpack_image(str(layout), str(tmp_path / "dest"))
    assert not (tmp_path / "escape").exists()


def docker_save_archive(path: Path, layers: list[bytes], tag: str) -> None:
    """The classic `docker save` form: manifest.json, <id>/layer.tar, <config digest>.json."""
    config = json.dumps({"rootfs": {"type": "layers",
                                    "diff_ids": [digest(layer) for layer in layers]}}).encode()
    config_name = digest(config).split(":")[1] + ".json"
    files = {config_name: config}
    names = []
    for number, layer in enumerate(layers):
        name = f"{number:064x}/layer.tar"
        files[name] = layer
        names.append(name)
    files["manifest.json"] = json.dumps(
        [{"Config": config_name, "RepoTags": [tag], "Layers": names}]).encode()
    with tarfile.open(path, "w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_docker_save_archive(tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    docker_save_archive(archive, [BASE, APP], "app:1.0")
    result = ociimage.unpack_image(str(archive), str(tmp_path / "dest"), ref="app:1.0")
    assert result.layers == [str(layer_dir(tmp_path / "dest", layer)) for layer in (BASE, APP)]
    assert Path(result.lowerdir_file).name == "app_1.0.lowerdir"


def test_cli_prints_lowerdir_and_progress(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    add_image(layout, "v1", [BASE, APP], "gzip")
    result = subprocess.run(cowfs_command("image", "unpack", str(layout), str(tmp_path / "d")),
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    app, base = layer_dir(tmp_path / "d", APP), layer_dir(tmp_path / "d", BASE)
    assert result.stdout == f"{app}:{base}\n"
    lines = result.stderr.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"layer 1/2 {digest(BASE)[:19]}: ") and "bytes" in lines[0]
    assert lines[1].startswith(f"layer 2/2 {digest(APP)[:19]}: ")
    bad = subprocess.run(cowfs_command("image", "unpack", str(tmp_path), str(tmp_path / "d")),
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def need_tools(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing and not os.environ.get("CI"):
        pytest.skip(f"needs {', '.join(missing)} (scripts/install.sh installs them)")


def build_with_umoci(tmp_path: Path) -> Path:
    """An image made by a real OCI tool: two layers, the second deletes and replaces."""
    need_tools("umoci")
    layout, bundle = tmp_path / "umoci-layout", tmp_path / "bundle"

    def umoci(*arguments: str) -> None:
        subprocess.run(["umoci", *arguments], check=True, capture_output=True)

    umoci("init", "--layout", str(layout))
    umoci("new", "--image", f"{layout}:latest")
    umoci("unpack", "--image", f"{layout}:latest", str(bundle))
    rootfs = bundle / "rootfs"
    (rootfs / "etc").mkdir()
    (rootfs / "etc/os").write_text("umoci base\n")
    (rootfs / "etc/gone").write_text("to be deleted\n")
    (rootfs / "data/sub").mkdir(parents=True)
    (rootfs / "data/sub/a").write_text("a\n")
    os.symlink("../etc/os", rootfs / "data/os-link")
    umoci("repack", "--refresh-bundle", "--image", f"{layout}:latest", str(bundle))
    (rootfs / "etc/gone").unlink()
    shutil.rmtree(rootfs / "data/sub")
    (rootfs / "data/sub").mkdir()
    (rootfs / "data/sub/b").write_text("b\n")
    (rootfs / "etc/new").write_text("new\n")
    umoci("repack", "--refresh-bundle", "--image", f"{layout}:latest", str(bundle))
    return layout


def test_umoci_and_skopeo_images_share_their_layers(tmp_path: Path) -> None:
    layout = build_with_umoci(tmp_path)
    destination = tmp_path / "dest"
    result = ociimage.unpack_image(str(layout), str(destination), ref="latest")
    assert len(result.layers) == 2 and result.unpacked == 2
    top = Path(result.layers[1])
    assert stat.S_ISCHR((top / "etc/gone").lstat().st_mode)
    need_tools("skopeo")
    archive = tmp_path / "docker.tar"
    subprocess.run(["skopeo", "copy", f"oci:{layout}:latest",
                    f"docker-archive:{archive}:cowfs/test:latest"],
                   check=True, capture_output=True)
    again = ociimage.unpack_image(str(archive), str(destination))
    assert again.layers == result.layers and again.unpacked == 0


def test_hostile_and_malformed_documents(tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    docker_save_archive(archive, [BASE], "app:1")
    with tarfile.open(archive, "a") as output:
        data = json.dumps([{"Config": "../../etc/passwd", "Layers": []}]).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        output.addfile(info, io.BytesIO(data))    # the later member wins
    with pytest.raises(ImageError, match="refused image path"):
        ociimage.unpack_image(str(archive), str(tmp_path / "dest"))
    layout = tmp_path / "layout"
    layout.mkdir()
    (layout / "index.json").write_text('{"manifests": [{"mediaType": "x"}]}')
    with pytest.raises(ImageError, match="malformed"):
        ociimage.unpack_image(str(layout), str(tmp_path / "dest"))
