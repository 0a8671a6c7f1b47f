"""cowfs on libfuse 3.17, opt-in: COWFS_LIBFUSE_317=PREFIX, a prefix scripts/libfuse-3.17.sh
built (it prints it). The tests that need it are skipped without it.

The kernel-cache extensions are built against 3.17's headers into a scratch copy of the
package (library_path() looks beside the module, and the source tree's build must stay as it
is), and the daemon runs from that copy with LD_LIBRARY_PATH at 3.17's library. pyfuse3 is
linked against 3.14's soname (libfuse3.so.3; 3.17's is libfuse3.so.4), so 3.14 is mapped too;
its libfuse calls bind to 3.17 through the extension library, loaded RTLD_GLOBAL first.
The `package_317` fixture (conftest.py) builds the copy once per session.
"""

import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cowfs

PREFIX = os.environ.get("COWFS_LIBFUSE_317")

# What a module of 3.17 tests puts in its pytestmark.
REQUIRED = [
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


def build_package(root: Path) -> Path:
    """A copy of the cowfs package under *root* with the extensions built against 3.17: the
    PYTHONPATH to run it with."""
    assert pkg_config("--modversion") == ["3.17.2"], "COWFS_LIBFUSE_317 is not libfuse 3.17.2"
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
    """The command that runs cowfs from *package* on 3.17, for conftest.mounted_cowfs."""
    # -P: no current directory on sys.path, which would put the source tree's cowfs first.
    return ["env", f"PYTHONPATH={package}", f"LD_LIBRARY_PATH={libdir()}",
            sys.executable, "-P", "-m", "cowfs"]
