"""The kernel-cache extensions, measured by what the daemon is asked: if they silently stop
working, warm listings reach the daemon again and these tests fail."""

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import cowfs_command, mounted_cowfs

import cowfs
from cowfs import fuse_extensions, options

pytestmark = pytest.mark.mounts

# The VM may drop page cache (a cached listing with it) behind our backs: a warm listing gets
# this many tries to show it was served by the kernel, and fails only if every one was not.
WARM_ATTEMPTS = 5
# The requests pyfuse3 does not route, and no FLUSH, through the same library
# (tests/test_extra_operations.py tests each); plain listings are asked for with
# -o readdirplus=auto (tests/test_plain_listings.py); O_TMPFILE and killpriv_v2 need
# libfuse 3.17 (tests/test_tmpfile.py, tests/test_killpriv.py).
ROUTED = {**dict.fromkeys(("fallocate", "lseek", "copy_file_range", "fileattr_ioctls",
                           "noflush"), True), "plain_listings": False, "tmpfile": False,
          "passthrough": False, "killpriv_v2": False}


def statistics(merged: Path) -> dict:
    return json.loads(os.getxattr(merged, "trusted.cowfs.stats"))


def requests_during(merged: Path, action) -> dict[str, int]:
    """The requests the daemon served while *action* ran (the statistics read not counted)."""
    before = statistics(merged)["requests"]
    action()
    after = statistics(merged)["requests"]
    counts = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    counts["getxattr"] -= 2       # the second statistics read itself (size, then value)
    return {name: count for name, count in counts.items() if count}


def warm_requests(merged: Path, action) -> dict[str, int]:
    """Requests of a repeated *action*: the fewest of several tries (see WARM_ATTEMPTS)."""
    action()
    tries = [requests_during(merged, action) for _ in range(WARM_ATTEMPTS)]
    return min(tries, key=lambda counts: sum(counts.values()))


@pytest.fixture
def tree(layer_dirs) -> tuple[Path, Path, Path]:
    lower, upper, merged = layer_dirs("lower", "upper", "merged")
    (lower / "many").mkdir()
    for number in range(500):
        (lower / "many" / f"file-{number:04}").write_bytes(b"")
    (lower / "link").symlink_to("many/file-0001")
    return lower, upper, merged


# The tests' mounts fork from a process that loaded the library once (tests/cowfs_zygote.py);
# a mount of its own must get them as well.
STARTS = {"forked": None, "fresh process": cowfs_command()}


@pytest.mark.parametrize("start", STARTS)
def test_a_warm_listing_and_symlink_are_served_by_the_kernel(tree, start: str) -> None:
    lower, upper, merged = tree
    with mounted_cowfs([lower], merged, upper, launcher=STARTS[start]):
        names = os.listdir(merged / "many")
        warm = warm_requests(merged, lambda: os.listdir(merged / "many"))
        assert "readdir" not in warm, warm
        assert warm.keys() <= {"opendir", "releasedir", "getattr"}, warm
        assert sorted(os.listdir(merged / "many")) == sorted(names) and len(names) == 500
        assert "readlink" not in warm_requests(merged, lambda: os.readlink(merged / "link"))
        shown = statistics(merged)
        assert shown["kernel_features"] == {"cache_listings": True, "cache_symlinks": True,
                                            "reason": None, **ROUTED}
        assert shown["cached_listing_replies"] >= 1


def test_switched_off_every_listing_reaches_the_daemon(tree) -> None:
    """The control: with the extensions off the same counts show the daemon asked again."""
    lower, upper, merged = tree
    with mounted_cowfs([lower], merged, upper, ("-o", "kernel_caches=off")) as mount:
        warm = warm_requests(merged, lambda: os.listdir(merged / "many"))
        assert warm["readdir"] >= 1, warm
        assert warm_requests(merged, lambda: os.readlink(merged / "link"))["readlink"] == 1
        features = statistics(merged)["kernel_features"]
        assert features == {"cache_listings": False, "cache_symlinks": False,
                            "reason": "turned off (-o kernel_caches=off)",
                            **dict.fromkeys(ROUTED, False)}
        assert "without the kernel-cache extensions" in mount.log()


