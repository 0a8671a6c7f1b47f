"""Build cowfs's one C library, the kernel-cache extensions (cowfs/_fuse_extensions.c).

It is optional: without a C compiler or libfuse3's headers cowfs still installs, and a mount
says it runs without the extensions. It is loaded with ctypes (no Python API inside), so it is
built as an extension only to ride on pip's ordinary build, editable installs included.
"""

import subprocess

from setuptools import Extension, setup


def _pkg_config(*arguments: str) -> list[str] | None:
    try:
        result = subprocess.run(["pkg-config", *arguments, "fuse3"], capture_output=True,
                                text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.split()


def _extensions() -> list[Extension]:
    cflags, libs = _pkg_config("--cflags"), _pkg_config("--libs")
    if cflags is None or libs is None:
        print("cowfs: pkg-config finds no fuse3: building without the kernel-cache extensions")
        return []
    return [Extension(
        "cowfs._fuse_extensions", sources=["cowfs/_fuse_extensions.c"],
        extra_compile_args=[*cflags, "-fvisibility=hidden", "-Wall", "-Wextra"],
        # libfuse must stay a dependency although nothing calls it by name: dlsym(RTLD_NEXT)
        # finds the real functions there.
        extra_link_args=["-Wl,--no-as-needed", *libs, "-ldl"],
        optional=True)]


setup(ext_modules=_extensions())
