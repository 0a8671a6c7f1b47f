"""Parsing the layer list and refusing layouts that cannot be mounted."""

import logging
import os
from pathlib import Path

import pytest

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
