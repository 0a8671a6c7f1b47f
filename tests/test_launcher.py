"""The installed `cowfs` command (bin/cowfs): found and run without an activated venv, starting
on builtins alone, passing on exit statuses and signals, warm and cold alike."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCHER = Path(sys.executable).parent / "cowfs"
# Neither the venv's bin nor VIRTUAL_ENV: as from cron, a unit file or mount(8).
BARE_ENVIRONMENT = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# The suite's supervisor directory (conftest sets it) goes with every environment here.
RUNTIME = {"COWFS_RUNTIME_DIR": os.environ["COWFS_RUNTIME_DIR"]}
WARM = {**BARE_ENVIRONMENT, **RUNTIME}
COLD = {**WARM, "COWFS_SUPERVISOR": "off"}


def launch(*arguments: str, environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LAUNCHER), *arguments], env=environment, cwd="/",
                          capture_output=True, text=True, timeout=60, check=False)


def test_the_installer_points_it_at_this_interpreter() -> None:
    first_line = LAUNCHER.read_text().splitlines()[0]
    assert first_line.startswith("#!") and first_line != "#!python"
    assert os.path.samefile(first_line[2:].strip(), sys.executable)
    result = launch("--version", environment=BARE_ENVIRONMENT)
    assert (result.returncode, result.stdout.split()[0]) == (0, "cowfs"), result.stderr


def modules_imported(*arguments: str, environment: dict[str, str]) -> set[str]:
    result = subprocess.run([sys.executable, "-X", "importtime", *arguments], env=environment,
                            capture_output=True, text=True, timeout=60, check=False)
    return {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


def test_a_warm_command_imports_only_builtins_and_the_client() -> None:
    """pip's console-script wrapper imported re (and enum, functools, collections) first."""
    assert launch("umount", "/nonexistent", environment=WARM).returncode == 2   # warm now
    interpreter = modules_imported("-c", "pass", environment=WARM)
    launcher = modules_imported(str(LAUNCHER), "umount", "/nonexistent", environment=WARM)
    assert launcher - interpreter <= {"cowfs", "cowfs.client", "_socket", "marshal", "_signal"}


@pytest.mark.mounts
@pytest.mark.parametrize("environment", [WARM, COLD], ids=["warm", "cold"])
def test_exit_statuses_pass_through(environment: dict[str, str]) -> None:
    refused = launch("umount", "/nonexistent", environment=environment)
    assert (refused.returncode, refused.stderr) == (2, "cowfs: /nonexistent is not a cowfs mount\n")
    usage = launch("mount", environment=environment)
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
