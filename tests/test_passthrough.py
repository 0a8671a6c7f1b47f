"""FUSE passthrough (`-o passthrough=on`, libfuse 3.17: opt-in, tests/libfuse317.py says how):
file data goes between the kernel and the backing file, and no READ or WRITE request reaches
the daemon; the kernel's rules (one backing file per inode, no cached open beside a
passthrough one) are kept by answering the opens that cannot pass through direct I/O."""

import contextlib
import dataclasses
import json
import mmap
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_write_oracle as oracle
from conftest import kernel_overlay, mounted_cowfs
from hypothesis import given, settings
from hypothesis import strategies as st
from libfuse317 import REQUIRED, launcher
from write_model import WriteStack, write_stacks

pytestmark = REQUIRED

MIB = 1 << 20
# Write-oracle sequences run with passthrough (tests/test_write_oracle.py runs 300 without).
SEQUENCES = int(os.environ.get("COWFS_PASSTHROUGH_SEQUENCES", "20"))


def statistics(merged: Path) -> dict:
    return json.loads(os.getxattr(merged, "trusted.cowfs.stats"))


def data_requests(merged: Path) -> int:
    requests = statistics(merged)["requests"]
    return requests.get("read", 0) + requests.get("write", 0)


@contextlib.contextmanager
def passthrough_mount(package: Path, lower: Path, upper: Path, merged: Path) -> Iterator[Path]:
    with mounted_cowfs([lower], merged, upper, extra=("-o", "passthrough=on"),
                       launcher=launcher(package)) as mount:
        features = statistics(merged)["kernel_features"]
        assert features["passthrough"], (features, mount.log())
        # Passthrough writes never reach the daemon, which then could not kill suid/sgid.
        assert not features["killpriv_v2"], features
        yield merged
        mount.unmount()


def test_data_of_upper_files_never_reaches_the_daemon(package_317: Path, layer_dirs) -> None:
    lower, upper, merged = layer_dirs("lower", "upper", "merged")
    content = os.urandom(8 * MIB)
    (upper / "big").write_bytes(content)
    (lower / "small").write_bytes(b"0123456789")
    with passthrough_mount(package_317, lower, upper, merged):
        assert (merged / "big").read_bytes() == content
        with open(merged / "big", "rb") as file, \
                mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            assert mapped[MIB:MIB + 4096] == content[MIB:MIB + 4096]
        (merged / "new").write_bytes(b"n" * MIB)
        with open(merged / "small", "r+b") as file:      # copied up, then written
            file.seek(4)
            file.write(b"ab")
        with open(merged / "small", "ab") as file:
            file.write(b"tail")
        with open(merged / "new", "r+b") as file:
            file.truncate(4096)
            with mmap.mmap(file.fileno(), 4096) as mapped:
                mapped[:5] = b"hello"
                mapped.flush()
            os.fsync(file.fileno())
        assert (merged / "small").read_bytes() == b"0123ab6789tail"
        assert os.stat(merged / "new").st_size == 4096
        assert data_requests(merged) == 0, statistics(merged)["requests"]
        counts = statistics(merged)
        assert counts["passthrough_opens"] >= 4 and counts["conflicting_opens"] == 0, counts
    assert (upper / "small").read_bytes() == b"0123ab6789tail"
    assert (upper / "new").read_bytes() == b"hello" + b"n" * 4091
    assert (upper / "big").read_bytes() == content


