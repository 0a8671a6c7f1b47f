"""Live mounts: find them, and ask their daemons for statistics, a refresh or a layer change.

Every daemon listens on a socket named after its FUSE connection's device (`major:minor`, as
/proc/self/mountinfo shows it), in the owner's runtime directory (`cowfs.client`): so any cowfs
process of that user finds each live mount from mountinfo alone, whoever mounted it and whether
or not a supervisor runs. One request per connection, a JSON object answered by one; the daemon
hears only its own user and root (the socket is 0600 in a 0700 directory, and it checks the
peer's credentials too).
"""

import dataclasses
import json
import os
import socket

from cowfs.client import runtime_directory
from cowfs.layers import MountInfo, read_mountinfo

FSTYPE = "fuse.cowfs"
# A refresh or layer change of a large tree waits for the kernel to drop what it cached.
REQUEST_TIMEOUT_S = 300.0
MAX_MESSAGE = 16 << 20


class ControlError(Exception):
    """A live mount cannot be found or does not do what was asked; the message says why."""


@dataclasses.dataclass(frozen=True)
class LiveMount:
    mountpoint: str
    device: str          # major:minor of the FUSE connection


def socket_directory() -> str | None:
    directory = runtime_directory()
    return os.path.join(directory, "mounts") if directory else None


def socket_path(device: str) -> str | None:
    directory = socket_directory()
    return os.path.join(directory, f"{device}.sock") if directory else None


def live_mounts() -> list[LiveMount]:
    """The cowfs mounts of this mount namespace, in mount order."""
    return [LiveMount(mount.mountpoint, mount.device) for mount in read_mountinfo()
            if mount.fstype == FSTYPE]


def find_mount(path: str) -> LiveMount:
    """The live mount whose merged view is at *path*."""
    resolved = os.path.realpath(path)
    found = [mount for mount in live_mounts() if mount.mountpoint == resolved]
    if not found:
        raise ControlError(f"{path} is not a cowfs mount")
    return found[-1]                 # the one on top, if mounted over


def own_device(mountpoint: str, mounts: list[MountInfo]) -> str | None:
    """The device of the cowfs mount at *mountpoint* (the last mounted there)."""
    devices = [mount.device for mount in mounts
               if mount.mountpoint == mountpoint and mount.fstype == FSTYPE]
    return devices[-1] if devices else None


def request(mount: LiveMount, message: dict[str, object]) -> dict[str, object]:
    """Send *message* to the daemon of *mount*; its answer, or ControlError with its reason."""
    path = socket_path(mount.device)
    if path is None:
        raise ControlError("no runtime directory to find daemons in (set XDG_RUNTIME_DIR)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as connection:
        connection.settimeout(REQUEST_TIMEOUT_S)
        try:
            connection.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"the daemon of {mount.mountpoint} does not answer (mounted by "
                               "an older cowfs, by another user, or it died)") from None
        except PermissionError:
            raise ControlError(f"the daemon of {mount.mountpoint} belongs to another user") \
                from None
        connection.sendall(json.dumps(message).encode() + b"\n")
        connection.shutdown(socket.SHUT_WR)
        reply = _receive(connection)
    if not reply:
        raise ControlError(f"the daemon of {mount.mountpoint} hung up without an answer")
    answer = json.loads(reply)
    if "error" in answer:
        raise ControlError(answer["error"])
    return answer


def _receive(connection: socket.socket) -> bytes:
    chunks = []
    size = 0
    while chunk := connection.recv(1 << 16):
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_MESSAGE:
            raise ControlError("the daemon's answer is too large")
    return b"".join(chunks)


def describe(mount: LiveMount) -> dict[str, object]:
    """What the daemon says of its mount: layers, options, pid, statistics."""
    return request(mount, {"command": "stats"})


def describe_all() -> list[dict[str, object]]:
    """Every live mount of the caller's, described; one that does not answer says why."""
    described = []
    for mount in live_mounts():
        try:
            described.append(describe(mount))
        except ControlError as exc:
            described.append({"merged": mount.mountpoint, "error": str(exc)})
    return described


def relative_path(mount: LiveMount, path: str) -> str:
    """*path* within the merged view: absolute under the mount point, or relative to it."""
    if os.path.isabs(path):
        normal = os.path.normpath(path)
        if normal != mount.mountpoint and not normal.startswith(mount.mountpoint + "/"):
            raise ControlError(f"{path} is not inside the mount {mount.mountpoint}")
        path = os.path.relpath(normal, mount.mountpoint)
    normal = os.path.normpath(path)
    if normal == ".." or normal.startswith("../"):
        raise ControlError(f"{path} is not inside the mount {mount.mountpoint}")
    return "" if normal == "." else normal
