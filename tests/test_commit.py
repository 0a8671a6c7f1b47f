"""`cowfs run --commit`'s layer from an upper (cowfs.commit), without FUSE."""

import os
from pathlib import Path

import pytest

from cowfs.commit import CommitError, commit_upper


def test_commit_refuses_a_marker_name_and_leaves_nothing(tmp_path: Path) -> None:
    """Stacked as a lower, a committed `.wh.passwd` would hide `passwd`: a kernel mount lets a
    user make one in an upper, so commit refuses it."""
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / ".wh.passwd").write_text("a user's file\n")
    with pytest.raises(CommitError, match=r"cannot commit etc/\.wh\.passwd:"):
        commit_upper(str(upper), str(tmp_path / "merged"), str(tmp_path / "layer"))
    assert os.listdir(tmp_path) == ["upper"]


def test_commit_copies_an_upper_without_marker_names(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "wh.passwd").write_text("an ordinary name\n")
    commit_upper(str(upper), str(tmp_path / "merged"), str(tmp_path / "layer"))
    assert (tmp_path / "layer" / "etc" / "wh.passwd").read_text() == "an ordinary name\n"
