"""A real Debian inside `cowfs run`, as a new user tries it: apt-get, dpkg and useradd with no
extra options, and in a user namespace.

Opt-in, since it needs Debian's mirror: `COWFS_DEBIAN_ROOTFS=$(scripts/debian-rootfs.sh)` builds
(once, then cached) a debootstrap minbase root and names it. The apt-get tests also need the
mirror at test time and skip, saying so, when it cannot be reached; dpkg and useradd do not.
"""

import os
import socket
import urllib.parse
from pathlib import Path

import pytest
from dpkg_rootfs import install_command, make_deb, useradd_command
from test_sandbox import run

pytestmark = [
    pytest.mark.mounts,
    pytest.mark.skipif(not os.environ.get("COWFS_DEBIAN_ROOTFS"),
                       reason="set COWFS_DEBIAN_ROOTFS=$(scripts/debian-rootfs.sh)"),
]

MIRROR = os.environ.get("COWFS_DEBIAN_MIRROR", "http://deb.debian.org/debian")
APT_SCRIPT = ("apt-get update -qq && apt-get install -y -qq python3-minimal >/dev/null && "
              "python3 -c 'import sys; print(sys.version_info[0])' && "
              "stat -c %u:%g /var/cache/apt/archives/partial")


@pytest.fixture(scope="module")
def debian_root() -> Path:
    root = Path(os.environ["COWFS_DEBIAN_ROOTFS"])
    assert (root / "usr/bin/apt-get").exists(), f"{root} is not a Debian root"
    return root


@pytest.fixture(scope="module")
def mirror_reachable() -> None:
    address = urllib.parse.urlsplit(MIRROR)
    try:
        socket.create_connection((address.hostname, address.port or 80), timeout=5).close()
    except OSError as error:
        pytest.skip(f"the Debian mirror {MIRROR} is out of reach: {error}")


@pytest.mark.parametrize("options", [(), ("--userns",)], ids=["default", "userns"])
def test_apt_get_installs_a_package(debian_root: Path, mirror_reachable: None, tmp_path: Path,
                                    options: tuple[str, ...]) -> None:
    """apt drops to its _apt user to fetch: the default capabilities let it, and the files it
    writes land in the upper with the image's ids."""
    upper = tmp_path / "upper"
    result = run("--net", "host", "--upper", str(upper), *options, str(debian_root), "--",
                 "/bin/sh", "-c", APT_SCRIPT)
    assert result.returncode == 0, result.stderr
    apt_user = next(line for line in (debian_root / "etc/passwd").read_text().splitlines()
                    if line.startswith("_apt:")).split(":")[2]
    assert result.stdout.splitlines()[-2:] == ["3", f"{apt_user}:0"]
    assert os.lstat(upper / "var/cache/apt/archives/partial").st_uid == int(apt_user)
    python = os.lstat(upper / "usr/bin" / os.readlink(upper / "usr/bin/python3"))
    assert (python.st_uid, python.st_gid) == (0, 0)
    assert not any((upper / "usr/bin").glob("python3*.dpkg-new"))


@pytest.mark.parametrize("options", [(), ("--userns",)], ids=["default", "userns"])
def test_dpkg_and_useradd_work_in_debian(debian_root: Path, tmp_path: Path,
                                         options: tuple[str, ...]) -> None:
    image = tmp_path / "image"
    image.mkdir()
    os.rename(make_deb(tmp_path), image / "hello.deb")
    upper = tmp_path / "upper"
    result = run("--upper", str(upper), *options, f"{image}:{debian_root}", "--", "/bin/sh",
                 "-c", install_command("/hello.deb") + useradd_command())
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-5:] == [
        "install ok installed", "1:1", "uid=1000(alice) gid=1000(alice) groups=1000(alice)",
        "1000:1000", "1000:1000"]
    home = os.lstat(upper / "home/alice")
    assert (home.st_uid, home.st_gid) == (1000, 1000)
    assert os.lstat(upper / "etc/shadow").st_gid == 42, "shadow stays the shadow group's"
