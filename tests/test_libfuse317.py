"""cowfs on libfuse 3.17, opt-in: COWFS_LIBFUSE_317=PREFIX, a prefix scripts/libfuse-3.17.sh
built (it prints it). Skipped without it.

The kernel-cache extensions are built against 3.17's headers into a scratch copy of the
package (library_path() looks beside the module, and the source tree's build must stay as it
is), and the daemon runs from that copy with LD_LIBRARY_PATH at 3.17's library. pyfuse3 is
linked against 3.14's soname (libfuse3.so.3; 3.17's is libfuse3.so.4), so 3.14 is mapped too;
its libfuse calls bind to 3.17 through the extension library, loaded RTLD_GLOBAL first.
"""

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import mounted_cowfs

import cowfs

PREFIX = os.environ.get("COWFS_LIBFUSE_317")

pytestmark = [
    pytest.mark.mounts,
    pytest.mark.skipif(not PREFIX, reason="COWFS_LIBFUSE_317 is not set to a libfuse 3.17 "
                                          "prefix (scripts/libfuse-3.17.sh prints one)"),
]



def libdir() -> Path:
    assert PREFIX
    return Path(PREFIX) / "lib" / "x86_64-linux-gnu"


def pkg_config(*arguments: str) -> list[str]:
    environment = {**os.environ, "PKG_CONFIG_PATH": str(libdir() / "pkgconfig")}
    return subprocess.run(["pkg-config", *arguments, "fuse3"], env=environment, check=True,
                          capture_output=True, text=True).stdout.split()


@pytest.fixture(scope="module")
def package_317(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the cowfs package with the extensions built against 3.17: the PYTHONPATH."""
    assert pkg_config("--modversion") == ["3.17.2"], "COWFS_LIBFUSE_317 is not libfuse 3.17.2"
    root = tmp_path_factory.mktemp("cowfs317")
    source = Path(cowfs.__file__).parent
    shutil.copytree(source, root / "cowfs",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    library = root / "cowfs" / ("_fuse_extensions" + importlib.machinery.EXTENSION_SUFFIXES[0])
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-fvisibility=hidden", "-Wall", "-Wextra",
                    *pkg_config("--cflags"), "-o", str(library),
                    str(source / "_fuse_extensions.c"),
                    "-Wl,--no-as-needed", *pkg_config("--libs"), "-ldl"],
                   check=True, capture_output=True, text=True)
    return root


def launcher(package: Path) -> list[str]:
    # -P: no current directory on sys.path, which would put the source tree's cowfs first.
    return ["env", f"PYTHONPATH={package}", f"LD_LIBRARY_PATH={libdir()}",
            sys.executable, "-P", "-m", "cowfs"]


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
