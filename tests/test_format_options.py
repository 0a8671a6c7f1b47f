"""The kernel overlay's format options, with the kernel's meaning: metacopy=, redirect_dir=,
index=. Each behaviour is compared with `mount -t overlay` given the same options."""

import os
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import cowfs_command, kernel_overlay, mounted_cowfs

from cowfs.options import OptionError, parse

pytestmark = pytest.mark.mounts

METACOPY = "trusted.overlay.metacopy"
REDIRECT = "trusted.overlay.redirect"


@pytest.mark.parametrize(("given", "metacopy", "redirect_dir", "index"), [
    ("", True, "on", True),
    ("redirect_dir=off", False, "off", True),          # the default metacopy gives way
    ("redirect_dir=follow,index=off", False, "follow", False),
    ("metacopy=off", False, "on", True),
    ("metacopy=on,redirect_dir=on,index=on", True, "on", True),
    ("redirect_dir=nofollow", False, "nofollow", True),
])
def test_options_take_the_kernels_meaning(given: str, metacopy: bool, redirect_dir: str,
                                          index: bool) -> None:
    chosen = parse([given]).format
    assert (chosen.metacopy, chosen.redirect_dir, chosen.index) == \
        (metacopy, redirect_dir, index)


@pytest.mark.parametrize(("given", "message"), [
    ("metacopy=on,redirect_dir=off", "conflicting options: metacopy=on,redirect_dir=off"),
    ("metacopy=yes", "expected metacopy=on|off"),
    ("redirect_dir=sometimes", "expected redirect_dir=on|follow|off|nofollow"),
    ("index=1", "expected index=on|off"),
])
def test_bad_format_options_are_refused(given: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(OptionError, match=message):
        parse([given])
    for path in ("lower", "upper", "merged"):
        (tmp_path / path).mkdir()
    before = sorted(tmp_path.rglob("*"))
    result = subprocess.run(cowfs_command("mount", "-o", given, str(tmp_path / "lower"),
                                          str(tmp_path / "upper"), str(tmp_path / "merged")),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(tmp_path.rglob("*")) == before, "a refused mount makes nothing"


def view(root: Path) -> dict[str, object]:
    """Every path's type, mode, owner, size and content (or the errno of its lstat)."""
    seen: dict[str, object] = {}
    for directory, subdirectories, files in os.walk(root):
        for name in sorted([*subdirectories, *files]):
            path = Path(directory, name)
            relative = str(path.relative_to(root))
            try:
                st = os.lstat(path)
            except OSError as exc:
                seen[relative] = exc.strerror
                continue
            content = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
            seen[relative] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                              st.st_size if not stat.S_ISDIR(st.st_mode) else None, content)
    return seen


def make_lower(lower: Path) -> None:
    (lower / "dir").mkdir()
    (lower / "dir" / "inner").write_text("inner")
    (lower / "file").write_text("lower data")
    (lower / "linked").write_text("two names")
    os.link(lower / "linked", lower / "other")


def change(merged: Path, *, expect_exdev: bool) -> None:
    """The same changes through either implementation."""
    os.chmod(merged / "file", 0o600)
    os.chown(merged / "dir" / "inner", 1000, 1000)
    try:
        os.rename(merged / "dir", merged / "moved")
        assert not expect_exdev, "a lower directory moved without a redirect"
    except OSError as exc:
        assert expect_exdev and exc.errno == 18, exc       # EXDEV: mv copies it instead
    os.unlink(merged / "linked")


def test_an_upper_written_with_metacopy_off_and_redirect_dir_off_reads_under_a_default_kernel(
        layer_dirs) -> None:
    lower, upper, kernel_upper, merged = layer_dirs("lower", "upper", "kernel_upper", "merged")
    make_lower(lower)
    options = "metacopy=off,redirect_dir=off,index=off"
    with kernel_overlay([lower], merged, kernel_upper, options):
        change(merged, expect_exdev=True)
        expected = view(merged)
    with mounted_cowfs([lower], merged, upper, extra=("-o", options)) as mount:
        change(merged, expect_exdev=True)
        assert view(merged) == expected
        mount.unmount()
    assert METACOPY not in os.listxattr(upper / "file"), "metacopy=off copies the data"
    assert (upper / "file").read_text() == "lower data"
    assert not (upper.parent / ".upper.cowfs-work" / "cowfs" / "index").exists() or \
        not os.listdir(upper.parent / ".upper.cowfs-work" / "cowfs" / "index")
    with kernel_overlay([lower], merged, upper):      # the kernel's defaults
        assert view(merged) == expected


def test_metacopy_off_refuses_a_metacopy_and_nofollow_a_redirect_as_the_kernel(
        layer_dirs) -> None:
    lower, upper, merged = layer_dirs("lower", "upper", "merged")
    make_lower(lower)
    with open(upper / "file", "wb") as file:
        file.truncate(len("lower data"))
    os.setxattr(upper / "file", METACOPY, b"")
    (upper / "moved").mkdir()
    os.setxattr(upper / "moved", REDIRECT, b"/dir")
    os.mknod(upper / "dir", stat.S_IFCHR, 0)
    # By name: the kernel also lists a name whose lookup fails, which cowfs leaves out.
    names = ["file", "moved", "moved/inner", "dir", "linked"]
    for options in ("metacopy=off", "metacopy=off,redirect_dir=nofollow", "metacopy=on"):
        with kernel_overlay([lower], merged, upper, options):
            expected = probe(merged, names)
        with mounted_cowfs([lower], merged, upper, extra=("-o", options)):
            assert probe(merged, names) == expected, options
    assert expected["file"] == (stat.S_IFREG, b"lower data")   # metacopy=on: the data below


def probe(root: Path, names: list[str]) -> dict[str, object]:
    """Each name's type and content, or the errno name of its failure."""
    found: dict[str, object] = {}
    for name in names:
        path = root / name
        try:
            mode = stat.S_IFMT(os.lstat(path).st_mode)
            found[name] = (mode, path.read_bytes() if mode == stat.S_IFREG else None)
        except OSError as exc:
            found[name] = exc.strerror
    return found


def test_a_chmod_of_a_lower_file_with_two_names_copies_no_data(layer_dirs) -> None:
    lower, upper, merged = layer_dirs("lower", "upper", "merged")
    (lower / "big").write_bytes(b"x" * (1 << 20))
    os.link(lower / "big", lower / "alias")
    with mounted_cowfs([lower], merged, upper) as mount:
        os.stat(merged / "alias")
        os.chmod(merged / "big", 0o600)
        assert stat.S_IMODE(os.stat(merged / "alias").st_mode) == 0o600
        assert (merged / "alias").read_bytes() == b"x" * (1 << 20)
        mount.unmount()
    assert METACOPY in os.listxattr(upper / "big")
    assert os.stat(upper / "big").st_blocks <= 8, "no data copied (at most an xattr block)"
    with mounted_cowfs([lower], merged, upper):          # after remount, through either name
        assert (merged / "alias").read_bytes() == (merged / "big").read_bytes()
        os.truncate(merged / "alias", 3)                 # the data follows, for both names
        assert (merged / "big").read_bytes() == b"xxx"
    with kernel_overlay([lower], merged, upper, "metacopy=on,index=on"):
        assert (merged / "big").read_bytes() == b"xxx"


def numbers(root: Path, paths: list[str]) -> dict[str, tuple[int, int]]:
    """st_ino of each path, and the d_ino its directory's listing gives it."""
    found = {}
    for path in paths:
        parent = (root / path).parent
        listed = {entry.name: entry.inode() for entry in os.scandir(parent)}
        found[path] = (os.lstat(root / path).st_ino, listed[Path(path).name])
    return found


@pytest.mark.parametrize("writer", ["cowfs", "kernel"])
def test_a_copied_up_file_keeps_its_number_whichever_implementation_reads(
        layer_dirs, writer: str) -> None:
    """The kernel's overlay.origin (file handle and filesystem uuid) is written and read: a
    copy shows the lower file's inode number under cowfs and under the kernel alike."""
    lower, upper, merged = layer_dirs("lower", "upper", "merged")
    make_lower(lower)
    paths = ["file", "dir", "dir/inner"]
    lower_numbers = {path: os.lstat(lower / path).st_ino for path in paths}
    if writer == "cowfs":
        with mounted_cowfs([lower], merged, upper) as mount:
            os.chmod(merged / "file", 0o600)
            os.chown(merged / "dir" / "inner", 1000, 1000)
            mount.unmount()
        assert "trusted.overlay.origin" in os.listxattr(upper / "file")
        assert os.getxattr(upper / "dir", "trusted.overlay.impure") == b"y"
        reader = kernel_overlay([lower], merged, upper, "metacopy=on")
    else:
        with kernel_overlay([lower], merged, upper):
            os.chmod(merged / "file", 0o600)
            os.chown(merged / "dir" / "inner", 1000, 1000)
        reader = mounted_cowfs([lower], merged, upper)
    with reader:
        assert numbers(merged, paths) == {path: (number, number)
                                          for path, number in lower_numbers.items()}


@pytest.mark.parametrize("forked", [True, False])
def test_the_library_takes_the_format_options(layer_dirs, forked: bool) -> None:
    """`cowfs.mounted(format_options=...)`, forked or through `cowfs mount` (a threaded
    caller): a lower directory cannot move without redirects."""
    import threading

    import cowfs
    lower, upper, merged = layer_dirs("lower", "upper", "merged")
    make_lower(lower)
    chosen = cowfs.FormatOptions.from_options(metacopy=False, redirect_dir="off")
    stop = threading.Event()
    helper = None if forked else threading.Thread(target=stop.wait)
    if helper is not None:
        helper.start()
    try:
        with cowfs.mounted([str(lower)], str(merged), upper=str(upper), format_options=chosen):
            with pytest.raises(OSError) as refused:
                os.rename(merged / "dir", merged / "moved")
            assert refused.value.errno == 18                    # EXDEV
            os.chmod(merged / "file", 0o600)
    finally:
        stop.set()
        if helper is not None:
            helper.join()
    assert METACOPY not in os.listxattr(upper / "file")
