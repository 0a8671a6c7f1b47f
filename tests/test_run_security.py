"""`cowfs run` against what namespaces do not cover: the host's keyrings, host-wide /proc and
/sys files, the syscalls of the whole kernel; and limits no payload could start under."""

import ctypes
import os
from pathlib import Path

import pytest
from dpkg_rootfs import install_command, make_deb, make_dpkg_rootfs, useradd_command
from test_sandbox import leftover_run_mounts, no_leftover_cgroups, run, shell

from cowfs import _sandbox_helper, seccomp

pytestmark = pytest.mark.mounts

_libc = ctypes.CDLL(None, use_errno=True)
_ADD_KEY, _KEYCTL = {"x86_64": (248, 250), "aarch64": (217, 219)}[os.uname().machine]
_KEY_SPEC_USER_KEYRING, _KEYCTL_INVALIDATE = -4, 21


@pytest.fixture
def host_secret() -> str:
    """A key host root keeps in its user keyring, as a login or a daemon would."""
    description = f"cowfs-test-{os.getpid()}"
    key = _libc.syscall(_ADD_KEY, b"user", description.encode(), b"host-secret", 11,
                        ctypes.c_long(_KEY_SPEC_USER_KEYRING))
    assert key > 0, os.strerror(ctypes.get_errno())
    yield description
    _libc.syscall(_KEYCTL, _KEYCTL_INVALIDATE, key)


def test_the_hosts_keyring_is_out_of_reach(probe_rootfs: Path, host_secret: str) -> None:
    filtered = run(str(probe_rootfs), "--", "/bin/probe", "key", host_secret)
    assert filtered.stdout == "search EPERM\n", filtered.stderr
    # Without the filter, the fresh session keyring still leaves the key unpossessed.
    unconfined = run("--security-opt", "seccomp=unconfined", str(probe_rootfs), "--",
                     "/bin/probe", "key", host_secret)
    assert unconfined.stdout == "read EACCES\n", unconfined.stderr


def host_paths(relative: tuple[str, ...]) -> list[str]:
    present = [path for path in relative if os.path.lexists("/" + path)]
    assert present, "this kernel has none of them: the test would check nothing"
    return present


def test_host_wide_proc_and_sys_files_are_masked_or_read_only(rootfs: Path) -> None:
    masked = host_paths(_sandbox_helper.MASKED_PATHS)
    read_only = host_paths(_sandbox_helper.READ_ONLY_PATHS)
    # Writing an IRQ's affinity back unchanged: allowed to host root, refused inside.
    affinity = "/proc/irq/default_smp_affinity"
    Path(affinity).write_text(Path(affinity).read_text())
    script = "".join(f"echo '== {path}'; if [ -d /{path} ]; then ls -A /{path}; "
                     f"else cat /{path}; fi 2>&1;" for path in masked)
    script += "echo '== mounts'; cat /proc/self/mountinfo;"
    script += f"echo '== write'; cat {affinity} > {affinity} || echo refused"
    result = shell(rootfs, script)
    answers = dict(part.split("\n", 1) for part in result.stdout.split("== ")[1:])
    for path in masked:
        assert answers[path] == "", f"/{path} shows {answers[path]!r}"
    options = {fields[4]: fields[5].split(",") for fields in
               (line.split() for line in answers["mounts"].splitlines())}
    for path in read_only:
        assert "ro" in options.get("/" + path, ()), f"/{path} is not mounted read-only"
    assert answers["write"] == "refused\n"
    assert f"can't create {affinity}: Read-only file system" in result.stderr


# The probe's families (tests/sandbox_probe.c) by the filter's families they stand for.
HOST_WIDE = ("kexec", "modules", "reboot", "swap", "clock", "accounting", "quota", "io_ports",
             "keyring", "bpf", "perf", "userfaultfd", "file_handles", "io_uring", "kernel_log")


def probe(rootfs: Path, *options: str, families: tuple[str, ...]) -> dict[str, str]:
    result = run(*options, str(rootfs), "--", "/bin/probe", *families)
    assert result.returncode == 0, result.stderr
    return dict(line.split() for line in result.stdout.splitlines())


