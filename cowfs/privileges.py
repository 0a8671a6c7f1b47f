"""Which of suid and sgid a change by someone else removes, as the kernel's VFS decides.

With FUSE_HANDLE_KILLPRIV_V2 the FUSE kernel leaves this to the daemon, which runs as root:
its own write, truncate or chown of the upper file keeps bits that the caller's would have
removed. The kernel says per request that the caller lacks CAP_FSETID (write, truncate,
O_TRUNC open) or that the owner changes (chown); this module applies the VFS's rule to the
file's current mode (`setattr_should_drop_suidgid` and `setattr_should_drop_sgid` in the
kernel's fs/attr.c):

- suid goes, on a regular file (on chown: on any non-directory);
- sgid goes if the file is group-executable; without group-execute it marks mandatory
  locking, not privilege, and goes only if the caller is neither in the file's group nor has
  CAP_FSETID.

security.capability is not handled here: the VFS and the upper's filesystem remove it
themselves (docs/ARCHITECTURE.md).
"""

import stat

PRIVILEGE_BITS = stat.S_ISUID | stat.S_ISGID
CAP_FSETID = 4


def bits_to_kill(mode: int, file_gid: int, caller_gid: int, pid: int, *,
                 chown: bool) -> int:
    """The bits of *mode* that a change by the caller (*caller_gid*, thread *pid*) removes.

    For a write or truncate the kernel asks only on behalf of a caller without CAP_FSETID;
    for a chown it always asks, so there the caller's capability is looked up (rarely: only
    for sgid without group-execute, outside the caller's group)."""
    if not mode & PRIVILEGE_BITS:
        return 0
    if stat.S_ISDIR(mode) or not (chown or stat.S_ISREG(mode)):
        return 0
    kill = mode & stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP
                                or not _may_keep_sgid(file_gid, caller_gid, pid, chown=chown)):
        kill |= stat.S_ISGID
    return kill


def _may_keep_sgid(file_gid: int, caller_gid: int, pid: int, *, chown: bool) -> bool:
    """The kernel's in_group_or_capable for a caller that may lack CAP_FSETID (for a write or
    truncate the kernel asked only because it does)."""
    return _in_group(file_gid, caller_gid, pid) or (chown and _has_capability(pid, CAP_FSETID))


def _status(pid: int) -> dict[str, str]:
    """The caller's /proc status fields; none if it is gone (the bits then go: the safe way)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)
    except OSError:
        return {}


def _in_group(file_gid: int, caller_gid: int, pid: int) -> bool:
    """The kernel's in_group_p: the caller's fsgid or one of its supplementary groups."""
    if file_gid == caller_gid:
        return True
    return str(file_gid) in _status(pid).get("Groups", "").split()


def _has_capability(pid: int, capability: int) -> bool:
    """Whether the caller has *capability* effective (in its own user namespace; the kernel
    also wants the file's owner mapped there, which a root daemon's callers have)."""
    effective = _status(pid).get("CapEff")
    return effective is not None and bool(int(effective, 16) >> capability & 1)

