"""Parsing the layer list and refusing layouts that cannot be mounted."""

import logging
import os
from pathlib import Path

import pytest
from conftest import paths_under

from cowfs.layers import LayoutError, check_mountpoint, open_stack, parse_lowerdirs, split_escaped


def test_lowerdirs_split_at_colons_leftmost_first() -> None:
    assert parse_lowerdirs("/a:/b:/c") == ["/a", "/b", "/c"]


def test_escaped_colon_and_backslash_stay_in_the_path() -> None:
    assert parse_lowerdirs(r"/with\:colon:/back\\slash") == ["/with:colon", "/back\\slash"]
    assert split_escaped("a\\", ":") == ["a\\"]


@pytest.mark.parametrize("spec", ["", "/a::/b", ":/a", "/a:"])
def test_empty_layer_paths_are_refused(spec: str) -> None:
    with pytest.raises(LayoutError, match="empty layer path"):
        parse_lowerdirs(spec)


def test_stack_is_upper_then_lowers(layer_dirs) -> None:
    upper, top, bottom = layer_dirs("upper", "top", "bottom")
    stack = open_stack([str(top), str(bottom)], str(upper))
    try:
        assert [layer.path for layer in stack.layers] == [str(upper), str(top), str(bottom)]
        assert stack.upper is stack.layers[0] and stack.upper.writable
        assert [layer.path for layer in stack.lowers] == [str(top), str(bottom)]
    finally:
        stack.close()


def test_symlinked_layer_is_followed_once(tmp_path: Path, layer_dirs) -> None:
    (real,) = layer_dirs("real")
    (tmp_path / "link").symlink_to(real)
    stack = open_stack([str(tmp_path / "link")])
    try:
        assert stack.top.path == str(real)
    finally:
        stack.close()


def layout_error(lowers: list[Path], upper: Path | None = None) -> str:
    with pytest.raises(LayoutError) as caught:
        open_stack([str(path) for path in lowers], str(upper) if upper else None).close()
    return str(caught.value)


def test_bad_layouts_are_refused_with_the_reason(tmp_path: Path, layer_dirs) -> None:
    a, b = layer_dirs("a", "b")
    (tmp_path / "file").write_text("")
    (a / "inner").mkdir()
    assert "does not exist" in layout_error([tmp_path / "missing"])
    assert "is not a directory" in layout_error([tmp_path / "file"])
    assert "given twice" in layout_error([a, b, a])
    assert "is inside lower layer" in layout_error([b, a], upper=a / "inner")
    assert "is inside upper layer" in layout_error([a / "inner"], upper=a)
    assert "is inside lower layer" in layout_error([a / "inner", a])


def test_no_fd_is_left_open_by_a_refused_stack(tmp_path: Path, layer_dirs) -> None:
    (a,) = layer_dirs("a")
    before = len(os.listdir("/proc/self/fd"))
    layout_error([a, tmp_path / "missing"])
    assert len(os.listdir("/proc/self/fd")) == before


def test_mountpoint_checks(tmp_path: Path, layer_dirs) -> None:
    lower, merged = layer_dirs("lower", "merged")
    (lower / "sub").mkdir()
    stack = open_stack([str(lower)])
    try:
        assert check_mountpoint(stack, str(merged)) == str(merged)
        with pytest.raises(LayoutError, match="does not exist"):
            check_mountpoint(stack, str(tmp_path / "nowhere"))
        with pytest.raises(LayoutError, match="is inside lower layer"):
            check_mountpoint(stack, str(lower / "sub"))
        with pytest.raises(LayoutError, match="is lower layer"):
            check_mountpoint(stack, str(lower))
        with pytest.raises(LayoutError, match=r"lower layer .* is inside mount point"):
            check_mountpoint(stack, str(tmp_path))
        (merged / "file").write_text("")
        with pytest.raises(LayoutError, match="not empty"):
            check_mountpoint(stack, str(merged))
        assert check_mountpoint(stack, str(merged), nonempty=True) == str(merged)
    finally:
        stack.close()


