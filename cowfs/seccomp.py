"""The syscall filter of `cowfs run`: what root in the sandbox may not ask of the host's kernel.

Namespaces do not cover the whole kernel: a payload that is host root could still load modules,
kexec, reboot, swap, set the clock, read the kernel's keyrings and log, or reach it through
bpf, perf, userfaultfd or io_uring. The profile has the scope of the OCI/podman default, as a
list of what is denied (everything else is allowed), so a program that works under podman
works here. Differences, on purpose: the host-wide families stay denied whatever capabilities
the payload keeps (without a user namespace its capabilities are the host's), and only
`--security-opt seccomp=unconfined` lifts them; mount and namespace calls are denied unless
the payload keeps CAP_SYS_ADMIN, as in podman.

libseccomp (through pyseccomp) turns the list into BPF for every ABI of the machine (x86_64,
i386 and x32 on x86_64), with the syscall numbers of each; the program is built in the
caller and handed to the payload as bytes, which loads it just before exec with one prctl.
"""

import contextlib
import errno
import functools
import os

from cowfs import _libc

# family -> the syscalls it denies; a family is what a test probes and a user reads about.
HOST_WIDE = {
    "kexec": ("kexec_load", "kexec_file_load"),
    "modules": ("init_module", "finit_module", "delete_module", "create_module",
                "query_module", "get_kernel_syms"),
    "reboot": ("reboot",),
    "swap": ("swapon", "swapoff"),
    "clock": ("settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "stime"),
    "accounting": ("acct",),
    "quota": ("quotactl", "quotactl_fd"),
    "io_ports": ("iopl", "ioperm"),
    "keyring": ("keyctl", "add_key", "request_key"),
    "bpf": ("bpf",),
    "perf": ("perf_event_open",),
    "userfaultfd": ("userfaultfd",),
    "file_handles": ("open_by_handle_at",),
    "io_uring": ("io_uring_setup", "io_uring_enter", "io_uring_register"),
    "kernel_log": ("syslog",),
    "obsolete": ("uselib", "_sysctl", "ustat", "sysfs", "nfsservctl", "lookup_dcookie",
                 "vm86", "vm86old"),
}
# Denied unless the payload keeps CAP_SYS_ADMIN (then it may mount and make namespaces).
NAMESPACES = {
    "mount": ("mount", "umount", "umount2", "pivot_root", "move_mount", "open_tree", "fsopen",
              "fsconfig", "fsmount", "fspick", "mount_setattr"),
    "namespaces": ("unshare", "setns"),
}
# clone(2) with one of these flags makes a namespace; clone3 answers ENOSYS (its flags sit in
# memory a filter cannot read), so the C library falls back to clone, which is checked.
CLONE_NAMESPACE_FLAGS = (_libc.CLONE_NEWNS, _libc.CLONE_NEWCGROUP, _libc.CLONE_NEWUTS,
                         _libc.CLONE_NEWIPC, _libc.CLONE_NEWUSER, _libc.CLONE_NEWPID,
                         _libc.CLONE_NEWNET)
CAP_SYS_ADMIN = _libc.capability_number("sys_admin")


class SeccompError(Exception):
    """The filter cannot be built here (no libseccomp); the message says how to go on."""


def families(*, sys_admin: bool) -> dict[str, tuple[str, ...]]:
    """The denied families for a payload that keeps CAP_SYS_ADMIN or not."""
    return dict(HOST_WIDE) if sys_admin else {**HOST_WIDE, **NAMESPACES}


def preload() -> None:
    """Import pyseccomp now (it runs ldconfig twice to find its libraries, ~5 ms), so that a
    caller can do it while it waits for something else; `build` reports a failure."""
    with contextlib.suppress(ImportError, RuntimeError):
        import pyseccomp  # noqa: F401


@functools.lru_cache(maxsize=16)
def build(capabilities: frozenset[int]) -> bytes:
    """The BPF program of the default profile for a payload keeping *capabilities*; kept, so
    that a supervisor builds the default one once for every warm `cowfs run` (2-3 ms each)."""
    try:
        import pyseccomp
    except (ImportError, RuntimeError) as exc:      # RuntimeError: no libseccomp.so found
        raise SeccompError(f"cannot build the seccomp profile ({exc}); install libseccomp2 "
                           "or run with --security-opt seccomp=unconfined") from None
    denied = pyseccomp.ERRNO(errno.EPERM)
    profile = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    if pyseccomp.system_arch() == pyseccomp.Arch.X86_64:
        for arch in (pyseccomp.Arch.X86, pyseccomp.Arch.X32):
            profile.add_arch(arch)
    elif pyseccomp.system_arch() == pyseccomp.Arch.AARCH64:
        profile.add_arch(pyseccomp.Arch.ARM)
    sys_admin = CAP_SYS_ADMIN in capabilities
    for names in families(sys_admin=sys_admin).values():
        for name in names:
            # A name this libseccomp does not know is in no ABI it can filter either.
            if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) != -1:
                profile.add_rule(denied, name)
    if not sys_admin:
        for flag in CLONE_NAMESPACE_FLAGS:
            profile.add_rule(denied, "clone", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag))
        profile.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    with os.fdopen(os.memfd_create("cowfs-seccomp"), "w+b") as program:
        profile.export_bpf(program)
        program.seek(0)
        return program.read()
