"""Every Python example in docs/library.md runs, as written, against real layers."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import busybox_root

from cowfs.layers import read_mountinfo

pytestmark = pytest.mark.mounts

DOCUMENT = Path(__file__).parent.parent / "docs" / "library.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", DOCUMENT.read_text(), flags=re.DOTALL)


def make_layers(directory: Path) -> None:
    """The directory the document describes: layers/app over layers/base (busybox)."""
    base, app = directory / "layers" / "base", directory / "layers" / "app"
    busybox_root(base, ("sh", "cat", "hostname", "test", "echo", "chown"))
    for path in (base / "etc", app / "etc", directory / "upper", directory / "merged"):
        path.mkdir(parents=True)
    (base / "etc" / "os-release").write_text('PRETTY_NAME="busybox base"\n')
    (base / "etc" / "motd").write_text("welcome\n")
    (app / "etc" / "app.conf").write_text("default\n")


def test_the_document_has_examples() -> None:
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("example", EXAMPLES, ids=[f"example-{number}" for number in
                                                    range(1, len(EXAMPLES) + 1)])
def test_example_runs(example: str, tmp_path: Path) -> None:
    make_layers(tmp_path)
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not any(mount.mountpoint.startswith(str(tmp_path)) for mount in read_mountinfo())
