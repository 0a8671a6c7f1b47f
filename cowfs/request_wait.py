"""How the daemon waits for the kernel's next request: it looks at /dev/fuse for a moment
before it sleeps.

A caller that works through the mount (tar, dpkg, a stat walk) sends its next request a few
microseconds after the reply to its last one. Sleeping in epoll between the two costs more than
serving the request: a round trip through trio's scheduler and two wakeups, each an
inter-processor interrupt on a VM. So after each reply the daemon polls the device without
sleeping for up to `SPIN_NS` (yielding the CPU at each turn, in case the caller was woken on
this one), and serves what comes without going through the scheduler. It
goes through it at least every `YIELD_EVERY_NS`, so the mount's other tasks (the control
socket, a copy-up finished in a thread, the durability batches) still run, and always when
nothing came in time: an idle mount sleeps as before.

pyfuse3 takes its event loop functions from its module attribute `trio` (so that
`pyfuse3.asyncio` can replace them); `install` gives it one that is trio but for the two calls
its request loop makes per request: `trio.lowlevel.wait_readable` of the device, and its
reader lock, which as `trio.Lock` yields to the scheduler even when free.
"""

import os
import select
import time
import types
from typing import Any

import trio

# How long a reply waits for the next request before the daemon sleeps: a caller's turnaround
# (return to user space, the next syscall) is 5-30 us here.
SPIN_NS = 50_000
# Polls that caught a request earn the next ones; one that caught nothing costs this many.
MAX_CREDIT = 8
MISS_COST = 4
# The longest the request loop runs without a pass through trio's scheduler.
YIELD_EVERY_NS = 1_000_000


class _ReaderLock:
    """pyfuse3's reader lock, taken without a checkpoint when free. Unlike trio.Lock it is not
    handed to a waiter at release: the task that served a request takes it back at once if it
    is free, and the waiter, woken, finds it so only when that task yields (a handler that
    awaits a thread), and reads the device meanwhile. A fair hand-over would switch tasks
    through the scheduler at every request."""

    __slots__ = ("_held", "_waiters")

    def __init__(self) -> None:
        self._held = False
        self._waiters = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        while self._held:
            await self._waiters.park()
        self._held = True

    async def __aexit__(self, *exc_info: object) -> None:
        self._held = False
        if self._waiters:
            self._waiters.unpark()


class RequestWait:
    """The waits of one daemon, and what they came to (the statistics show it).

    Spinning is earned: each request a poll caught, or that came within `spin_ns` of the
    last reply while the daemon slept, adds a credit (up to `MAX_CREDIT`); each poll that
    caught nothing costs `MISS_COST`. A caller that thinks between its requests (a compiler,
    a shell) soon stops the polling, so the daemon takes no CPU from it or from its other
    processes; one that turns around at once keeps it."""

    def __init__(self, spin_ns: int = SPIN_NS) -> None:
        self.spin_ns = spin_ns
        self.caught = 0       # requests found while polling: served without sleeping
        self.slept = 0        # waits that went through the scheduler
        self.missed = 0       # polls that caught nothing
        self._credit = MAX_CREDIT
        self._poll = select.poll()
        self._fd = -1
        self._last_pass = 0

    async def wait_readable(self, fd: int) -> None:
        now = time.perf_counter_ns()
        if self.spin_ns:
            if fd != self._fd:
                self._watch(fd)
            elif self._credit > 0 and now - self._last_pass < YIELD_EVERY_NS:
                deadline = now + self.spin_ns
                while True:
                    if self._poll.poll(0):
                        self.caught += 1
                        self._credit = min(self._credit + 1, MAX_CREDIT)
                        return
                    os.sched_yield()     # the caller may be waiting for this CPU
                    now = time.perf_counter_ns()
                    if now >= deadline:
                        break
                self._credit -= MISS_COST
                self.missed += 1
        self.slept += 1
        await trio.lowlevel.wait_readable(fd)
        self._last_pass = time.perf_counter_ns()
        if self._last_pass - now < self.spin_ns:
            self._credit = min(self._credit + 1, MAX_CREDIT)   # a poll would have caught it

    def _watch(self, fd: int) -> None:
        if self._fd >= 0:
            self._poll.unregister(self._fd)
        self._poll.register(fd, select.POLLIN)
        self._fd = fd


def spin_by_default() -> int:
    """Polling pays only when the caller runs on another CPU meanwhile: with one CPU to share,
    the daemon would spin while the caller waits for it."""
    return SPIN_NS if len(os.sched_getaffinity(0)) > 1 else 0


def install(wait: RequestWait) -> None:
    """Give pyfuse3 trio with *wait*'s wait and the free reader lock; the rest is trio's.
    (pyfuse3 is imported here, not with the module: it must come after the kernel-cache
    extensions, `cowfs.fuse_extensions`.)"""
    import pyfuse3
    lowlevel = _Delegate(trio.lowlevel, wait_readable=wait.wait_readable)
    pyfuse3.trio = _Delegate(trio, lowlevel=lowlevel, Lock=_ReaderLock)  # type: ignore[attr-defined]


class _Delegate(types.SimpleNamespace):
    """A module whose given attributes are replaced; every other is *base*'s."""

    def __init__(self, base: types.ModuleType | Any, **replaced: Any) -> None:
        super().__init__(**replaced)
        self._base = base

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)
