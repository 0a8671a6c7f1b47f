"""When the upper's changes reach the disk: the user's choice of `-o fsync=strict|batch|volatile`.

Every copy-up and whiteout is atomic in every mode (made in the workdir, renamed into place);
the modes differ in when that rename, and a copy's data, are durable:

- `strict`: before the change is visible, as the kernel does it: a copied file is fsynced
  before its rename, and the directory it lands in after (the kernel skips that second sync).
- `batch` (the default): durable at the next fsync or syncfs a user asks for, at unmount, or
  within `BATCH_DELAY_S`: one syncfs of the upper's filesystem covers every change since the last.
- `volatile`: never synced, not even when a user asks (the kernel's `volatile`); a marker in the
  workdir while mounted makes a mount after a crash refuse the upper, under cowfs and under the
  kernel alike, since it may hold half-written copies. A clean unmount syncs once and removes it.
"""

import errno
import os

from cowfs import _at, _libc
from cowfs.layers import KERNEL_VOLATILE_MARKER, LayerStack

STRICT, BATCH, VOLATILE = "strict", "batch", "volatile"
MODES = (STRICT, BATCH, VOLATILE)
BATCH_DELAY_S = 1.0


class Durability:
    """Syncs the upper as its mode asks; a mount calls `flush` every `BATCH_DELAY_S`."""

    def __init__(self, stack: LayerStack, mode: str = BATCH) -> None:
        if mode not in MODES:
            raise ValueError(f"fsync must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.pending = False        # changes made since the last syncfs
        self.syncs = 0              # syncfs and fsync calls made, for the statistics
        self._syncing = False
        assert stack.upper is not None and stack.work is not None
        # syncfs and fsync need an fd opened for reading: the layer fds are O_PATH.
        self._upper_fd = os.open(_at.fd_path(stack.upper.fd), os.O_RDONLY | os.O_DIRECTORY)
        self._marker: str | None = None
        if mode == VOLATILE:
            self._marker = os.path.join(stack.work.path, *KERNEL_VOLATILE_MARKER)
            os.makedirs(self._marker, exist_ok=True)

    @property
    def sync_copies(self) -> bool:
        """Whether a copied file's data is fsynced before its rename (the kernel's way)."""
        return self.mode == STRICT

    def changed(self, directory_fd: int) -> None:
        """A name in the upper directory *directory_fd* (an O_PATH fd) was placed or replaced."""
        if self.mode == STRICT:
            fd = os.open(_at.fd_path(directory_fd), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self.syncs += 1
        else:
            self.pending = True

    def flush(self) -> None:
        """One syncfs for every change since the last (batch); volatile mounts never sync."""
        if self.pending and self.mode != VOLATILE:
            self._syncfs()

    def close(self) -> None:
        """At a clean unmount: everything durable, the volatile marker gone."""
        if self._upper_fd < 0:
            return
        if self.pending or self.mode == VOLATILE:
            self._syncfs()
        if self._marker is not None:
            _remove_marker(self._marker)
        os.close(self._upper_fd)
        self._upper_fd = -1

    def _syncfs(self) -> None:
        # Changes made while it runs (it may run in a worker thread) stay pending for the
        # next; `unsynced` stays true until this one is counted.
        self.pending = False
        self._syncing = True
        try:
            _libc.syncfs(self._upper_fd)
        finally:
            self.syncs += 1
            self._syncing = False

    @property
    def unsynced(self) -> bool:
        """Changes not yet durable, a sync under way included."""
        return self.pending or self._syncing


def _remove_marker(marker: str) -> None:
    """Remove `work/incompat/volatile` and the parents it needed, if they are empty now."""
    path = marker
    for _ in KERNEL_VOLATILE_MARKER:
        try:
            os.rmdir(path)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
                raise
            if exc.errno != errno.ENOENT:
                return
        path = os.path.dirname(path)
