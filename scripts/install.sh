#!/usr/bin/env bash
# Install what cowfs needs, only what is missing: system packages, then a virtualenv with cowfs.
# Idempotent: a second run checks and does nothing. Needs root for the system packages.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'install: %s\n' "$*"; }

# podman, runc, conmon: tests/test_podman.py (runc named, or podman's "crun | runc" picks crun,
# which refuses this machine kind's hybrid cgroup layout); skopeo, umoci: OCI layouts;
# fuse-overlayfs, fio: the benchmark harness's peer and random-read load; libseccomp2: the
# syscall filter of `cowfs run` (pyseccomp loads it); libc6-dev: tests build a static probe.
packages=(fuse3 libfuse3-dev pkg-config gcc libc6-dev libseccomp2 busybox-static podman runc
          conmon skopeo umoci fuse-overlayfs fio)
python=${PYTHON:-python3}
command -v "$python" >/dev/null || packages+=(python3)
if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then packages+=(python3-venv); fi
if ! "$python" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(
        os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then
    packages+=(python3-dev)
fi

missing=()
for package in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || missing+=("$package")
done
if ((${#missing[@]})); then
    if [[ $(id -u) != 0 ]]; then
        say "missing system packages: ${missing[*]} (run as root to install them)" >&2
        exit 1
    fi
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[[ -e /dev/fuse ]] || modprobe fuse 2>/dev/null || say "warning: /dev/fuse is missing" >&2

# The C extensions are built by pip too: a change to them (or to the build) reinstalls.
stamp=".venv/.installed-$(cat pyproject.toml setup.py cowfs/_fuse_extensions.c bin/cowfs \
    scripts/install.sh | sha256sum | cut -c1-16)"
if [[ ! -e $stamp ]]; then
    [[ -x .venv/bin/python ]] || { say "creating .venv"; "$python" -m venv .venv; }
    say "installing cowfs into .venv"
    # editable_mode=compat: a plain path in a .pth, not an import hook that costs every
    # `cowfs` command 10-20 ms of start-up (pathlib, urllib, ipaddress).
    PIP_DISABLE_PIP_VERSION_CHECK=1 .venv/bin/pip install -q -e '.[test]' \
        --config-settings editable_mode=compat 2>&1 \
        | grep -v "^WARNING: Location" || true
    .venv/bin/python -c 'import cowfs, pyfuse3, trio' # fails loudly if the install did not work
    # Optional for a pip install elsewhere, but this install has what they need: insist.
    .venv/bin/python -c 'from cowfs import fuse_extensions as e; assert e.library_path(), \
        "the kernel-cache extensions were not built (see the pip output above)"'
    rm -f .venv/.installed-*
    touch "$stamp"
fi
# pip compiles what it installs, but not an editable install's sources: they compile at first
# import, and under PYTHONDONTWRITEBYTECODE=1 at every import, so that each `cowfs` command
# would compile the client (~3 ms) and each cold one all of cowfs. A no-op when up to date.
.venv/bin/python -m compileall -q cowfs
# The `cowfs` command in C (cowfs/launcher.c): a warm command without starting Python (10-15
# ms of a 30 ms mount). It takes the place of the Python launcher pip wrote (which it runs for
# everything it does not serve itself), built again when pip rewrote it or its source changed.
launcher=.venv/bin/cowfs
if [[ ! -x $launcher || $(head -c 2 "$launcher" | tr -d '\0') == '#!' \
      || cowfs/launcher.c -nt $launcher || scripts/install.sh -nt $launcher ]]; then
    IFS=$'\n' read -r -d '' interpreter prefix package source_stamp < <(.venv/bin/python -c '
import os, sys
from cowfs import client
source = os.stat(os.path.join(client.package_directory(), "launcher.c"))
print(sys.executable, sys.prefix, client.package_directory(),
      f"{source.st_size}:{source.st_mtime_ns}", sep="\n")') || true
    # Without it the Python launcher stays: the same commands, a Python start slower each.
    if gcc -O2 -Wall -Wextra -o "$launcher.new" cowfs/launcher.c \
            -DCOWFS_PYTHON="\"$interpreter\"" -DCOWFS_PREFIX="\"$prefix\"" \
            -DCOWFS_PACKAGE="\"$package\"" -DCOWFS_SOURCE_STAMP="\"$source_stamp\""; then
        mv "$launcher.new" "$launcher"
    else
        say "warning: the C launcher did not build; .venv/bin/cowfs stays the Python one" >&2
    fi
fi
