"""A few-MB root filesystem, copied from the host's own dpkg and busybox, and a tiny .deb, so a
test can run a real `dpkg -i` (unpack, fsync, rename, postinst chown) and `useradd` (lock files
made by hard links, /etc/passwd replaced by a rename, a home chowned) on a cowfs mount without
debootstrap or the network."""

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

BUSYBOX = "/usr/bin/busybox"
# Dynamically linked host programs: dpkg forks dpkg-deb to read the archive and dpkg-split to
# check for a split one, and refuses to run unless start-stop-daemon is on PATH; dpkg-deb
# extracts control.tar with GNU tar (it passes --warning=no-timestamp, which busybox rejects).
LINKED_PROGRAMS = ("/usr/bin/dpkg", "/usr/bin/dpkg-deb", "/usr/bin/dpkg-query",
                   "/usr/bin/dpkg-split", "/usr/sbin/start-stop-daemon", "/usr/bin/tar",
                   "/usr/sbin/useradd")
# Static, so no libraries: dpkg's PATH check insists on ldconfig too.
STATIC_PROGRAMS = ("/usr/sbin/ldconfig",)
# The shell and the tools dpkg, dpkg-deb and maintainer scripts call, plus a few for the tests
# (busybox's own dpkg, dpkg-deb and tar applets are left out: the real ones are copied).
APPLETS = ("sh", "rm", "mv", "cp", "ln", "mkdir", "rmdir", "chmod", "chown", "chgrp", "cat",
           "ls", "id", "touch", "diff", "find", "grep", "sed", "stat", "echo", "test",
           "[", "true", "false", "env", "readlink", "head", "tail", "wc", "sync", "xargs")
# Debian 12 is usr-merged; the loader and ldd's paths go through these links.
USR_MERGE = {"bin": "usr/bin", "lib": "usr/lib", "lib64": "usr/lib64", "sbin": "usr/sbin"}
PASSWD = ("root:x:0:0:root:/root:/bin/sh\n"
          "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
          "_apt:x:42:65534::/nonexistent:/usr/sbin/nologin\n"
          "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
GROUP = "root:x:0:\ndaemon:x:1:\nnogroup:x:65534:\n"
DEB_EPOCH = "1600000000"


@functools.cache
def _shared_libraries(program: str) -> tuple[str, ...]:
    """The libraries and loader `ldd` names for a host program (cached: ldd costs a fork)."""
    output = subprocess.run(["ldd", program], check=True, capture_output=True,
                            text=True).stdout
    return tuple(re.findall(r"(?:=> )?(/\S+) \(0x", output))


def _copy_from_host(root: Path, path: str) -> None:
    """Copy a host file to the same path under root, as a symlink where the host has one (and
    then its target too), resolving only the directories (the usr-merge links)."""
    host_dir = Path(path).parent.resolve()
    name = Path(path).name
    target = root / host_dir.relative_to("/") / name
    if target.is_symlink() or target.exists():
        return
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if (host_dir / name).is_symlink():
        link = os.readlink(host_dir / name)
        target.symlink_to(link)
        _copy_from_host(root, os.path.join(host_dir, link))
    else:
        shutil.copy2(host_dir / name, target)


def make_dpkg_rootfs(directory: Path) -> Path:
    """Build directory/rootfs, in which `chroot` then `dpkg -i` works as root; return it."""
    root = directory / "rootfs"
    for name in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "etc/dpkg/dpkg.cfg.d",
                 "var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers",
                 "var/lib/dpkg/alternatives", "var/lib/dpkg/parts", "var/log", "var/cache",
                 "root", "proc", "dev", "sys", "run"):
        (root / name).mkdir(mode=0o755, parents=True, exist_ok=True)
    (root / "tmp").mkdir(mode=0o755)
    (root / "tmp").chmod(0o1777)
    for link, target in USR_MERGE.items():
        (root / link).symlink_to(target)
    for program in LINKED_PROGRAMS:
        _copy_from_host(root, program)
        for library in _shared_libraries(program):
            _copy_from_host(root, library)
    for program in STATIC_PROGRAMS:
        _copy_from_host(root, program)
    _copy_from_host(root, BUSYBOX)
    for applet in APPLETS:
        (root / "usr/bin" / applet).symlink_to("busybox")
    (root / "usr/sbin/nologin").symlink_to("../bin/busybox")
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/group").write_text(GROUP)
    (root / "etc/shadow").write_text("".join(f"{line.split(':')[0]}:*:20000:0:99999:7:::\n"
                                             for line in PASSWD.splitlines()))
    (root / "etc/shadow").chmod(0o640)
    (root / "etc/skel").mkdir(mode=0o755)
    (root / "etc/skel/.profile").write_text("# the skeleton useradd -m copies\n")
    (root / "home").mkdir(mode=0o755)
    shutil.copy2("/etc/login.defs", root / "etc/login.defs")
    (root / "etc/dpkg/dpkg.cfg").write_text("log /var/log/dpkg.log\n")
    for name in ("status", "available", "diversions", "statoverride", "triggers/File",
                 "triggers/Unincorp"):
        (root / "var/lib/dpkg" / name).touch()
    return root