def test_every_host_wide_family_is_denied_whatever_the_capabilities(probe_rootfs: Path) -> None:
    assert set(HOST_WIDE) == set(seccomp.HOST_WIDE) - {"obsolete"}
    denied = probe(probe_rootfs, "--cap-add", "ALL", families=HOST_WIDE)
    assert denied == dict.fromkeys(HOST_WIDE, "EPERM")
    # The same calls reach the kernel without the filter, and it answers otherwise: so each
    # EPERM above is the filter's.
    answered = probe(probe_rootfs, "--cap-add", "ALL", "--security-opt", "seccomp=unconfined",
                     families=HOST_WIDE)
    assert [family for family, answer in answered.items() if answer == "EPERM"] == []


def test_namespaces_and_mounts_need_sys_admin(probe_rootfs: Path) -> None:
    families = ("namespaces", "clone_namespace", "clone3", "mount")
    assert probe(probe_rootfs, families=families) == {
        "namespaces": "EPERM", "clone_namespace": "EPERM", "clone3": "ENOSYS", "mount": "EPERM"}
    # Unprivileged user namespaces are the kernel's default: only the filter refused them.
    unfiltered = probe(probe_rootfs, "--security-opt", "seccomp=unconfined", families=families)
    assert unfiltered["namespaces"] == unfiltered["clone_namespace"] == "ok"
    admin = probe(probe_rootfs, "--cap-add", "sys_admin", families=families)
    assert admin["namespaces"] == admin["clone_namespace"] == "ok"
    assert admin["mount"] == "ENOENT" and admin["clone3"] != "ENOSYS"


@pytest.mark.parametrize(("options", "message"), [
    (("--pids", "0"), "--pids must be at least 2 (PID 1 and the payload), not 0"),
    (("--pids", "1"), "--pids must be at least 2 (PID 1 and the payload), not 1"),
    (("--cpus", "-1"), f"--cpus must be from 0.01 to {os.cpu_count()} (the CPUs here), not -1"),
    (("--memory", "0"), "--memory must be at least 6M, not 0 bytes"),
    (("--memory", "1K"), "--memory must be at least 6M, not 1024 bytes"),
    (("--security-opt", "seccomp=off"), "--security-opt: expected seccomp=unconfined, "
     "seccomp=default or unmask=ALL|PATH[:PATH...], not 'seccomp=off'"),
    (("--security-opt", "unmask=/proc/self"), "unmask: /proc/self is neither masked nor "
     "read-only"),
    (("--cap-add", "bogus"), "unknown capability 'bogus'"),
])
def test_bad_limits_are_refused_before_anything_starts(rootfs: Path, tmp_path: Path,
                                                      options: tuple[str, ...],
                                                      message: str) -> None:
    upper = tmp_path / "kept"
    result = shell(rootfs, "true", "--upper", str(upper), *options)
    assert (result.returncode, result.stderr) == (2, f"cowfs: {message}\n")
    assert not upper.exists(), "nothing was made"
    assert no_leftover_cgroups()


def test_dpkg_and_useradd_work_with_the_default_capabilities(tmp_path: Path) -> None:
    """dpkg unpacks, renames over, and chowns in its postinst; useradd locks with hard links,
    renames over /etc/passwd and chowns a home: root's default set is enough for both, and
    what they write lands in the upper as the image expects it."""
    root = make_dpkg_rootfs(tmp_path)
    deb = make_deb(tmp_path)
    image = tmp_path / "image"
    image.mkdir()
    os.rename(deb, image / "hello.deb")
    upper = tmp_path / "upper"
    result = run("--upper", str(upper), f"{image}:{root}", "--", "/bin/sh", "-c",
                 install_command("/hello.deb") + useradd_command())
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-5:] == [
        "install ok installed", "1:1", "uid=1000(alice) gid=1000(alice) groups=1000(alice)",
        "1000:1000", "1000:1000"]
    owned = upper / "usr/share/cowfs-hello/owned-by-daemon"
    assert (os.lstat(owned).st_uid, os.lstat(owned).st_gid) == (1, 1)
    assert "alice:x:1000:1000" in (upper / "etc/passwd").read_text()
    assert os.lstat(upper / "etc/shadow").st_mode & 0o777 == 0o640
    without = run(f"{image}:{root}", "--cap-drop", "chown", "--", "/bin/sh", "-c",
                  install_command("/hello.deb"))
    assert without.returncode != 0 and "Operation not permitted" in without.stderr
    assert not leftover_run_mounts()



