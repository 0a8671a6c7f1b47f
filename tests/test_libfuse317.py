"""cowfs on libfuse 3.17 (opt-in: tests/libfuse317.py says how): the extension links 3.17 and
a mount runs on it with the extensions active."""

import json
import os
import subprocess
from pathlib import Path

from conftest import mounted_cowfs
from libfuse317 import REQUIRED, launcher, libdir

pytestmark = REQUIRED


def mapped_files(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as maps:
        return {fields[5] for line in maps if len(fields := line.split()) == 6}


def test_the_extension_links_libfuse_317(package_317: Path) -> None:
    [library] = (package_317 / "cowfs").glob("_fuse_extensions*.so")
    environment = {**os.environ, "LD_LIBRARY_PATH": str(libdir())}
    needed = subprocess.run(["ldd", str(library)], env=environment, check=True,
                            capture_output=True, text=True).stdout
    assert f"libfuse3.so.4 => {libdir()}/libfuse3.so.4" in needed, needed


def test_a_mount_runs_on_libfuse_317_with_the_extensions(package_317: Path, layer_dirs) -> None:
    lower, upper, merged = layer_dirs("lower", "upper", "merged")
    (lower / "dir").mkdir()
    (lower / "dir" / "old").write_text("old\n")
    with mounted_cowfs([lower], merged, upper, launcher=launcher(package_317)) as mount:
        assert sorted(os.listdir(merged)) == ["dir"]
        (merged / "dir" / "new").write_text("new\n")
        assert (merged / "dir" / "new").read_text() == "new\n"
        assert sorted(os.listdir(merged / "dir")) == ["new", "old"]
        assert (upper / "dir" / "new").read_text() == "new\n"

        mapped = mapped_files(mount.process.pid)
        library_317 = os.path.realpath(libdir() / "libfuse3.so.4")
        assert library_317 in mapped, sorted(path for path in mapped if "fuse" in path)
        extension = {path for path in mapped if "_fuse_extensions" in path}
        assert extension and all(path.startswith(str(package_317)) for path in extension), \
            extension

        features = json.loads(os.getxattr(merged, "trusted.cowfs.stats"))["kernel_features"]
        assert features["reason"] is None, features
        assert features["cache_listings"] and features["cache_symlinks"], features
        assert features["fallocate"] and features["noflush"], features
        # pyfuse3's operations table (3.14's headers: 352 bytes) is shorter than the
        # library's (3.17's: 360): the session was wrapped all the same.
        assert json.loads(os.getxattr(merged, "trusted.cowfs.stats"))["cached_listing_replies"]