def make_deb(directory: Path, name: str = "cowfs-hello") -> Path:
    """Build directory/NAME_1.0_all.deb with dpkg-deb on the host: a greeting, and a plain file
    its postinst hands to daemon:daemon (--root-owner-group makes the archive all root's)."""
    tree = directory / f"{name}-pkg"
    share = tree / "usr/share" / name
    share.mkdir(mode=0o755, parents=True)
    (share / "greeting").write_text("hello from a package\n")
    (share / "owned-by-daemon").write_text("chowned by the postinst\n")
    for path in (share / "greeting", share / "owned-by-daemon"):
        path.chmod(0o644)
    control = tree / "DEBIAN"
    control.mkdir(mode=0o755)
    (control / "control").write_text(
        f"Package: {name}\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: cowfs tests <cowfs@example.invalid>\n"
        "Description: a file for dpkg to unpack, and one for its postinst to chown\n")
    (control / "postinst").write_text(
        f"#!/bin/sh\nset -e\nchown 1:1 /usr/share/{name}/owned-by-daemon\n")
    (control / "postinst").chmod(0o755)
    for path in (tree, tree / "usr", tree / "usr/share", share, control):
        path.chmod(0o755)
    deb = directory / f"{name}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb)],
                   check=True, capture_output=True,
                   env={**os.environ, "SOURCE_DATE_EPOCH": DEB_EPOCH})
    return deb


def install_command(deb_inside: str = "/tmp/hello.deb", name: str = "cowfs-hello") -> str:
    """A script that installs the .deb, then prints its status and owned-by-daemon's owner
    (expect "install ok installed" and "1:1" on lines of their own). dpkg is named by its
    path: where /proc is mounted, busybox's sh runs its own dpkg applet for a bare `dpkg`."""
    return ("export PATH=/usr/sbin:/usr/bin:/sbin:/bin\n"
            "set -e\n"
            f"/usr/bin/dpkg -i {deb_inside}\n"
            f"/usr/bin/dpkg-query -W -f='${{Status}}\\n' {name}\n"
            f"stat -c %u:%g /usr/share/{name}/owned-by-daemon\n")


def useradd_command(name: str = "alice", uid: int = 1000) -> str:
    """A script that adds a user with a home from /etc/skel, then prints `id` of it and the
    owner of its home and of the copied .profile (expect three lines of their own)."""
    return ("export PATH=/usr/sbin:/usr/bin:/sbin:/bin\n"
            "set -e\n"
            f"useradd -m -u {uid} -s /bin/sh {name}\n"
            f"id {name}\n"
            f"stat -c %u:%g /home/{name} /home/{name}/.profile\n")
