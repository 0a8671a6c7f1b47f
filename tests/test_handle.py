"""`cowfs.mounted` / `mount_stack` / `open_mounted`: the library's mount handle."""

import os
import threading
from pathlib import Path

import pytest
import trio
from conftest import is_mounted, paths_under

import cowfs

pytestmark = pytest.mark.mounts


@pytest.fixture
def stack(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("top", "bottom", "upper", "merged")}
    for path in paths.values():
        path.mkdir()
    (paths["top"] / "file").write_text("top")
    (paths["bottom"] / "file").write_text("bottom")
    return paths


def test_a_forked_daemon_is_reaped_after_the_unmount(stack: dict[str, Path]) -> None:
    with cowfs.mounted([str(stack["top"]), str(stack["bottom"])], str(stack["merged"]),
                       upper=str(stack["upper"])) as mount:
        assert mount.daemon_pid is not None and is_mounted(stack["merged"], "fuse.cowfs")
        (stack["merged"] / "file").write_text("changed")
        daemon = mount.daemon_pid
    assert not is_mounted(stack["merged"])
    assert (stack["upper"] / "file").read_text() == "changed"
    with pytest.raises(ChildProcessError):
        os.waitpid(daemon, os.WNOHANG)         # reaped already: no zombie left


def test_a_threaded_caller_gets_a_daemon_started_by_command(stack: dict[str, Path]) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        with cowfs.mounted([str(stack["top"])], str(stack["merged"])) as mount:
            assert mount.daemon_pid is None
            assert (stack["merged"] / "file").read_text() == "top"
    finally:
        stop.set()
        thread.join()
    assert not is_mounted(stack["merged"])


def test_bad_input_raises_before_anything_is_mounted(stack: dict[str, Path]) -> None:
    with pytest.raises(cowfs.LayoutError, match="does not exist"):
        cowfs.mount_stack([str(stack["top"] / "missing")], str(stack["merged"]))
    with pytest.raises(cowfs.MountError, match="fsync must be one of"):
        cowfs.mount_stack([str(stack["top"])], str(stack["merged"]), fsync="never")
    assert not is_mounted(stack["merged"])


def requests(merged: Path) -> dict[str, int]:
    return cowfs.Mounted(str(merged)).statistics()["requests"]  # type: ignore[return-value]


def write_pages(path: Path) -> None:
    with open(path, "wb") as file:
        for _ in range(64):
            file.write(b"x" * 4096)
            file.flush()


@pytest.mark.parametrize("start", ["forked", "by command"])
def test_kernel_options_reach_the_mount(stack: dict[str, Path], start: str) -> None:
    """Plain listings and the writeback cache asked for from Python: the statistics show the
    one, and 64 page writes reaching the daemon as a few WRITEs the other."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    if start == "by command":
        thread.start()        # a threaded caller: `cowfs mount` with the options spelled out
    try:
        kernel = cowfs.KernelOptions(plain_listings=True, writeback=True)
        with cowfs.mounted([str(stack["top"])], str(stack["merged"]), upper=str(stack["upper"]),
                           kernel=kernel) as mount:
            assert mount.kernel_features().plain_listings
            before = requests(stack["merged"]).get("write", 0)
            write_pages(stack["merged"] / "new")
            assert 0 < requests(stack["merged"])["write"] - before < 16
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
    with cowfs.mounted([str(stack["top"])], str(stack["merged"]), upper=str(stack["upper"]),
                       kernel=cowfs.KernelOptions(caches=False)) as mount:
        assert mount.kernel_features().reason == "turned off (-o kernel_caches=off)"
        before = requests(stack["merged"]).get("write", 0)
        write_pages(stack["merged"] / "new")
        assert requests(stack["merged"])["write"] - before == 64
    with pytest.raises(cowfs.MountError, match="exclude each other") as refused:
        cowfs.mount_stack([str(stack["top"])], str(stack["merged"]), upper=str(stack["upper"]),
                          kernel=cowfs.KernelOptions(writeback=True, passthrough=True))
    assert refused.value.exit_code == 2 and not is_mounted(stack["merged"])


def test_a_refused_layout_makes_no_workdir(stack: dict[str, Path], tmp_path: Path) -> None:
    (stack["merged"] / "something").write_text("")
    before = paths_under(tmp_path)
    with pytest.raises(cowfs.LayoutError, match="is not empty"):
        cowfs.mount_stack([str(stack["top"])], str(stack["merged"]), upper=str(stack["upper"]))
    with pytest.raises(cowfs.LayoutError, match="is inside mount point"):
        cowfs.mount_stack([str(stack["top"])], str(stack["merged"]), upper=str(stack["upper"]),
                          workdir=str(stack["merged"] / "work"))
    assert paths_under(tmp_path) == before


def test_a_busy_mount_unmounts_lazily(stack: dict[str, Path]) -> None:
    mount = cowfs.mount_stack([str(stack["top"])], str(stack["merged"]))
    with open(stack["merged"] / "file") as busy:
        with pytest.raises(OSError):
            mount.unmount()
        mount.unmount(lazy=True)
        assert not is_mounted(stack["merged"])
        assert busy.read() == "top"


def test_the_trio_flavour(stack: dict[str, Path]) -> None:
    async def main() -> str:
        async with cowfs.open_mounted([str(stack["top"]), str(stack["bottom"])],
                                      str(stack["merged"]), upper=str(stack["upper"])) as mount:
            await trio.Path(mount.path, "new").write_text("from trio")
            return await trio.Path(mount.path, "file").read_text()

    assert trio.run(main) == "top"
    assert not is_mounted(stack["merged"])
    assert (stack["upper"] / "new").read_text() == "from trio"

    async def refused() -> None:
        async with cowfs.open_mounted([str(stack["top"] / "missing")], str(stack["merged"])):
            pass
    with pytest.raises(cowfs.MountError, match="does not exist") as raised:
        trio.run(refused)
    assert raised.value.exit_code == 2
