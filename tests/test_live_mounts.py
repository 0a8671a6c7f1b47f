"""Live mounts under control: `cowfs list`, `stats`, `refresh`, `layer add/remove`, and the same
from Python; each change judged against the kernel's overlay freshly mounted on the layers as
they are after it."""

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import cowfs_command, kernel_overlay, mounted_cowfs, mounted_overlay, wait_until

import cowfs

pytestmark = pytest.mark.mounts


def cowfs_cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cowfs_command(*arguments), capture_output=True, text=True,
                          timeout=120, check=False)


def view(root: Path) -> dict[str, tuple[int, object]]:
    """What a reader sees: each path's type and its content, target or nothing."""
    seen: dict[str, tuple[int, object]] = {}
    for directory, subdirectories, files in os.walk(root):
        for name in subdirectories + files:
            path = Path(directory, name)
            st = os.lstat(path)
            detail: object = None
            if stat.S_ISREG(st.st_mode):
                detail = path.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                detail = os.readlink(path)
            seen[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), detail)
    return seen


def kernel_view(lowers: list[Path], merged: Path) -> dict[str, tuple[int, object]]:
    with mounted_overlay(lowers, merged):
        return view(merged)


def whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, Path]:
    """Two lower layers with files, a merged directory, a symlink and a hard link."""
    top, base = tmp_path / "top", tmp_path / "base"
    for layer in (top, base):
        (layer / "etc").mkdir(parents=True)
    (base / "etc" / "os-release").write_text("ID=base\n")
    (base / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (top / "etc" / "motd").write_text("hello\n")
    (base / "usr" / "lib").mkdir(parents=True)
    (base / "usr" / "lib" / "libc.so").write_bytes(b"\x7fELF" + b"\0" * 100)
    (base / "usr" / "lib" / "libc.so.6").symlink_to("libc.so")
    os.link(base / "etc" / "hosts", base / "usr" / "hosts")
    return top, base


@pytest.fixture
def live(image: tuple[Path, Path], tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """A read-only cowfs mount of *image*, walked once so the kernel caches all of it."""
    top, base = image
    merged = tmp_path / "merged"
    merged.mkdir()
    with mounted_cowfs([top, base], merged):
        view(merged)
        with pytest.raises(FileNotFoundError):
            (merged / "etc" / "added").stat()          # a miss the kernel caches
        yield top, base, merged


def test_list_and_stats_describe_every_live_mount(image: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    top, base = image
    upper, read_write, read_only = tmp_path / "upper", tmp_path / "rw", tmp_path / "ro"
    for path in (upper, read_write, read_only):
        path.mkdir()
    with mounted_cowfs([top, base], read_write, upper), mounted_cowfs([base], read_only):
        with open(read_write / "etc" / "os-release", "a") as appended:     # a data copy-up
            appended.write("VERSION=1\n")
        listing = cowfs_cli("list", "--json")
        assert listing.returncode == 0, listing.stderr
        described = {entry["merged"]: entry for entry in json.loads(listing.stdout)}
        rw = described[str(read_write)]
        assert rw["upper"] == str(upper)
        assert rw["lowers"] == [str(top), str(base)]
        assert rw["workdir"] == str(tmp_path / ".upper.cowfs-work")
        assert "rw" in rw["options"] and "fsync=batch" in rw["options"]
        assert (rw["statistics"]["copy_ups"], rw["statistics"]["directories"],
                rw["statistics"]["data_copies"]) == (2, 1, 1)      # etc, then os-release
        assert str(read_write).encode() in Path(f"/proc/{rw['pid']}/cmdline").read_bytes()
        ro = described[str(read_only)]
        assert ro["upper"] is None and ro["lowers"] == [str(base)] and "ro" in ro["options"]
        assert ro["statistics"]["fsync"] is None
        words = cowfs_cli("stats", str(read_write))
        assert words.returncode == 0, words.stderr
        assert f"{read_write} (daemon pid {rw['pid']})" in words.stdout
        assert f"upper:    {upper}" in words.stdout and "copy-ups: 2 (1 directories" in words.stdout
        from_python = {mount.path: mount for mount in cowfs.mounts()}
        assert from_python[str(read_write)].stats()["pid"] == rw["pid"]
    missing = cowfs_cli("stats", str(read_write))
    assert missing.returncode == 32
    assert missing.stderr == f"cowfs: {read_write} is not a cowfs mount\n"


def test_refresh_shows_changed_lower_files_directories_and_whiteouts(
        live: tuple[Path, Path, Path], tmp_path: Path) -> None:
    top, base, merged = live
    (base / "etc" / "os-release").write_text("ID=synced\n")          # in place
    replacement = base / "etc" / ".hosts.new"
    replacement.write_text("10.0.0.1 registry\n")
    replacement.rename(base / "etc" / "hosts")                        # a new file by rename
    (top / "etc" / "added").write_text("was missing\n")               # a cached miss
    (base / "usr" / "share").mkdir()                                   # a new directory
    (base / "usr" / "share" / "doc").write_text("doc\n")
    (top / "etc" / "motd").unlink()                                   # a file gone
    (top / "usr").mkdir()                                              # a directory merges
    whiteout(top / "usr" / "hosts")                                    # hides the hard link
    (base / "usr" / "lib" / "libc.so.6").unlink()
    (base / "usr" / "lib" / "libc.so.6").symlink_to("libc.so.7")       # a changed symlink
    refreshed = cowfs_cli("refresh", str(merged))
    assert refreshed.returncode == 0, refreshed.stderr
    assert refreshed.stdout.startswith(f"refreshed {merged}: ")
    oracle = tmp_path / "oracle"
    oracle.mkdir()
    assert view(merged) == kernel_view([top, base], oracle)
    assert (merged / "etc" / "os-release").read_text() == "ID=synced\n"


def test_refresh_of_paths_drops_what_is_cached_of_those(live: tuple[Path, Path, Path],
                                                         tmp_path: Path) -> None:
    top, base, merged = live
    (base / "usr" / "lib" / "libc.so").write_bytes(b"new")
    (top / "etc" / "added").write_text("now here\n")
    refreshed = cowfs_cli("refresh", str(merged), str(merged / "usr" / "lib" / "libc.so"),
                          "etc/added")
    assert refreshed.returncode == 0, refreshed.stderr
    assert (merged / "usr" / "lib" / "libc.so").read_bytes() == b"new"
    assert (merged / "etc" / "added").read_text() == "now here\n"
    outside = cowfs_cli("refresh", str(merged), str(tmp_path))
    assert outside.returncode == 32
    assert outside.stderr == f"cowfs: {tmp_path} is not inside the mount {merged}\n"


def test_refresh_leaves_what_did_not_change_to_the_kernel(live: tuple[Path, Path, Path],
                                                           tmp_path: Path) -> None:
    """A name that still shows its file is not invalidated: the kernel would detach what is
    mounted on it (cowfs run's /proc and /dev, a container's bind mounts)."""
    top, base, merged = live
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "mark").write_text("bound\n")
    subprocess.run(["mount", "--bind", str(outside), str(merged / "usr" / "lib")], check=True)
    try:
        (base / "etc" / "os-release").write_text("ID=synced\n")
        (top / "etc" / "motd").write_text("hello, synced\n")              # the top layer's
        for refresh in (("refresh", str(merged)), ("refresh", str(merged), "usr")):
            refreshed = cowfs_cli(*refresh)
            assert refreshed.returncode == 0, refreshed.stderr
            assert (merged / "usr" / "lib" / "mark").read_text() == "bound\n"
        assert (merged / "etc" / "os-release").read_text() == "ID=synced\n"
        assert (merged / "etc" / "motd").read_text() == "hello, synced\n"
    finally:
        subprocess.run(["umount", "-l", str(merged / "usr" / "lib")], check=False)


def test_layer_add_and_remove_with_files_open(image: tuple[Path, Path],
                                              tmp_path: Path) -> None:
    top, base = image
    added = tmp_path / "added"
    (added / "etc").mkdir(parents=True)
    (added / "etc" / "os-release").write_text("ID=added\n")
    (added / "opt").mkdir()
    (added / "opt" / "tool").write_text("tool\n")
    upper, merged, oracle = tmp_path / "upper", tmp_path / "merged", tmp_path / "oracle"
    for path in (upper, merged, oracle):
        path.mkdir()
    with mounted_cowfs([top, base], merged, upper) as mount:
        with open(merged / "etc" / "os-release") as held:
            added_cli = cowfs_cli("layer", "add", str(merged), str(added))
            assert added_cli.returncode == 0, added_cli.stderr
            # The opener keeps its file; a new open sees the layer on top.
            assert held.read() == "ID=base\n"
            assert (merged / "etc" / "os-release").read_text() == "ID=added\n"
            assert view(merged) == kernel_view([added, top, base], oracle)
            refused = cowfs_cli("layer", "remove", str(merged), str(base))
            assert refused.returncode == 32
            assert refused.stderr == (f"cowfs: lower layer {base} is still needed: etc/os-release "
                                      f"is open from lower layer {base}\n")
        removed = cowfs_cli("layer", "remove", str(merged), str(base))
        assert removed.returncode == 0, removed.stderr
        assert view(merged) == kernel_view([added, top], oracle)
        (merged / "etc" / "motd").write_text("written\n")        # copy-up on the new stack
        handle = cowfs.Mounted(str(merged))
        handle.add_layer(str(base), bottom=True)
        assert handle.stats()["lowers"] == [str(added), str(top), str(base)]
        handle.remove_layer(str(added))
        handle.add_layer(str(added), above=str(base))
        assert handle.stats()["lowers"] == [str(top), str(added), str(base)]
        mine = view(merged)
        mount.unmount()
    with kernel_overlay([top, added, base], oracle, upper):
        assert view(oracle) == mine


def test_layer_remove_refused_while_a_metacopy_or_redirect_needs_it(
        image: tuple[Path, Path], tmp_path: Path) -> None:
    top, base = image
    upper, merged = tmp_path / "upper", tmp_path / "merged"
    for path in (upper, merged):
        path.mkdir()
    with mounted_cowfs([top, base], merged, upper):
        os.chmod(merged / "usr" / "lib" / "libc.so", 0o600)    # metacopy: data stays in base
        refused = cowfs_cli("layer", "remove", str(merged), str(base))
        assert refused.returncode == 32
        assert refused.stderr == (f"cowfs: lower layer {base} is still needed: metacopy "
                                  f"usr/lib/libc.so of the upper takes its data from lower "
                                  f"layer {base}\n")
        (merged / "usr" / "lib" / "libc.so").write_bytes(b"full copy")
        os.rename(merged / "usr", merged / "system")              # a redirect into base
        refused = cowfs_cli("layer", "remove", str(merged), str(base))
        assert refused.returncode == 32
        assert "redirect system of the upper leads into lower layer" in refused.stderr
        with pytest.raises(cowfs.ControlError, match="is not a lower layer"):
            cowfs.Mounted(str(merged)).remove_layer(str(upper))
        inside = cowfs_cli("layer", "add", str(merged), str(merged / "etc"))
        assert inside.returncode == 32
        assert inside.stderr.startswith("cowfs: lower layer ") and \
            "inside mount point" in inside.stderr
        assert cowfs.Mounted(str(merged)).stats()["lowers"] == [str(top), str(base)]


def test_watch_refreshes_by_itself(live_image_watched: tuple[Path, Path, Path]) -> None:
    top, base, merged = live_image_watched
    (top / "etc" / "added").write_text("synced in\n")
    (base / "etc" / "os-release").write_text("ID=edited\n")
    (base / "usr" / "lib" / "libc.so").unlink()
    wait_until(lambda: (merged / "etc" / "added").exists(), what="a new lower file shown")
    wait_until(lambda: (merged / "etc" / "os-release").read_text() == "ID=edited\n",
               what="an edited lower file shown")
    wait_until(lambda: not (merged / "usr" / "lib" / "libc.so").exists(),
               what="a removed lower file gone")
    assert "watch" in cowfs.Mounted(str(merged)).stats()["options"]


@pytest.fixture
def live_image_watched(image: tuple[Path, Path], tmp_path: Path
                       ) -> Iterator[tuple[Path, Path, Path]]:
    top, base = image
    merged = tmp_path / "merged"
    merged.mkdir()
    with mounted_cowfs([top, base], merged, extra=("-o", "watch")):
        view(merged)
        with pytest.raises(FileNotFoundError):
            (merged / "etc" / "added").stat()
        yield top, base, merged


def test_memory_follows_the_kernel(tmp_path: Path) -> None:
    """Once the kernel forgets the nodes of a walk, the daemon lets go of their entries and
    builds its tables again at the size they now need (RSS figures: benchmarks, ARCHITECTURE)."""
    lower, merged = tmp_path / "lower", tmp_path / "merged"
    for directory in range(30):
        (lower / f"d{directory}").mkdir(parents=True)
        for name in range(100):
            (lower / f"d{directory}" / f"f{name}").touch()
    merged.mkdir()
    with mounted_cowfs([lower], merged):
        walked = sum(len(files) + len(directories)
                     for _, directories, files in os.walk(merged))
        assert walked == 3030
        handle = cowfs.Mounted(str(merged))
        held = handle.stats()["statistics"]
        assert isinstance(held, dict)
        assert (held["nodes"], held["entries"], held["shrinks"]) == (3031, 3030, 0)

        def forgotten() -> bool:
            Path("/proc/sys/vm/drop_caches").write_text("2")     # dentries and inodes
            statistics = handle.stats()["statistics"]
            assert isinstance(statistics, dict)
            return statistics["nodes"] == 1 and statistics["entries"] == 0
        wait_until(forgotten, what="the kernel to forget the walk")
        after = handle.stats()["statistics"]
        assert isinstance(after, dict)
        assert after["shrinks"] >= 1 and after["directories_open"] == 0
