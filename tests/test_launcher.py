"""The installed `cowfs` command: found and run without an activated venv, passing on exit
statuses and signals, warm and cold alike. The install's is cowfs/launcher.c built (a warm
command starts no Python); bin/cowfs, what a pip install elsewhere gets and what the C one runs
for everything else, starts on builtins alone."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCHER = Path(sys.executable).parent / "cowfs"
PYTHON_LAUNCHER = Path(__file__).parent.parent / "bin" / "cowfs"
# Neither the venv's bin nor VIRTUAL_ENV: as from cron, a unit file or mount(8).
BARE_ENVIRONMENT = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# The suite's supervisor directory (conftest sets it) goes with every environment here.
RUNTIME = {"COWFS_RUNTIME_DIR": os.environ["COWFS_RUNTIME_DIR"]}
WARM = {**BARE_ENVIRONMENT, **RUNTIME}
COLD = {**WARM, "COWFS_SUPERVISOR": "off"}


def launch(*arguments: str, environment: dict[str, str], launcher: str = "c"
           ) -> subprocess.CompletedProcess[str]:
    command = [str(LAUNCHER)] if launcher == "c" else [sys.executable, str(PYTHON_LAUNCHER)]
    return subprocess.run([*command, *arguments], env=environment, cwd="/",
                          capture_output=True, text=True, timeout=60, check=False)


def test_the_install_built_the_c_launcher_for_this_interpreter() -> None:
    assert LAUNCHER.read_bytes()[:4] == b"\x7fELF", "scripts/install.sh builds it"
    result = launch("--version", environment=BARE_ENVIRONMENT)    # through the Python one
    assert (result.returncode, result.stdout.split()[0]) == (0, "cowfs"), result.stderr


def supervisor_status() -> str:
    result = launch("supervisor", "status", environment=WARM)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.mounts
@pytest.mark.parametrize(("arguments", "status", "error"), [
    (("umount", "/nonexistent"), 2, "cowfs: /nonexistent is not a cowfs mount\n"),
    (("list", "--json"), 0, ""),
    (("layer", "remove", "/nonexistent", "/x"), 32, "cowfs: /nonexistent is not a cowfs mount\n"),
], ids=["umount", "list", "layer remove"])
def test_the_c_launcher_is_served_warm_without_starting_python(
        arguments: tuple[str, ...], status: int, error: str) -> None:
    """It finds the Python client's supervisor (same slot, same build stamp: a stale one would
    make way for a new pid) and needs no interpreter: with PYTHONHOME broken, any Python it
    started would die before a word of cowfs's."""
    assert launch("umount", "/nonexistent", environment=WARM).returncode == 2   # warm now
    before = supervisor_status()
    result = launch(*arguments, environment={**WARM, "PYTHONHOME": "/nonexistent"})
    assert (result.returncode, result.stderr) == (status, error)
    pid, served = before.split()[2], int(before.split(": ")[1].split()[0])
    after = supervisor_status()
    assert after.split()[2] == pid and int(after.split(": ")[1].split()[0]) == served + 1


def test_what_the_c_launcher_cannot_say_the_python_one_does() -> None:
    """An argument that is not UTF-8 (Python sends it with surrogates) and a command the
    supervisor does not serve both reach the Python launcher, with the same result."""
    argument = os.fsdecode(b"/non\xffexistent")
    results = [subprocess.run([str(LAUNCHER), "umount", argument], env=environment, cwd="/",
                              capture_output=True, timeout=60, check=False)
               for environment in (WARM, COLD)]
    assert [(result.returncode, result.stderr) for result in results] == [
        (2, b"cowfs: /non\\udcffexistent is not a cowfs mount\n")] * 2
    usage = launch("list", "--bogus", environment=WARM)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: cowfs")


def modules_imported(*arguments: str, environment: dict[str, str]) -> set[str]:
    result = subprocess.run([sys.executable, "-X", "importtime", *arguments], env=environment,
                            capture_output=True, text=True, timeout=60, check=False)
    return {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


def test_a_warm_command_imports_only_builtins_and_the_client() -> None:
    """pip's console-script wrapper imported re (and enum, functools, collections) first."""
    assert launch("umount", "/nonexistent", environment=WARM).returncode == 2   # warm now
    interpreter = modules_imported("-c", "pass", environment=WARM)
    launcher = modules_imported(str(PYTHON_LAUNCHER), "umount", "/nonexistent",
                                environment=WARM)
    assert launcher - interpreter <= {"cowfs", "cowfs.client", "_socket", "marshal", "_signal"}


@pytest.mark.mounts
@pytest.mark.parametrize("launcher", ["c", "python"])
@pytest.mark.parametrize("environment", [WARM, COLD], ids=["warm", "cold"])
def test_exit_statuses_pass_through(environment: dict[str, str], launcher: str) -> None:
    refused = launch("umount", "/nonexistent", environment=environment, launcher=launcher)
    assert (refused.returncode, refused.stderr) == (2, "cowfs: /nonexistent is not a cowfs mount\n")
    usage = launch("mount", environment=environment, launcher=launcher)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: cowfs mount")


@pytest.mark.mounts
@pytest.mark.parametrize("environment", [WARM, COLD], ids=["warm", "cold"])
def test_a_payloads_status_and_signals_pass_through(environment: dict[str, str],
                                                    rootfs: Path) -> None:
    exited = launch("run", str(rootfs), "--", "/bin/sh", "-c", "exit 7",
                    environment=environment)
    assert (exited.returncode, exited.stderr) == (7, "")
    # SIGTERM to the launcher reaches the payload (through the command's process when warm):
    # its status is the one a shell gives a process ended by SIGTERM.
    process = subprocess.Popen([str(LAUNCHER), "run", str(rootfs), "--", "/bin/sh", "-c",
                                "echo started; exec sleep 60"], env=environment, cwd="/",
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "started\n"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_launcher_whose_supervisor_cannot_start_runs_the_command_itself(
        tmp_path: Path) -> None:
    """A runtime directory it cannot make (a file is in the way): the command runs cold."""
    blocked = tmp_path / "file"
    blocked.write_text("")
    result = launch("umount", "/nonexistent",
                    environment={**BARE_ENVIRONMENT, "COWFS_RUNTIME_DIR": str(blocked / "x")})
    assert (result.returncode, result.stderr) == (2, "cowfs: /nonexistent is not a cowfs mount\n")
