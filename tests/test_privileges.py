"""The VFS's rule for what a change by someone else removes of suid and sgid (no FUSE)."""

import os
import stat

import pytest

from cowfs.privileges import bits_to_kill

OTHER_GROUP = 4242      # a group this test's process is not in
REGULAR = stat.S_IFREG


@pytest.mark.parametrize(("mode", "killed"), [
    (0o4755, 0o4000),               # suid always goes
    (0o2775, 0o2000),               # sgid with group-execute goes
    (0o6775, 0o6000),
    (0o2664, 0o2000),               # sgid without group-execute, caller outside the group
    (0o0777, 0),
])
def test_a_write_kills_suid_and_an_executable_or_foreign_sgid(mode: int, killed: int) -> None:
    assert bits_to_kill(REGULAR | mode, OTHER_GROUP, os.getgid(), os.getpid(),
                        chown=False) == killed


def test_sgid_without_group_execute_stays_in_the_callers_group() -> None:
    assert bits_to_kill(REGULAR | 0o2664, os.getgid(), os.getgid(), os.getpid(),
                        chown=False) == 0
    assert bits_to_kill(REGULAR | 0o6664, os.getgid(), os.getgid(), os.getpid(),
                        chown=False) == 0o4000


def test_a_chown_by_a_caller_with_cap_fsetid_keeps_a_foreign_sgid() -> None:
    """The kernel asks on every chown, so there the caller's capability decides."""
    capable = os.geteuid() == 0
    expected = 0o4000 if capable else 0o6000
    assert bits_to_kill(REGULAR | 0o6664, OTHER_GROUP, os.getgid(), os.getpid(),
                        chown=True) == expected


def test_directories_keep_their_bits_and_a_vanished_caller_loses_a_foreign_sgid() -> None:
    assert bits_to_kill(stat.S_IFDIR | 0o6775, OTHER_GROUP, 0, os.getpid(), chown=True) == 0
    assert bits_to_kill(REGULAR | 0o2664, OTHER_GROUP, os.getgid(), 2**22 + 1,
                        chown=False) == 0o2000