AFFINITY = "/proc/irq/default_smp_affinity"


def test_a_user_namespace_keeps_the_holes_closed_without_the_other_defences(
        probe_rootfs: Path, host_secret: str, tmp_path: Path) -> None:
    """With the filter off and nothing masked, root in its own user namespace is host id
    100000: the host's keys are not its keys, host-wide /proc files are not its files; and what
    it creates lands in the upper with the ids the image uses."""
    upper = tmp_path / "upper"
    script = (f"id; cat /proc/self/uid_map; /bin/probe key {host_secret};"
              f"cat {AFFINITY} > {AFFINITY} || echo refused;"
              "touch /created; mkdir /owned; chown 1000:1000 /owned; ls -ln /bin/busybox;"
              "hostname other 2>/dev/null || echo no-hostname")
    loosened = ("--security-opt", "seccomp=unconfined", "--security-opt", "unmask=ALL")
    result = shell(probe_rootfs, script, "--userns", "--upper", str(upper), *loosened)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "uid=0 gid=0"
    assert lines[1].split() == ["0", "100000", "65536"]
    assert lines[2:4] == ["search ENOKEY", "refused"]
    assert lines[4].split()[2:4] == ["0", "0"], "the image's root owns its files, seen inside"
    assert lines[5] == "no-hostname", "the uts namespace is not the payload's"
    assert f"can't create {AFFINITY}: Permission denied" in result.stderr
    ids = {name: (os.lstat(upper / name).st_uid, os.lstat(upper / name).st_gid)
           for name in ("created", "owned", "proc")}
    assert ids == {"created": (0, 0), "owned": (1000, 1000), "proc": (0, 0)}
    # The same loosening without a user namespace: host root writes the host's IRQ routing.
    host_root = shell(probe_rootfs, f"cat {AFFINITY} > {AFFINITY} && echo wrote", *loosened)
    assert host_root.stdout == "wrote\n"


def test_dpkg_and_useradd_work_in_a_user_namespace(tmp_path: Path) -> None:
    root = make_dpkg_rootfs(tmp_path)
    image = tmp_path / "image"
    image.mkdir()
    os.rename(make_deb(tmp_path), image / "hello.deb")
    upper = tmp_path / "upper"
    result = run("--userns", "--upper", str(upper), f"{image}:{root}", "--", "/bin/sh", "-c",
                 install_command("/hello.deb") + useradd_command())
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-5:] == [
        "install ok installed", "1:1", "uid=1000(alice) gid=1000(alice) groups=1000(alice)",
        "1000:1000", "1000:1000"]
    owned = os.lstat(upper / "usr/share/cowfs-hello/owned-by-daemon")
    assert (owned.st_uid, owned.st_gid) == (1, 1)
    assert os.lstat(upper / "var/lib/dpkg/status").st_uid == 0
    home = os.lstat(upper / "home/alice")
    assert (home.st_uid, home.st_gid) == (1000, 1000), "the image's ids, not the host's"


@pytest.mark.parametrize(("ids", "message"), [
    ("0:65536", "--userns-ids: host ids 0:65536 are not a range of unprivileged ids "
                "(FIRST >= 1, COUNT >= 1)"),
    ("100000", "--userns-ids expects FIRST:COUNT, not '100000'"),
    ("200000:1000", "--user 5000:5000 is outside the user namespace's ids 0-999"),
])
def test_bad_user_namespace_ids_are_refused(rootfs: Path, ids: str, message: str) -> None:
    result = shell(rootfs, "true", "--userns-ids", ids, "--user", "5000:5000")
    assert (result.returncode, result.stderr) == (2, f"cowfs: {message}\n")