def launcher(preparation: str) -> list[str]:
    """`python -m cowfs`, after *preparation* ran in the same interpreter."""
    return [sys.executable, "-c", f"{preparation}; import runpy, sys; sys.argv[0] = 'cowfs';"
            " runpy.run_module('cowfs', run_name='__main__', alter_sys=True)"]


# A pip install without a C compiler, and a program that had pyfuse3 imported already.
NOT_BUILT = launcher("import cowfs.fuse_extensions as e; e.library_path = lambda: None")
PYFUSE3_FIRST = launcher("import pyfuse3")


def test_a_stock_setup_mounts_correctly_and_says_so_once(tree) -> None:
    """Not built, or pyfuse3 imported first: the mount works as before, says so once, and
    reports the features off."""
    lower, upper, merged = tree
    for command, reason in ((NOT_BUILT, "they were not built"),
                            (PYFUSE3_FIRST, "pyfuse3 was imported before cowfs could load")):
        with mounted_cowfs([lower], merged, upper, launcher=command) as mount:
            (merged / "many" / "new").write_text("made\n")
            listed = os.listdir(merged / "many")
            assert "new" in listed and len(listed) == 501
            os.unlink(merged / "many" / "new")
            assert "new" not in os.listdir(merged / "many")
            features = statistics(merged)["kernel_features"]
            assert not features["cache_listings"] and reason in features["reason"]
            assert warm_requests(merged, lambda: os.listdir(merged / "many"))["readdir"] >= 1
            assert mount.log().count("without the kernel-cache extensions") == 1, mount.log()


def test_the_library_reports_the_features(tree) -> None:
    lower, upper, merged = tree
    with cowfs.mounted([str(lower)], str(merged), upper=str(upper)) as mount:
        features = mount.kernel_features()
    assert features == cowfs.KernelFeatures(cache_listings=True, cache_symlinks=True, **ROUTED)


def test_features_of_a_process_that_loaded_nothing() -> None:
    assert not fuse_extensions.features().cache_listings
    assert fuse_extensions.features().reason


def test_the_switch_is_a_mount_option() -> None:
    assert options.parse(["lowerdir=/l"]).mount.kernel_caches
    assert not options.parse(["lowerdir=/l,kernel_caches=off"]).mount.kernel_caches
    with pytest.raises(options.OptionError, match=r"expected kernel_caches=on\|off"):
        options.parse(["kernel_caches=no"])
    assert not options.parse(["lowerdir=/l"]).mount.plain_listings
    assert options.parse(["lowerdir=/l,readdirplus=auto"]).mount.plain_listings
    with pytest.raises(options.OptionError, match=r"expected readdirplus=yes\|auto"):
        options.parse(["readdirplus=no"])
    assert not options.parse(["lowerdir=/l"]).mount.writeback_cache
    assert options.parse(["lowerdir=/l,writeback=1"]).mount.writeback_cache
    with pytest.raises(options.OptionError, match=r"expected writeback=0\|1"):
        options.parse(["writeback=yes"])
    assert not options.parse(["lowerdir=/l"]).mount.passthrough
    assert options.parse(["lowerdir=/l,passthrough=on"]).mount.passthrough
    with pytest.raises(options.OptionError, match=r"'passthrough=on' and 'writeback=1' exclude"):
        options.parse(["lowerdir=/l,passthrough=on,writeback=1"])


def test_passthrough_asked_of_libfuse_314_mounts_without_it(tree) -> None:
    """libfuse 3.14 has no passthrough: the mount works, says so, and serves data itself
    (tests/test_passthrough.py tests it on 3.17)."""
    lower, upper, merged = tree
    (lower / "data").write_bytes(b"data")
    with mounted_cowfs([lower], merged, upper, extra=("-o", "passthrough=on")) as mount:
        assert (merged / "data").read_bytes() == b"data"
        stats = statistics(merged)
        assert not stats["kernel_features"]["passthrough"] and stats["requests"]["read"] == 1
        assert "no passthrough: the extensions were built against libfuse < 3.17" in mount.log()