# (lowers, upper, workdir, mount point, the error); paths under the test's directory.
REFUSED_LAYOUTS = {
    "upper inside a lower": (["lower"], "lower/up", None, "merged",
                             "upper layer {tmp}/lower/up is inside lower layer {tmp}/lower"),
    "workdir is the mount point": (["lower"], "upper", "merged", "merged",
                                   "mount point {tmp}/merged is workdir {tmp}/merged"),
    "workdir inside the mount point": (["lower"], "upper", "merged/w", "merged",
                                       "workdir {tmp}/merged/w is inside mount point"),
    "mount point inside the workdir": (["lower"], "upper", "work", "work/merged",
                                       "mount point {tmp}/work/merged is inside workdir"),
    "workdir inside the upper": (["lower"], "upper", "upper/w", "merged",
                                 "workdir {tmp}/upper/w is inside upper layer {tmp}/upper"),
    "workdir inside a lower": (["lower"], "upper", "lower/w", "merged",
                               "workdir {tmp}/lower/w is inside lower layer {tmp}/lower"),
    "workdir is a lower": (["lower"], "upper", "lower", "merged",
                           "workdir {tmp}/lower is given twice (also as lower layer"),
    "upper inside the workdir": (["lower"], "work/upper", "work", "merged",
                                 "upper layer {tmp}/work/upper is inside workdir {tmp}/work"),
    "workdir without a parent": (["lower"], "upper", "none/w", "merged",
                                 "workdir {tmp}/none/w cannot be created: its parent does not"),
    "workdir is a file": (["lower"], "upper", "file", "merged",
                          "workdir {tmp}/file is not a directory"),
    "workdir is a dangling symlink": (["lower"], "upper", "dangling", "merged",
                                      "workdir {tmp}/dangling is not a directory"),
    "volatile session in the workdir": (["lower"], "upper", "volatile-work", "merged",
                                        "holds an unclean volatile overlay session"),
    "missing mount point": (["lower"], "upper", None, "missing",
                            "mount point {tmp}/missing does not exist"),
    "mount point is a file": (["lower"], "upper", None, "file",
                              "mount point {tmp}/file is not a directory"),
    "non-empty mount point": (["lower"], "upper", None, "full",
                              "mount point {tmp}/full is not empty"),
    "mount point inside the upper": (["lower"], "upper", None, "upper/sub",
                                     "mount point {tmp}/upper/sub is inside upper layer"),
    "upper inside the mount point": (["lower"], "holder/upper", None, "holder",
                                     "upper layer {tmp}/holder/upper is inside mount point"),
}


def refused_layout_directory(tmp_path: Path) -> None:
    """Everything each REFUSED_LAYOUTS case names, so that one directory serves them all."""
    for name in ("lower/sub", "lower/up", "upper/sub", "merged", "holder/upper", "work/merged",
                 "work/upper", "volatile-work/work/incompat/volatile", "full/something"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "file").write_text("")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")


@pytest.mark.parametrize("case", sorted(REFUSED_LAYOUTS))
def test_a_refused_layout_makes_nothing(case: str, tmp_path: Path) -> None:
    """Every check comes before the workdir is made, also those of the mount point."""
    refused_layout_directory(tmp_path)
    lowers, upper, workdir, mountpoint, expected = REFUSED_LAYOUTS[case]
    before = paths_under(tmp_path)
    fds_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(LayoutError) as caught:
        open_stack([str(tmp_path / path) for path in lowers], str(tmp_path / upper),
                   str(tmp_path / workdir) if workdir else None,
                   mountpoint=str(tmp_path / mountpoint)).close()
    assert expected.format(tmp=tmp_path) in str(caught.value)
    assert "\n" not in str(caught.value)
    assert paths_under(tmp_path) == before
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_a_stack_sharing_a_locked_upper_or_workdir_makes_no_workdir(tmp_path: Path,
                                                                  layer_dirs) -> None:
    lower, upper, other_upper, work, merged = layer_dirs("lower", "upper", "other-upper",
                                                         "work", "merged")
    stack = open_stack([str(lower)], str(upper), str(work), mountpoint=str(merged))
    try:
        before = paths_under(tmp_path)
        with pytest.raises(LayoutError, match=f"upper layer {upper} is in use"):
            open_stack([str(lower)], str(upper), str(tmp_path / "new-work"),
                       mountpoint=str(merged))
        with pytest.raises(LayoutError, match=f"workdir {work} is in use"):
            open_stack([str(lower)], str(other_upper), str(work), mountpoint=str(merged))
        assert paths_under(tmp_path) == before
    finally:
        stack.close()


def test_staging_is_swept_and_said_so_only_when_something_was_left(
        layer_dirs, caplog: pytest.LogCaptureFixture) -> None:
    lower, upper, work = layer_dirs("lower", "upper", "work")
    staging = work / "cowfs" / "staging"
    caplog.set_level(logging.INFO, logger="cowfs.layers")
    for _ in range(2):                  # a first mount, and a clean one after it
        open_stack([str(lower)], str(upper), str(work)).close()
    assert "sweeping" not in caplog.text
    (staging / "#half-made").write_text("from a crash")
    open_stack([str(lower)], str(upper), str(work)).close()
    assert f"sweeping what an earlier mount left in {staging}" in caplog.text
    assert os.listdir(staging) == []
