"""The request loop polls /dev/fuse after each reply (`cowfs.request_wait`): requests that come
meanwhile are served without a pass through trio's scheduler, and the mount's other tasks
still run while requests stream in."""

import errno
import json
import os
import threading
import time
from pathlib import Path

import pytest
from conftest import mounted_cowfs

import cowfs
from cowfs import request_wait

pytestmark = pytest.mark.mounts

MANY_CPUS = len(os.sched_getaffinity(0)) > 1


def statistics(merged: Path) -> dict[str, object]:
    return json.loads(os.getxattr(merged, "trusted.cowfs.stats"))


def ask_missing_xattr(path: Path, times: int) -> None:
    """Requests that always reach the daemon: the kernel caches no xattrs."""
    for _ in range(times):
        with pytest.raises(OSError) as missing:
            os.getxattr(path, "user.missing")
        assert missing.value.errno == errno.ENODATA


@pytest.fixture
def layers(tmp_path: Path) -> tuple[Path, Path, Path]:
    lower, upper, merged = tmp_path / "lower", tmp_path / "upper", tmp_path / "merged"
    for path in (lower, upper, merged):
        path.mkdir()
    (lower / "file").write_bytes(b"data")
    (lower / "large").write_bytes(os.urandom(3 << 20))   # copied up in a thread
    return lower, upper, merged


@pytest.mark.skipif(not MANY_CPUS, reason="polling is off with one CPU")
def test_requests_that_follow_a_reply_are_caught_by_polling(
        layers: tuple[Path, Path, Path]) -> None:
    lower, upper, merged = layers
    with mounted_cowfs([lower], merged, upper):
        before = statistics(merged)
        ask_missing_xattr(merged / "file", 500)
        after = statistics(merged)
        polled = after["requests_polled"] - before["requests_polled"]
        # The caller sends each next request a few microseconds after its reply; even on a
        # loaded machine most are caught (about 94% here).
        assert polled > 100, (before, after)
        live = next(mount for mount in cowfs.mounts() if mount.path == str(merged))
        assert "request_poll=on" in live.stats()["options"]


@pytest.mark.skipif(not MANY_CPUS, reason="polling is off with one CPU")
def test_a_caller_that_thinks_between_requests_stops_the_polling(
        layers: tuple[Path, Path, Path]) -> None:
    """Polls that catch nothing cost their credit: the daemon soon sleeps at once, and takes
    no CPU from a caller that works between its requests."""
    lower, upper, merged = layers
    with mounted_cowfs([lower], merged, upper):
        before = statistics(merged)
        for _ in range(100):
            ask_missing_xattr(merged / "file", 1)
            time.sleep(0.002)
        after = statistics(merged)
        assert after["request_polls_missed"] - before["request_polls_missed"] < 10, after
        assert after["request_sleeps"] - before["request_sleeps"] >= 90, after


def test_polling_can_be_turned_off(layers: tuple[Path, Path, Path]) -> None:
    lower, upper, merged = layers
    with mounted_cowfs([lower], merged, upper, ("-o", "request_poll=off")):
        ask_missing_xattr(merged / "file", 200)
        counted = statistics(merged)
        assert counted["requests_polled"] == 0
        assert counted["request_sleeps"] >= 200


def test_other_tasks_run_while_requests_stream(layers: tuple[Path, Path, Path]) -> None:
    """A copy-up in a worker thread finishes and the control socket answers while another
    caller keeps the daemon busy without a pause: the loop still passes through the
    scheduler."""
    lower, upper, merged = layers
    with mounted_cowfs([lower], merged, upper):
        stop = threading.Event()
        asked = [0]

        def stream() -> None:
            while not stop.is_set():
                ask_missing_xattr(merged / "file", 1)
                asked[0] += 1

        streamer = threading.Thread(target=stream)
        streamer.start()
        try:
            with open(merged / "large", "r+b") as large:    # a data copy-up in a thread
                large.write(b"changed")
            live = next(mount for mount in cowfs.mounts() if mount.path == str(merged))
            assert live.refresh()["nodes"] >= 0                     # the control socket
            assert live.stats()["statistics"]["data_copies"] == 1
        finally:
            stop.set()
            streamer.join()
        assert asked[0] > 0
        assert (upper / "large").read_bytes()[:7] == b"changed"
        assert (upper / "large").stat().st_size == 3 << 20


def test_reader_lock_is_not_handed_over_while_free() -> None:
    """The reader lock is taken back by the task that released it, without a checkpoint; a
    waiter gets it once that task yields."""
    import trio

    order: list[str] = []

    async def main() -> None:
        lock = request_wait._ReaderLock()
        async with trio.open_nursery() as nursery:
            await lock.__aenter__()

            async def waiter() -> None:
                async with lock:
                    order.append("waiter")

            nursery.start_soon(waiter)
            await trio.sleep(0)                  # the waiter parks on the lock
            await lock.__aexit__()
            await lock.__aenter__()              # free: taken back without waiting
            order.append("again")
            await lock.__aexit__()
    trio.run(main)
    assert order == ["again", "waiter"]
