"""`-o watch`: refresh by itself what changes in the lower layers, heard through inotify.

Only the lower directories of merged directories the kernel has looked up are watched (a
watch costs about 1 KiB of kernel memory; a whole image's tree would cost more than a mount),
added as the kernel learns of them. Events are gathered for a moment and become one
`Operations.refresh` of the paths they name, as `cowfs refresh MERGED PATH...` would do; an
overflowed queue refreshes everything. The kernel only tells of changes made through the
directory itself: a layer swapped underneath (a bind mount replaced) is not heard.
"""

import logging
import os
from collections.abc import Awaitable, Callable, Sequence

import trio

from cowfs import _at, _libc
from cowfs.lookup import UPPER, Directory, DirectoryFds

log = logging.getLogger(__name__)

# What is heard of a watched lower directory: names made, gone or moved, files written.
EVENTS = (_libc.IN_CREATE | _libc.IN_DELETE | _libc.IN_MOVED_FROM | _libc.IN_MOVED_TO
          | _libc.IN_CLOSE_WRITE | _libc.IN_MODIFY | _libc.IN_ATTRIB | _libc.IN_DELETE_SELF
          | _libc.IN_MOVE_SELF | _libc.IN_ONLYDIR)
# Events of a burst (an untar, a registry sync) wait this long for the rest of it.
GATHER_S = 0.05


class LowerWatch:
    """The inotify watches of one mount's lower directories, and what they heard."""

    def __init__(self, refresh: Callable[[Sequence[str] | None], Awaitable[object]]) -> None:
        self._refresh = refresh
        self._fd = _libc.inotify_init(_libc.IN_NONBLOCK | _libc.IN_CLOEXEC)
        # watch -> its directory in the view, and that directory's (st_dev, st_ino)
        self._paths: dict[int, tuple[str, tuple[int, int]]] = {}
        self._watched: set[tuple[int, int]] = set()
        self._full = False

    def close(self) -> None:
        os.close(self._fd)

    def add(self, fds: DirectoryFds, directory: Directory, path: str) -> None:
        """Watch the lower copies of *directory*, which the view shows at *path*."""
        if self._full:
            return
        for layer in directory.layers:
            if layer == UPPER and fds.stack.upper is not None:
                continue              # only cowfs changes the upper
            try:
                fd = fds.fd(directory, layer)
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) in self._watched:
                    continue
                watch = _libc.inotify_add_watch(self._fd, _at.fd_path(fd), EVENTS)
            except OSError as exc:
                if exc.errno == 28:     # ENOSPC: max_user_watches reached
                    log.warning("-o watch: no more inotify watches (%s); later directories "
                                "are not watched", exc)
                    self._full = True
                    return
                log.debug("-o watch: %s not watched: %s", path, exc)
                continue
            self._watched.add((st.st_dev, st.st_ino))
            self._paths[watch] = (path, (st.st_dev, st.st_ino))

    async def run(self) -> None:
        """Refresh what the events name, until cancelled."""
        while True:
            await trio.lowlevel.wait_readable(self._fd)
            await trio.sleep(GATHER_S)
            paths: set[str] | None = set()
            while True:
                try:
                    data = os.read(self._fd, 1 << 16)
                except BlockingIOError:
                    break
                for watch, mask, name in _libc.inotify_events(data):
                    if mask & _libc.IN_Q_OVERFLOW:
                        paths = None
                        continue
                    watched = self._paths.get(watch)
                    if watched is None:
                        continue
                    if mask & _libc.IN_IGNORED:       # the directory went
                        del self._paths[watch]
                        self._watched.discard(watched[1])
                    if paths is not None:
                        paths.add(os.path.join(watched[0], name) if name else watched[0])
            if paths is None or paths:
                log.debug("-o watch: refreshing %s", "everything" if paths is None
                          else sorted(paths))
                await self._refresh(None if paths is None else sorted(paths))
