"""Metadata-only copies (the kernel's metacopy) in lower layers: their data, or the kernel's error.

A kept upper stacked as a layer holds metacopy files whose data is in the layers below. cowfs
must read them as the kernel's overlayfs does (`metacopy=on`): the data found below, following
redirects, or the kernel's errno where there is none, never the metacopy's own zeros. Each odd
case is compared with the kernel, and copy-up through such a layer must copy the real data.
"""

import contextlib
import errno
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import cowfs_command, mounted_cowfs, unmount_quietly
from conftest import kernel_overlay as mounted_kernel

pytestmark = pytest.mark.mounts

METACOPY = "trusted.overlay.metacopy"
REDIRECT = "trusted.overlay.redirect"


def run_cowfs(*arguments: str) -> None:
    result = subprocess.run(cowfs_command(*arguments), capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


@contextlib.contextmanager
def background_cowfs(layers: str, *more: str) -> Iterator[None]:
    """`cowfs mount LAYERS [UPPER] MERGED` ... `cowfs umount MERGED`, as a user types them."""
    run_cowfs("mount", layers, *more)
    try:
        yield
    finally:
        run_cowfs("umount", more[-1])
        unmount_quietly(more[-1])


def kernel_overlay(lowers: list[Path], merged: Path, upper: Path | None = None
                   ) -> contextlib.AbstractContextManager[Path]:
    """The kernel's overlayfs reading metacopies and redirects."""
    return mounted_kernel(lowers, merged, upper, "metacopy=on,redirect_dir=on")


def make_metacopy(path: Path, size: int, *, value: bytes = b"",
                  redirect: str | None = None) -> None:
    """A metacopy file as the kernel writes one: sparse, of the data's size, marked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        file.truncate(size)
    os.setxattr(path, METACOPY, value)
    if redirect is not None:
        os.setxattr(path, REDIRECT, os.fsencode(redirect))


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def seen(path: Path) -> object:
    """What a user gets for *path*: its errno name, or type, mode, size, blocks, inode, data."""
    try:
        st = os.lstat(path)
        content: object = None
        if stat.S_ISREG(st.st_mode):
            content = path.read_bytes()
        elif stat.S_ISDIR(st.st_mode):
            content = sorted(os.listdir(path))
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_size, st.st_blocks,
            st.st_ino, content)


def test_a_cowfs_upper_stacked_as_a_lower_reads_its_metacopy_data(layer_dirs) -> None:
    """The issue's repro: chmod makes a metacopy; stacked under a new mount it used to read
    as 11 NUL bytes."""
    lower, upper, merged, merged_again = layer_dirs("L", "U", "M", "M2")
    (lower / "f").write_text("lower data\n")
    with background_cowfs(str(lower), str(upper), str(merged)):
        os.chmod(merged / "f", 0o640)
    assert os.getxattr(upper / "f", METACOPY) == b""
    # The layer itself holds no data: at most an xattr block, as the kernel's own metacopy here.
    assert os.lstat(upper / "f").st_blocks <= 8
    with background_cowfs(f"{upper}:{lower}", str(merged_again)):
        assert (merged_again / "f").read_bytes() == b"lower data\n"
        st = os.lstat(merged_again / "f")
        assert (stat.S_IMODE(st.st_mode), st.st_size) == (0o640, 11)
        assert st.st_blocks == os.lstat(lower / "f").st_blocks   # the data's, as the kernel


def test_a_kernel_metacopy_upper_stacked_as_a_lower(layer_dirs) -> None:
    """What the kernel writes with metacopy=on (a chmod; a rename, which adds a redirect) reads
    the same through cowfs as through the kernel."""
    lower, kept, merged = layer_dirs("lower", "kept", "merged")
    (lower / "chmodded").write_text("chmodded data\n")
    (lower / "old-name").write_text("renamed data\n")
    with kernel_overlay([lower], merged, upper=kept):
        os.chmod(merged / "chmodded", 0o600)
        os.rename(merged / "old-name", merged / "new-name")
        os.chown(merged / "new-name", 12, 34)
    assert os.getxattr(kept / "chmodded", METACOPY) is not None
    assert os.getxattr(kept / "new-name", REDIRECT) == b"old-name"
    names = ["chmodded", "new-name", "old-name"]
    with kernel_overlay([kept, lower], merged):
        expected = {name: seen(merged / name) for name in names}
    with mounted_cowfs([kept, lower], merged):
        assert {name: seen(merged / name) for name in names} == expected
        assert (merged / "new-name").read_text() == "renamed data\n"
        assert sorted(os.listdir(merged)) == ["chmodded", "new-name"]


# Each case: a name, what to write in the three layers (top, middle, bottom), and what cowfs
# and the kernel (6.18) answer: data read through the metacopy, or the errno of its lookup.
Layers = tuple[Path, Path, Path]


def _case_data_below(top: Path, middle: Path, bottom: Path) -> None:
    write(bottom / "data-below", "lower data\n")
    make_metacopy(top / "data-below", 11)


def _case_data_missing(top: Path, middle: Path, bottom: Path) -> None:
    make_metacopy(top / "data-missing", 5)


def _case_in_the_lowest_layer(top: Path, middle: Path, bottom: Path) -> None:
    make_metacopy(bottom / "in-the-lowest-layer", 5)


def _case_directory_below(top: Path, middle: Path, bottom: Path) -> None:
    make_metacopy(top / "directory-below", 5)
    (bottom / "directory-below").mkdir()


def _case_symlink_below(top: Path, middle: Path, bottom: Path) -> None:
    make_metacopy(top / "symlink-below", 5)
    (bottom / "symlink-below").symlink_to("data-below")


def _case_fifo_below(top: Path, middle: Path, bottom: Path) -> None:
    make_metacopy(top / "fifo-below", 5)
    os.mkfifo(bottom / "fifo-below")


def _case_whiteout_below(top: Path, middle: Path, bottom: Path) -> None:
    make_metacopy(top / "whiteout-below", 7)
    os.mknod(middle / "whiteout-below", stat.S_IFCHR | 0o600, 0)
    write(bottom / "whiteout-below", "hidden\n")


def _case_absolute_redirect(top: Path, middle: Path, bottom: Path) -> None:
    write(bottom / "from" / "there", "absolute data\n")
    make_metacopy(top / "absolute-redirect", 14, redirect="/from/there")


def _case_relative_redirect(top: Path, middle: Path, bottom: Path) -> None:
    write(bottom / "sub" / "before", "relative data\n")
    make_metacopy(top / "sub" / "after", 14, redirect="before")


def _case_redirect_to_nothing(top: Path, middle: Path, bottom: Path) -> None:
    make_metacopy(top / "redirect-to-nothing", 3, redirect="/no/such/file")


def _case_redirect_through_a_symlink(top: Path, middle: Path, bottom: Path) -> None:
    write(bottom / "real" / "file", "through a link\n")
    (bottom / "linked").symlink_to("real")
    make_metacopy(top / "redirect-through-a-symlink", 15, redirect="/linked/file")


def _case_chain(top: Path, middle: Path, bottom: Path) -> None:
    """A metacopy over a metacopy (with its own redirect) over the data."""
    write(bottom / "origin" / "chain-data", "chained data\n")
    make_metacopy(middle / "chain", 13, redirect="/origin/chain-data")
    make_metacopy(top / "chain", 13)


def _case_relative_after_absolute(top: Path, middle: Path, bottom: Path) -> None:
    """A relative redirect below an absolute one names a file beside the absolute path."""
    write(bottom / "place" / "second", "second hop\n")
    make_metacopy(middle / "place" / "first", 11, redirect="second")
    make_metacopy(top / "relative-after-absolute", 11, redirect="/place/first")


def _case_data_in_the_middle(top: Path, middle: Path, bottom: Path) -> None:
    write(middle / "data-in-the-middle", "middle data\n")
    write(bottom / "data-in-the-middle", "bottom data\n")
    make_metacopy(top / "data-in-the-middle", 12)


def _case_outside_file(top: Path, middle: Path, bottom: Path) -> None:
    write(bottom / "outside-file", "same name\n")
    make_metacopy(top / "outside-file", 10, redirect="/../../outside")


def _case_dot_dot_file(top: Path, middle: Path, bottom: Path) -> None:
    make_metacopy(top / "dot-dot-file", 3, redirect="..")


def _case_dot_step_file(top: Path, middle: Path, bottom: Path) -> None:
    write(bottom / "from" / "there", "absolute data\n")
    make_metacopy(top / "dot-step-file", 14, redirect="/from/./there")


def _case_outside_directory(top: Path, middle: Path, bottom: Path) -> None:
    (top / "outside-directory").mkdir()
    os.setxattr(top / "outside-directory", REDIRECT, b"/../../outside")
    write(bottom / "outside-directory" / "inside", "")


def _case_dot_dot_directory(top: Path, middle: Path, bottom: Path) -> None:
    (top / "dot-dot-directory").mkdir()
    os.setxattr(top / "dot-dot-directory", REDIRECT, b"..")
    (bottom / "dot-dot-directory").mkdir()


def _case_malformed_redirects(top: Path, middle: Path, bottom: Path) -> None:
    for name, value in [("empty-redirect", b""), ("double-slash", b"/a//b"),
                        ("trailing-slash", b"/from/"), ("slash-in-a-name", b"from/there")]:
        make_metacopy(top / name, 3)
        os.setxattr(top / name, REDIRECT, value)
        (top / f"{name}-directory").mkdir()
        os.setxattr(top / f"{name}-directory", REDIRECT, value)


def _case_bad_redirect_in_the_lowest_layer(top: Path, middle: Path, bottom: Path) -> None:
    """The kernel reads no redirect in the lowest layer: there is nothing below it."""
    write(bottom / "lowest-directory" / "kept", "")
    os.setxattr(bottom / "lowest-directory", REDIRECT, b"/../../outside")


def _case_bad_redirect_on_a_plain_file(top: Path, middle: Path, bottom: Path) -> None:
    """Only a metacopy's redirect is read; a plain file's is not."""
    write(top / "plain-file", "plain data\n")
    os.setxattr(top / "plain-file", REDIRECT, b"/../../outside")


def _case_metacopy_mark_on_other_types(top: Path, middle: Path, bottom: Path) -> None:
    """Only a regular file can be a metacopy: the mark on anything else means nothing."""
    (top / "marked-directory").mkdir()
    os.setxattr(top / "marked-directory", METACOPY, b"")
    write(bottom / "marked-directory" / "below", "")
    (top / "marked-symlink").symlink_to("target")
    os.setxattr(top / "marked-symlink", METACOPY, b"", follow_symlinks=False)
    write(bottom / "marked-symlink", "not data\n")


def _case_mark_values(top: Path, middle: Path, bottom: Path) -> None:
    """The mark is empty or the kernel's struct: 4 bytes 00 04 00 00 and longer are read as a
    metacopy; 1 to 3 bytes are corrupt."""
    for name, value in [("four-bytes", b"\0\x04\0\0"), ("five-bytes", b"\0\x05\0\0\0"),
                        ("one-byte", b"y"), ("three-bytes", b"\0\x04\0")]:
        write(bottom / name, f"{name} data\n")
        make_metacopy(top / name, len(f"{name} data\n"), value=value)


CASES: list[Callable[[Path, Path, Path], None]] = [
    _case_data_below, _case_data_missing, _case_in_the_lowest_layer, _case_directory_below,
    _case_symlink_below, _case_fifo_below, _case_whiteout_below, _case_absolute_redirect,
    _case_relative_redirect, _case_redirect_to_nothing, _case_redirect_through_a_symlink,
    _case_chain, _case_relative_after_absolute, _case_data_in_the_middle, _case_outside_file,
    _case_dot_dot_file, _case_dot_step_file, _case_outside_directory, _case_dot_dot_directory,
    _case_malformed_redirects, _case_bad_redirect_in_the_lowest_layer,
    _case_bad_redirect_on_a_plain_file, _case_metacopy_mark_on_other_types, _case_mark_values,
]

# What the kernel answered when these tests were written: the data, or the lookup's errno.
EXPECTED = {
    "data-below": b"lower data\n",
    "data-missing": "EIO",
    "in-the-lowest-layer": "EIO",
    "directory-below": "EIO",
    "symlink-below": "EIO",
    "fifo-below": "EIO",
    "whiteout-below": "EIO",
    "absolute-redirect": b"absolute data\n",
    "sub/after": b"relative data\n",
    "redirect-to-nothing": "EIO",
    "redirect-through-a-symlink": "EIO",
    "chain": b"chained data\n",
    "relative-after-absolute": b"second hop\n",
    "data-in-the-middle": b"middle data\n",
    "outside-file": "EACCES",
    "dot-dot-file": "EACCES",
    "dot-step-file": "EACCES",
    "outside-directory": "EACCES",
    "dot-dot-directory": "EACCES",
    **{name: "EINVAL" for base in ("empty-redirect", "double-slash", "trailing-slash",
                                   "slash-in-a-name")
       for name in (base, f"{base}-directory")},
    "lowest-directory": ["kept"],
    "plain-file": b"plain data\n",
    "marked-directory": ["below"],
    "marked-symlink": "target",
    "four-bytes": b"four-bytes data\n",
    "five-bytes": b"five-bytes data\n",
    "one-byte": "EIO",
    "three-bytes": "EIO",
}


def all_names(layers: Layers) -> list[str]:
    names: set[str] = set()
    for layer in layers:
        for directory, subdirectories, files in os.walk(layer):
            for name in subdirectories + files:
                names.add(str(Path(directory, name).relative_to(layer)))
    return sorted(names)


def test_rename_and_link_of_a_lower_file_copy_no_data(layer_dirs) -> None:
    """As the kernel: a renamed or linked lower file is a metacopy whose redirect names its
    data's path, so that every name finds the data after a remount, under either reader."""
    lower, upper, merged = layer_dirs("lower", "upper", "merged")
    (lower / "dir").mkdir()
    (lower / "moved").write_bytes(b"m" * 100_000)
    (lower / "dir" / "linked").write_bytes(b"l" * 100_000)
    with background_cowfs(str(lower), str(upper), str(merged)):
        os.rename(merged / "moved", merged / "dir" / "moved")
        os.link(merged / "dir" / "linked", merged / "linked too")
    for name, data_path in (("dir/moved", b"/moved"), ("dir/linked", b"/dir/linked"),
                            ("linked too", b"/dir/linked")):
        assert os.getxattr(upper / name, METACOPY) == b""
        assert os.getxattr(upper / name, REDIRECT) == data_path
        assert os.lstat(upper / name).st_blocks <= 8, "no data copied"
    expected = {"dir/moved": b"m" * 100_000, "dir/linked": b"l" * 100_000,
                "linked too": b"l" * 100_000}
    for reader in (lambda: kernel_overlay([lower], merged, upper=upper),
                   lambda: kernel_overlay([upper, lower], merged),
                   lambda: mounted_cowfs([upper, lower], merged)):
        with reader():
            assert {name: (merged / name).read_bytes() for name in expected} == expected
            assert not (merged / "moved").exists()


def test_lower_metacopies_and_redirects_as_the_kernel_answers(layer_dirs) -> None:
    top, middle, bottom, merged = layer_dirs("top", "middle", "bottom", "merged")
    layers = (top, middle, bottom)
    for make in CASES:
        make(*layers)
    names = all_names(layers)
    with kernel_overlay(list(layers), merged):
        kernel = {name: seen(merged / name) for name in names}
        kernel_listing = sorted(os.listdir(merged))
    with mounted_cowfs(list(layers), merged):
        cowfs = {name: seen(merged / name) for name in names}
        cowfs_listing = sorted(os.listdir(merged))
    differing = {name: (kernel[name], cowfs[name]) for name in names
                 if kernel[name] != cowfs[name]}
    assert not differing, "kernel, cowfs:\n" + "\n".join(f"{name}: {pair}"
                                                      for name, pair in differing.items())
    shown = {name: answer if isinstance(answer, str) else answer[-1]
             for name, answer in cowfs.items() if name in EXPECTED}
    assert shown == EXPECTED
    # The kernel lists a name whose lookup fails; cowfs cannot (readdirplus needs a node).
    assert cowfs_listing == [name for name in kernel_listing
                             if not isinstance(kernel[name], str)]


def test_rmdir_counts_a_name_whose_lookup_fails(layer_dirs) -> None:
    """As the kernel: the data is missing (EIO), but the name is there (ENOTEMPTY)."""
    lower, broken, upper, merged = layer_dirs("lower", "broken", "upper", "merged")
    (lower / "directory").mkdir()
    make_metacopy(broken / "directory" / "lost", 4)
    with mounted_cowfs([broken, lower], merged, upper=upper):
        assert os.listdir(merged / "directory") == []
        for remove, expected in [(os.unlink, errno.EIO), (os.rmdir, errno.ENOTEMPTY)]:
            path = merged / "directory" / "lost" if remove is os.unlink else merged / "directory"
            with pytest.raises(OSError) as caught:
                remove(path)
            assert caught.value.errno == expected


def make_metacopy_layer(lower: Path, kept: Path) -> None:
    """A layer of metacopies over *lower*, some renamed (with redirects)."""
    for name in ("appended", "chmodded", "truncated", "emptied", "untouched"):
        write(lower / name, f"{name} data\n")
        make_metacopy(kept / name, len(f"{name} data\n"))
        os.chmod(kept / name, 0o640)
    write(lower / "elsewhere" / "original", "original data\n")
    for name in ("renamed-chmodded", "renamed-appended"):
        make_metacopy(kept / name, 14, redirect="/elsewhere/original")


def change_through(merged: Path) -> None:
    with open(merged / "appended", "a") as file:
        file.write("and more\n")
    os.chmod(merged / "chmodded", 0o604)
    os.truncate(merged / "truncated", 4)
    with open(merged / "emptied", "w") as file:
        file.write("new\n")
    os.chmod(merged / "renamed-chmodded", 0o600)
    with open(merged / "renamed-appended", "a") as file:
        file.write("+\n")


AFTER_CHANGES = {
    "appended": b"appended data\nand more\n",
    "chmodded": b"chmodded data\n",
    "truncated": b"trun",
    "emptied": b"new\n",
    "untouched": b"untouched data\n",
    "renamed-chmodded": b"original data\n",
    "renamed-appended": b"original data\n+\n",
}


def contents(merged: Path) -> dict[str, tuple[int, bytes]]:
    return {name: (stat.S_IMODE(os.lstat(merged / name).st_mode), (merged / name).read_bytes())
            for name in AFTER_CHANGES}


@pytest.mark.parametrize("writer", ["cowfs", "kernel"])
def test_copy_up_of_a_lower_metacopy_copies_the_real_data(layer_dirs, writer: str) -> None:
    """Writes and chmods through a cowfs mount whose lower is a metacopy layer: the data is the
    real one, in the mount, after a remount and under the kernel reading cowfs's upper. The
    metacopy layer was written by cowfs or by the kernel (metacopy=on)."""
    lower, kept, upper, merged = layer_dirs("lower", "kept", "upper", "merged")
    if writer == "cowfs":
        make_metacopy_layer(lower, kept)
    else:
        scratch = layer_dirs("scratch")[0]
        make_metacopy_layer(lower, scratch)    # to know the names and data; the kernel writes
        for name in os.listdir(scratch):
            if not (lower / name).exists():
                (lower / name).write_text("original data\n")
        with kernel_overlay([lower], merged, upper=kept):
            for name in AFTER_CHANGES:
                os.chmod(merged / name, 0o640)
            for name in ("renamed-chmodded", "renamed-appended"):
                os.rename(merged / name, merged / f"{name}.tmp")
                os.rename(merged / f"{name}.tmp", merged / name)
    workdir = ("--workdir", str(upper.parent / "work"))
    with mounted_cowfs([kept, lower], merged, upper=upper, extra=workdir):
        change_through(merged)
        changed = contents(merged)
    assert {name: data for name, (_, data) in changed.items()} == AFTER_CHANGES
    assert changed["chmodded"][0] == 0o604 and changed["renamed-chmodded"][0] == 0o600
    assert METACOPY in os.listxattr(upper / "chmodded")      # still metadata only
    for name in ("appended", "truncated", "emptied", "renamed-appended"):
        assert METACOPY not in os.listxattr(upper / name)
        assert (upper / name).read_bytes() == AFTER_CHANGES[name]   # on disk, no zeros
    with mounted_cowfs([kept, lower], merged, upper=upper, extra=workdir):
        assert contents(merged) == changed
    with kernel_overlay([kept, lower], merged, upper=upper):
        assert contents(merged) == changed


def test_a_reader_of_a_lower_metacopy_follows_its_copy_up(layer_dirs) -> None:
    """A file open for reading on a lower metacopy's data sees the write that copies it up."""
    lower, kept, upper, merged = layer_dirs("lower", "kept", "upper", "merged")
    write(lower / "file", "before\n")
    make_metacopy(kept / "file", 7)
    with mounted_cowfs([kept, lower], merged, upper=upper,
                       extra=("--workdir", str(upper.parent / "work"))), \
            open(merged / "file", "rb", buffering=0) as reader:
        assert reader.read() == b"before\n"
        subprocess.run([sys.executable, "-c",
                        "import sys; open(sys.argv[1], 'r+').write('after!')",
                        str(merged / "file")], check=True)
        reader.seek(0)
        assert reader.read() == b"after!\n"
