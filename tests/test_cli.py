"""The command line: a mount that returns when live, one-line errors for bad input."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    cowfs_command,
    is_mounted,
    mounted_cowfs,
    paths_under,
    unmount_quietly,
    wait_until,
)

import cowfs
from cowfs import cli
from cowfs.layers import read_mountinfo

pytestmark = pytest.mark.mounts


def run_cowfs(*arguments: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cowfs_command(*arguments), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=60, cwd=cwd, check=False)


def daemons_serving(path: Path) -> list[int]:
    """Pids of the daemons serving *path*: in the background they name themselves
    `cowfs daemon MERGED`; in the foreground they keep their command line (one forked by the
    tests' zygote shows it as its title, the words in one string)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            arguments = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except OSError:
            continue
        if arguments[0] == f"cowfs daemon {path}".encode():
            pids.append(int(pid))
            continue
        if len(arguments) == 1:
            arguments = arguments[0].split(b" ")
        if b"cowfs" in arguments and str(path).encode() in arguments:
            pids.append(int(pid))
    return pids


def test_version_help_and_module_entry_point() -> None:
    version = run_cowfs("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"cowfs {cowfs.__version__}"
    help_text = run_cowfs("--help")
    assert help_text.returncode == 0
    for word in ("mount", "umount", "exit status"):
        assert word in help_text.stdout
    assert run_cowfs("mount", "--help").stdout.startswith("usage: cowfs mount")
    run_help = run_cowfs("run", "-h")
    assert (run_help.returncode, run_help.stderr) == (0, "")
    assert "--cap-drop" in run_help.stdout
    console = subprocess.run(["cowfs", "--version"], capture_output=True, text=True, check=False,
                             env={**os.environ, "PATH": f"{Path(sys.executable).parent}:"
                                  f"{os.environ['PATH']}"})
    assert console.stdout == version.stdout


def test_background_mount_is_live_when_the_command_returns(layer_dirs) -> None:
    top, bottom, merged = layer_dirs("top", "bottom", "merged")
    (top / "file").write_text("top")
    (bottom / "file").write_text("bottom")
    result = run_cowfs("mount", f"{top}:{bottom}", str(merged))
    try:
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert is_mounted(merged, "fuse.cowfs")
        assert (merged / "file").read_text() == "top"
        (daemon,) = daemons_serving(merged)
        fds = {os.path.realpath(f"/proc/{daemon}/fd/{fd}") for fd in range(3)}
        assert fds == {"/dev/null"}, "the daemon must not hold the caller's stdio"
    finally:
        unmounted = run_cowfs("umount", str(merged))
        unmount_quietly(merged)
    assert unmounted.returncode == 0, unmounted.stderr
    assert not is_mounted(merged)
    wait_until(lambda: not daemons_serving(merged), what="the daemon to exit")


def test_lazy_umount_of_a_busy_mount(layer_dirs) -> None:
    lower, merged = layer_dirs("lower", "merged")
    (lower / "file").write_text("data")
    assert run_cowfs("mount", str(lower), str(merged)).returncode == 0
    try:
        with open(merged / "file") as busy:
            refused = run_cowfs("umount", str(merged))
            assert refused.returncode == 32
            assert refused.stderr.startswith("cowfs: cannot unmount")
            assert run_cowfs("umount", "--lazy", str(merged)).returncode == 0
            assert not is_mounted(merged)
            assert busy.read() == "data"
    finally:
        unmount_quietly(merged)
    wait_until(lambda: not daemons_serving(merged), what="the daemon to exit")


def test_escaped_colon_in_a_layer_path(tmp_path: Path, layer_dirs) -> None:
    top, merged = layer_dirs("with:colon", "merged")
    (top / "file").write_text("found")
    with mounted_cowfs([top], merged):
        assert (merged / "file").read_text() == "found"


def test_nonempty_mount_point_with_the_option(layer_dirs) -> None:
    lower, merged = layer_dirs("lower", "merged")
    (lower / "layer-file").write_text("")
    (merged / "hidden-file").write_text("")
    with mounted_cowfs([lower], merged, extra=("-o", "nonempty")):
        assert os.listdir(merged) == ["layer-file"]
    assert os.listdir(merged) == ["hidden-file"]


BAD_INPUTS = {
    "missing layer": (["{tmp}/missing", "{merged}"], "lower layer {tmp}/missing does not exist"),
    "file as layer": (["{tmp}/file", "{merged}"], "lower layer {tmp}/file is not a directory"),
    "layer twice": (["{a}:{b}:{a}", "{merged}"], "is given twice"),
    "mount point inside a layer": (["{a}", "{a}/sub"], "mount point {a}/sub is inside lower"),
    "layer inside the mount point": (["{a}", "{tmp}"], "lower layer {a} is inside mount point"),
    "upper inside a lower": (["{a}", "{a}/sub", "{merged}"], "upper layer {a}/sub is inside"),
    "missing upper": (["{a}", "{tmp}/missing", "{merged}"], "upper layer {tmp}/missing does "),
    "missing mount point": (["{a}", "{tmp}/missing"], "mount point {tmp}/missing does not"),
    "non-empty mount point": (["{a}", "{full}"], "mount point {full} is not empty"),
    "unknown option": (["-o", "frobnicate", "{a}", "{merged}"], "unknown mount option"),
    "malformed option": (["-o", "fsname", "{a}", "{merged}"], "malformed mount option"),
    "too many paths": (["{a}", "{b}", "{merged}", "{tmp}"], "expected LOWER1"),
    "empty layer in list": (["{a}::{b}", "{merged}"], "empty layer path"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_one_line_and_status_2(case: str, tmp_path: Path, layer_dirs) -> None:
    a, b, merged, full = layer_dirs("a", "b", "merged", "full")
    (a / "sub").mkdir()
    (tmp_path / "file").write_text("")
    (full / "something").write_text("")
    names = {"tmp": tmp_path, "a": a, "b": b, "merged": merged, "full": full}
    template, expected = BAD_INPUTS[case]
    arguments = [argument.format(**names) for argument in template]
    before = paths_under(tmp_path)
    result = run_cowfs("mount", *arguments)
    assert paths_under(tmp_path) == before
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("cowfs: ")
    assert expected.format(**names) in result.stderr
    assert not any(mount.startswith(str(tmp_path)) for mount in _mounts())
    assert not daemons_serving(Path(arguments[-1]))


def test_busy_mount_point_is_refused(layer_dirs) -> None:
    lower, merged = layer_dirs("lower", "merged")
    with mounted_cowfs([lower], merged):
        result = run_cowfs("mount", str(lower), str(merged))
        assert result.returncode == 2
        assert result.stderr == f"cowfs: mount point {merged} is busy: something is mounted there\n"
        assert len(daemons_serving(merged)) == 1


def test_umount_of_what_cowfs_did_not_mount(tmp_path: Path) -> None:
    result = run_cowfs("umount", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr == f"cowfs: {tmp_path} is not a cowfs mount\n"


def test_demo_shows_the_example_image_and_unmounts() -> None:
    result = run_cowfs("demo")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split() == ["motd", "3-config"] for line in lines)
    assert any(line.split() == ["etc/", "3-config", "+", "2-app", "+", "1-base"] for line in lines)
    assert "removes usr/share/doc/base, var/cache/apt/* (opaque)" in result.stdout
    assert "README" not in result.stdout and "pkgcache.bin" not in result.stdout
    assert not any("cowfs-demo-" in mount for mount in _mounts())


def _mounts() -> list[str]:
    return [mount.mountpoint for mount in read_mountinfo()]


def test_every_subcommand_is_told_apart_from_the_mount_program_form() -> None:
    """A first argument that names no subcommand selects `cowfs -o ... MERGED`."""
    parser, _ = cli.build_parser()
    (subcommands,) = [action for action in parser._actions
                      if isinstance(action, argparse._SubParsersAction)]
    assert set(subcommands.choices) == set(cli.SUBCOMMANDS)


# Refusals where an upper is given: each once caught only after the workdir was made. Paths
# are under the test's directory; `cowfs run` makes the --upper it is given.
REFUSED_WITH_AN_UPPER = {
    "upper inside a lower": (["mount", "L", "L/up", "M"],
                             "upper layer {tmp}/L/up is inside lower layer {tmp}/L"),
    "workdir is the mount point": (["mount", "--workdir", "{tmp}/M", "L", "U", "M"],
                                   "mount point M is workdir {tmp}/M"),
    "workdir inside the mount point": (["mount", "--workdir", "M/w", "L", "U", "M"],
                                       "workdir M/w is inside mount point M"),
    "workdir on another filesystem": (["mount", "--workdir", "tmpfs/w", "L", "U", "M"],
                                      "workdir tmpfs/w is not on the same filesystem as upper"),
    "missing mount point": (["mount", "L", "U", "missing"], "mount point missing does not"),
    "non-empty mount point": (["mount", "L", "U", "full"], "mount point full is not empty"),
    "mount program: upper inside a lower": (
        ["-o", "lowerdir=L,upperdir=L/up,workdir=W", "M"], "upper layer {tmp}/L/up is inside"),
    "mount program: workdir is the mount point": (
        ["-o", "lowerdir=L,upperdir=U,workdir={tmp}/M", "M"], "mount point M is workdir"),
    "mount program: mount point inside the upper": (
        ["-o", "lowerdir=L,upperdir=U,workdir=W", "U/sub"], "mount point U/sub is inside upper"),
    "run: upper inside a lower": (["run", "--upper", "L/new/up", "L", "--", "true"],
                                  "upper layer {tmp}/L/new/up is inside lower layer {tmp}/L"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_WITH_AN_UPPER))
def test_a_refused_mount_leaves_nothing_behind(case: str, tmp_path: Path) -> None:
    for name in ("L/up", "U/sub", "M", "full/something", "tmpfs"):
        (tmp_path / name).mkdir(parents=True)
    template, expected = REFUSED_WITH_AN_UPPER[case]
    arguments = [argument.format(tmp=tmp_path) for argument in template]
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tmp_path / "tmpfs")], check=True)
    try:
        before = paths_under(tmp_path)
        result = run_cowfs(*arguments, cwd=tmp_path)
        after = paths_under(tmp_path)
    finally:
        unmount_quietly(tmp_path / "tmpfs")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("cowfs: ")
    assert expected.format(tmp=tmp_path) in result.stderr
    assert after == before


def test_a_mount_refused_for_a_busy_upper_or_workdir_makes_no_workdir(layer_dirs,
                                                                     tmp_path: Path) -> None:
    lower, upper, other_upper, work, merged, second = layer_dirs(
        "lower", "upper", "other-upper", "work", "merged", "second")
    with mounted_cowfs([lower], merged, upper=upper, extra=("--workdir", str(work))):
        before = paths_under(tmp_path)
        shared_upper = run_cowfs("mount", str(lower), str(upper), str(second))
        shared_workdir = run_cowfs("mount", "--workdir", str(work), str(lower),
                                   str(other_upper), str(second))
        assert paths_under(tmp_path) == before
    assert shared_upper.returncode == 2
    assert shared_upper.stderr == f"cowfs: upper layer {upper} is in use by another mount\n"
    assert shared_workdir.returncode == 2
    assert shared_workdir.stderr == f"cowfs: workdir {work} is in use by another mount\n"