def test_a_lower_file_is_read_through_the_daemon_until_copied_up(package_317: Path,
                                                                 layer_dirs) -> None:
    """The kernel keeps an inode's backing file while any passthrough open of it lasts, so a
    lower file, which a copy-up replaces, is read through the daemon (and the page cache):
    its reader and the writer that copies it up see one file, read() and mmap alike, as
    without passthrough. The copy then passes through, for every open at once."""
    lower, upper, merged = layer_dirs("lower", "upper", "merged")
    (lower / "file").write_bytes(b"old contents")
    with passthrough_mount(package_317, lower, upper, merged):
        with open(merged / "file", "rb") as reader, \
                mmap.mmap(reader.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            assert reader.read(3) == b"old"
            assert data_requests(merged) >= 1
            with open(merged / "file", "r+b") as writer:
                writer.write(b"NEW")
            assert (upper / "file").read_bytes() == b"NEW contents"
            assert os.pread(reader.fileno(), 12, 0) == b"NEW contents"
            assert mapped[:] == b"NEW contents"
        counts = statistics(merged)
        assert counts["passthrough_opens"] == 0 and counts["conflicting_opens"] == 0, counts
        before = data_requests(merged)
        with open(merged / "file", "rb") as first, \
                open(merged / "file", "r+b", buffering=0) as second:
            second.write(b"new")
            assert first.read() == b"new contents"
        counts = statistics(merged)
        assert counts["passthrough_opens"] == 2 and counts["backing_files_opened"] == 1, counts
        assert counts["conflicting_opens"] == 0 and data_requests(merged) == before, counts


def test_without_an_upper_lower_files_pass_through(package_317: Path, layer_dirs) -> None:
    lower, merged = layer_dirs("lower", "merged")
    content = os.urandom(MIB)
    (lower / "file").write_bytes(content)
    with mounted_cowfs([lower], merged, extra=("-o", "passthrough=on"),
                       launcher=launcher(package_317)) as mount:
        assert (merged / "file").read_bytes() == content
        assert data_requests(merged) == 0
        assert statistics(merged)["passthrough_opens"] == 1
        mount.unmount()


def test_setuid_is_cleared_as_by_the_kernels_overlay(package_317: Path,
                                                     world_readable_dirs: Path) -> None:
    """Writes pass the daemon by, which runs as root and could keep setuid: the kernel must
    still clear it (and file capabilities) when another user writes."""
    results = {}
    for name in ("cowfs", "overlay"):
        root = world_readable_dirs / name
        lower, upper, merged = (root / part for part in ("lower", "upper", "merged"))
        for path in (root, lower, upper, merged):
            path.mkdir(mode=0o755)
            path.chmod(0o755)
        for file_name in ("setuid", "capable"):
            (lower / file_name).write_bytes(b"data\n")
            os.chown(lower / file_name, 1000, 1000)
        (lower / "setuid").chmod(0o6777)
        (lower / "capable").chmod(0o777)
        os.setxattr(lower / "capable", "security.capability",
                    bytes.fromhex("0100000200200000000000000000000000000000"))
        mounted = (passthrough_mount(package_317, lower, upper, merged) if name == "cowfs"
                   else kernel_overlay([lower], merged, upper))
        with mounted:
            subprocess.run(["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups",
                            "sh", "-c", f"echo more >> {merged}/setuid; "
                                        f"echo more >> {merged}/capable"], check=True)
            results[name] = [(os.stat(merged / file_name).st_mode,
                              os.listxattr(merged / file_name))
                             for file_name in ("setuid", "capable")]
            if name == "cowfs":
                assert data_requests(merged) == 0
    assert results["cowfs"] == results["overlay"]
    assert results["cowfs"][0][0] & 0o6000 == 0


@contextlib.contextmanager
def written_on_317(package: Path, option: str, lowers: list[Path], upper: Path, workdir: Path,
                   merged: Path, seen: list[dict]) -> Iterator[Path]:
    with mounted_cowfs(lowers, merged, upper,
                       extra=("--workdir", str(workdir), "-o", option),
                       launcher=launcher(package)) as mount:
        yield merged
        seen.append(statistics(merged))
        mount.unmount()


@pytest.mark.parametrize("option", ["passthrough=on", "passthrough=off"])
def test_writes_on_libfuse_317_match_overlayfs(package_317: Path, option: str) -> None:
    """The write oracle's sequences (cowfs's default format) written on libfuse 3.17, with
    passthrough, and without it (then with killpriv_v2 and O_TMPFILE's table), read back by
    the kernel and by cowfs."""
    seen: list[dict] = []
    subject = dataclasses.replace(
        oracle.COWFS, name=f"cowfs on libfuse 3.17, {option}",
        mount=lambda combination, lowers, upper, workdir, merged: written_on_317(
            package_317, option, lowers, upper, workdir, merged, seen))

    @settings(max_examples=SEQUENCES, deadline=None, suppress_health_check=oracle.SLOW_EXAMPLES)
    @given(stack=write_stacks(), data=st.data())
    def check(stack: WriteStack, data: st.DataObject) -> None:
        oracle.run_write_sequence(stack, data, subject, oracle.ALL_ON)

    check()
    assert oracle.compared[(subject.name, str(oracle.ALL_ON))] >= SEQUENCES
    if option == "passthrough=on":
        assert sum(stats["passthrough_opens"] for stats in seen) >= SEQUENCES    # it did
    else:
        assert all(stats["kernel_features"]["killpriv_v2"] for stats in seen), seen[:1]
