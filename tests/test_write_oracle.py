"""The write path's acceptance test: cowfs must write as the kernel's overlayfs writes.

Two copies of one random stack of 2-3 lower layers (files, directories, symlinks, fifos, hard
links, whiteouts, opaque directories; names with spaces, colons and commas) each get an empty
upper: one is mounted by the kernel's overlayfs, one by cowfs. The same random operations
(create, open for write with O_TRUNC, O_APPEND or at an offset, fsync, truncate, chmod, chown,
utime, mknod, mkdir, symlink, link, unlink, rmdir, rename plain, NOREPLACE or EXCHANGE, user.*
xattrs set and removed, lstat) go through both mounts by path. After every step the two
calls' results (value or errno) and the two whole merged trees must be equal. At the end each
upper is mounted by the other implementation, with its own lowers and a fresh workdir, and
must show the last tree: the upper's on-disk format is the kernel's.

The kernel is mounted with redirect_dir=on, index=on and metacopy=off to write, metacopy=on to
read cowfs's upper; write_model.mounted_kernel_overlay says why each.

The operations pick their paths from the merged tree as it is (lower files, copied-up files,
merged directories) and from the names of the stack's pools (which often fall on whiteouts and
hidden lower entries), so they collide with what is there.

CI runs WRITE_SEQUENCES sequences of STEPS steps. A longer soak is one command:

    COWFS_SOAK_EXAMPLES=5000 ./test.sh tests/test_write_oracle.py

COWFS_WRITE_ORACLE_SUBJECT=kernel runs the same tests with the kernel on both sides: the
harness's own check that it sees no difference where there is none (test_kernel_matches_itself
does a few such sequences on every run). COWFS_WRITE_ORACLE_LOWER_HARD_LINKS=0 draws stacks
without lower hard links, whose differences would otherwise hide the others while open.

A failing sequence is shrunk (for up to five minutes, hypothesis's limit) to the steps that
matter: each step shrinks towards lstat of the first path, which the report leaves out.
"""

import contextlib
import dataclasses
import functools
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import mounted_cowfs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layer_model import Dir, File, HardLink, Stack, Symlink, Whiteout
from write_model import (
    Operation,
    Tree,
    WriteStack,
    build_lowers,
    has_lower_hard_links,
    mounted_kernel_overlay,
    operations,
    show,
    snapshot,
    tree_differences,
    write_stacks,
)

pytestmark = pytest.mark.mounts

WRITE_SEQUENCES = int(os.environ.get("COWFS_SOAK_EXAMPLES", "300"))   # the issue: >= 150
STEPS = 30
SANITY_SEQUENCES = 10

SLOW_EXAMPLES = [HealthCheck.too_slow, HealthCheck.data_too_large,
                 HealthCheck.large_base_example]

# Sequences compared without a difference, per subject, for the line the test prints.
compared: dict[str, int] = {}

Mounted = contextlib.AbstractContextManager[Path]
MountFunction = Callable[[list[Path], Path, Path, Path], Mounted]


@contextlib.contextmanager
def mounted_cowfs_with_upper(lowers: list[Path], upper: Path, workdir: Path,
                             merged: Path) -> Iterator[Path]:
    """cowfs over *lowers* with *upper*; a daemon that did not end cleanly fails the test."""
    with mounted_cowfs(lowers, merged, upper, extra=("--workdir", str(workdir))) as mount:
        yield merged
        mount.unmount()


@dataclasses.dataclass(frozen=True)
class Implementation:
    name: str
    mount: MountFunction             # to write through
    mount_to_read: MountFunction     # to read an upper the other implementation wrote
    # cowfs never lists a name its lookup does not find; the kernel does (see snapshot).
    lists_only_real_names: bool


KERNEL = Implementation("overlayfs", mounted_kernel_overlay,
                        functools.partial(mounted_kernel_overlay, metacopy=True),
                        lists_only_real_names=False)
COWFS = Implementation("cowfs", mounted_cowfs_with_upper, mounted_cowfs_with_upper,
                       lists_only_real_names=True)


@dataclasses.dataclass
class Side:
    """One implementation's copy of the stack: its lowers, upper, workdir and mount point."""

    implementation: Implementation
    base: Path
    lowers: list[Path]
    upper: Path
    merged: Path

    @classmethod
    def prepare(cls, implementation: Implementation, base: Path, stack: WriteStack) -> "Side":
        base.mkdir()
        lowers = build_lowers(stack, base / "lowers")
        upper, merged = base / "up:per, 1", base / "merged"
        upper.mkdir()
        merged.mkdir()
        return cls(implementation, base, lowers, upper, merged)

    def fresh_workdir(self) -> Path:
        """An empty workdir beside the upper (so on its filesystem) for each mount."""
        return Path(tempfile.mkdtemp(prefix="work-", dir=self.base))

    def mount(self) -> Mounted:
        return self.implementation.mount(self.lowers, self.upper, self.fresh_workdir(),
                                         self.merged)

    def mount_to_read(self, reader: Implementation) -> Mounted:
        return reader.mount_to_read(self.lowers, self.upper, self.fresh_workdir(), self.merged)


def tree_failure(expected: Tree, actual: Tree, vanished: list[str],
                 implementation: Implementation, *, expected_name: str, actual_name: str,
                 history: list[str]) -> str | None:
    """What differs between two trees, as a failure message, or None."""
    found = [line for _, line in tree_differences(expected, actual, expected_name=expected_name,
                                                  actual_name=actual_name)]
    if implementation.lists_only_real_names:
        found += [f"{path!r}: {actual_name} lists it, but its lookup fails"
                  for path in vanished]
    if not found:
        return None
    return (f"{actual_name} differs from {expected_name}:\n" + "\n".join(found)
            + "\nafter:\n" + "\n".join(history or ["  (nothing yet)"]))


def unreadable(name: str, error: OSError, history: list[str]) -> str:
    return (f"{name}: the tree cannot be read: {error!r}\nafter:\n"
            + "\n".join(history or ["  (nothing yet)"]))


NextOperation = Callable[[int, Tree], Operation | None]


def compare_sequence(base: Path, stack: WriteStack, next_operation: NextOperation, *,
                     oracle: Implementation = KERNEL, subject: Implementation = COWFS,
                     tamper: Callable[[int, "Side"], None] | None = None) -> int:
    """Apply operations through both mounts until *next_operation* gives None, comparing
    each result and both trees after each step; then mount each upper with the other
    implementation. Returns the steps taken.

    After the subject's first difference the oracle alone goes on to the end: the operations
    drawn then depend on the oracle's trees only, never on how or when the subject failed, so
    hypothesis sees the same draws when it replays a sequence (else a subject that fails at
    another step on a replay stops its shrinking with FlakyStrategyDefinition).

    *tamper* exists to show the harness catches a difference: it is called with the step and
    the subject's side between the oracle's call and the subject's, and with step -1 once both
    are unmounted.
    """
    oracle_side = Side.prepare(oracle, base / "oracle", stack)
    subject_side = Side.prepare(subject, base / "subject", stack)
    history: list[str] = []
    failure: str | None = None
    steps = 0

    def compare_trees(subject_root: Path) -> str | None:
        try:
            subject_tree, vanished = snapshot(subject_root)
        except OSError as exc:
            return unreadable(subject.name, exc, history)
        return tree_failure(tree, subject_tree, vanished, subject, expected_name=oracle.name,
                            actual_name=subject.name, history=history)

    try:
        with contextlib.ExitStack() as mounts:
            oracle_root = mounts.enter_context(oracle_side.mount())
            tree, _ = snapshot(oracle_root)
            try:
                subject_root = mounts.enter_context(subject_side.mount())
                failure = compare_trees(subject_root)
            except (RuntimeError, TimeoutError) as exc:   # the oracle goes on alone
                failure = f"{subject.name} does not mount: {exc}"
            while (operation := next_operation(steps, tree)) is not None:
                expected = operation.apply(oracle_root)
                if operation.name != "stat":   # it changes nothing: a report needs it not
                    history.append(f"  {steps}: {operation!r} -> {show(expected[1])}")
                steps += 1
                if failure is None:
                    if tamper:
                        tamper(steps - 1, subject_side)
                    actual = operation.apply(subject_root)
                    if expected != actual:
                        before = history[:-1] if operation.name != "stat" else history
                        failure = (f"{operation!r}: {oracle.name} gives {show(expected)}, "
                                   f"{subject.name} gives {show(actual)}\nafter:\n"
                                   + "\n".join(before or ["  (nothing yet)"]))
                tree, _ = snapshot(oracle_root)
                if failure is None:
                    failure = compare_trees(subject_root)
    except AssertionError as exc:   # a daemon that did not end cleanly, found at unmount
        raise AssertionError(f"{failure}\n\nthen, at unmount: {exc}" if failure else exc) from None
    assert failure is None, failure
    if tamper:
        tamper(-1, subject_side)
    # Each upper under the other implementation, with its own lowers and a fresh workdir.
    if not has_lower_hard_links(stack):
        # The upper holds the whole view: each upper is the last tree to the other reader.
        for side, reader in ((subject_side, oracle), (oracle_side, subject)):
            check_upper(side, reader, tree, oracle.name, history)
        return steps
    # The oracle's index (in its workdir) holds the names of a copied-up lower hard link that
    # were not copied up: without it they show the lower inode again, and which names of such
    # an inode an upper alone holds is the writer's choice (a FUSE write names no path). What
    # counts then: both read each upper alike, and the subject's upper holds the last tree
    # wherever no lower hard link is involved.
    with oracle_side.mount_to_read(oracle) as root:
        oracle_upper, _ = snapshot(root)
    check_upper(oracle_side, subject, oracle_upper, f"{oracle.name} over the same upper",
                history)
    with subject_side.mount_to_read(oracle) as root:
        subject_upper, _ = snapshot(root)
    check_upper(subject_side, subject, subject_upper, f"{oracle.name} over the same upper",
                history)
    involved = {path for path, _ in tree_differences(tree, oracle_upper, expected_name="",
                                                     actual_name="")}
    involved |= {path for path, seen in tree.items() if (seen.nlink or 1) > 1}
    failure = tree_failure(
        {path: seen for path, seen in tree.items() if path not in involved},
        {path: seen for path, seen in subject_upper.items() if path not in involved}, [],
        oracle, expected_name=oracle.name,
        actual_name=f"{oracle.name} over {subject.name}'s upper", history=history)
    assert failure is None, failure
    return steps


def check_upper(side: Side, reader: Implementation, expected: Tree, expected_name: str,
                history: list[str]) -> None:
    """*reader* over *side*'s upper and lowers (with a fresh workdir) shows *expected*."""
    name = f"{reader.name} over {side.implementation.name}'s upper"
    with side.mount_to_read(reader) as root:
        try:
            shown, vanished = snapshot(root)
        except OSError as exc:
            raise AssertionError(unreadable(name, exc, history)) from None
    failure = tree_failure(expected, shown, vanished, reader, expected_name=expected_name,
                           actual_name=name, history=history)
    assert failure is None, failure


def subject_under_test() -> Implementation:
    return KERNEL if os.environ.get("COWFS_WRITE_ORACLE_SUBJECT") == "kernel" else COWFS


def run_write_sequence(stack: WriteStack, data: st.DataObject,
                       subject: Implementation) -> None:
    """One random sequence of STEPS operations: both sides agree at every step."""
    def draw_operation(step: int, tree: Tree) -> Operation | None:
        if step == STEPS:
            return None
        return data.draw(operations(tree, stack.names), label=f"step {step}")

    with tempfile.TemporaryDirectory(prefix="cowfs-write-") as temporary:
        try:
            taken = compare_sequence(Path(temporary), stack, draw_operation, subject=subject)
        except AssertionError as failure:
            # Shown with the test's output even when hypothesis, replaying the example, ends
            # in a flaky-data error instead of this one.
            print(f"[write oracle] difference found:\n{failure}", file=sys.stderr)
            raise
    assert taken == STEPS
    compared[subject.name] = compared.get(subject.name, 0) + 1


@settings(max_examples=WRITE_SEQUENCES, deadline=None, suppress_health_check=SLOW_EXAMPLES)
@given(stack=write_stacks(), data=st.data())
def check_write_sequences(stack: WriteStack, data: st.DataObject) -> None:
    run_write_sequence(stack, data, subject_under_test())


@settings(max_examples=SANITY_SEQUENCES, deadline=None, suppress_health_check=SLOW_EXAMPLES)
@given(stack=write_stacks(), data=st.data())
def check_kernel_sequences(stack: WriteStack, data: st.DataObject) -> None:
    run_write_sequence(stack, data, KERNEL)


def test_writes_match_overlayfs(capsys: pytest.CaptureFixture[str],
                                record_property: Callable[[str, object], None]) -> None:
    """The write path's acceptance test: WRITE_SEQUENCES sequences, not one difference."""
    subject = subject_under_test()
    before = compared.get(subject.name, 0)
    check_write_sequences()
    done = compared[subject.name] - before
    assert done >= WRITE_SEQUENCES
    record_property("write_sequences_compared", done)
    with capsys.disabled():
        print(f"\n[write oracle] {done} sequences of {STEPS} steps: {subject.name} wrote as "
              f"the kernel's overlayfs did")


def test_kernel_matches_itself() -> None:
    """The harness sees no difference between two kernel mounts: nothing it compares is
    noise (inode numbers, ctime, readdir order, the kernel's own time stamps)."""
    before = compared.get(KERNEL.name, 0)
    check_kernel_sequences()
    assert compared[KERNEL.name] - before >= SANITY_SEQUENCES


# -- the harness catches what it must: a fixed stack, differences injected ----------------------

FIXED_STACK = WriteStack(
    Stack("kernel", [
        Dir(children={"a": File(b"top a"), "gone": Whiteout(),
                      "d": Dir(opaque="y", children={"x": File(b"x")})}),
        Dir(children={"gone": File(b"hidden"), "b": File(b"lower b", mode=0o4755),
                      "d": Dir(children={"y": File(b"y")}),
                      "s": Symlink("a b")}),
    ]),
    ["a", "b", "d", "gone", "new"],
)


def scripted(*script: Operation) -> NextOperation:
    return lambda step, tree: script[step] if step < len(script) else None


def test_fixed_sequence_matches() -> None:
    """A sequence through every kind of collision the spec names, on the subject under test:
    delete lower names (whiteouts), rmdir a merged dir that is not empty, mkdir and create over
    whiteouts, rename lower files and directories, hard links, xattrs."""
    script = scripted(
        Operation("unlink", ("b",)),
        Operation("rmdir", ("d",)),
        Operation("create", ("gone", os.O_EXCL, 0o640, b"new gone")),
        Operation("mkdir", ("b", 0o750)),
        Operation("rename", ("d", "b/moved", 0)),
        Operation("rename", ("a", "s", 2)),           # RENAME_EXCHANGE
        Operation("rename", ("s", "b", 1)),           # RENAME_NOREPLACE: EEXIST
        Operation("link", ("s", "b/link")),
        Operation("write", ("b/link", os.O_APPEND, None, b" more", True, True)),
        Operation("setxattr", ("b/moved", "user.a", b"v", 0)),
        Operation("chown", ("b/moved/x", 1000, -1)),
        Operation("rmdir", ("b/moved",)),
        Operation("unlink", ("b/moved/x",)),
        Operation("rmdir", ("b/moved",)),
    )
    with tempfile.TemporaryDirectory(prefix="cowfs-write-") as temporary:
        assert compare_sequence(Path(temporary), FIXED_STACK, script,
                                subject=subject_under_test()) == 14


HARD_LINK_STACK = WriteStack(
    Stack("kernel", [
        Dir(children={"h1": File(b"linked", xattrs={"user.a": b"1"}), "h2": HardLink("h1")}),
        Dir(children={"h1": File(b"hidden"), "other": File(b"other")}),
    ]),
    ["h1", "h2", "h3"],
)


@pytest.mark.parametrize("operation", [
    Operation("write", ("h1", os.O_APPEND, None, b"!", False, False)),
    Operation("chmod", ("h2", 0o600)),
    Operation("link", ("h1", "h3")),
    Operation("unlink", ("h1",)),
    Operation("rename", ("h2", "h3", 0)),
], ids=repr)
def test_lower_hard_links_stay_one_inode(operation: Operation) -> None:
    """Two names of one lower inode, one changed: the other name shows the change too (the
    kernel with index=on, and cowfs, whose node is the inode) and the link counts follow."""
    script = scripted(operation, Operation("stat", ("h1",)), Operation("stat", ("h2",)))
    with tempfile.TemporaryDirectory(prefix="cowfs-write-") as temporary:
        assert compare_sequence(Path(temporary), HARD_LINK_STACK, script,
                                subject=subject_under_test()) == 3


def test_harness_catches_a_different_result() -> None:
    def tamper(step: int, side: Side) -> None:
        if step == 0:   # the subject's "a" goes before its own unlink of it
            (side.merged / "a").unlink()

    script = scripted(Operation("unlink", ("a",)))
    with tempfile.TemporaryDirectory(prefix="cowfs-write-") as temporary, \
            pytest.raises(AssertionError, match=r"unlink\('a'\): overlayfs gives \('ok', None\), "
                          r"overlayfs gives \('error', 'ENOENT'\)"):
        compare_sequence(Path(temporary), FIXED_STACK, script, subject=KERNEL, tamper=tamper)


def test_harness_catches_a_different_tree() -> None:
    def tamper(step: int, side: Side) -> None:
        if step == 1:   # behind the subject's back: its copied-up file's data
            (side.upper / "a").write_bytes(b"tampered")

    script = scripted(Operation("write", ("a", os.O_APPEND, None, b"!", False, False)),
                      Operation("chmod", ("b", 0o600)))
    with tempfile.TemporaryDirectory(prefix="cowfs-write-") as temporary, \
            pytest.raises(AssertionError, match=r"'a': content: overlayfs b'top a!', "):
        compare_sequence(Path(temporary), FIXED_STACK, script, subject=KERNEL, tamper=tamper)


def test_harness_catches_a_bad_upper() -> None:
    def tamper(step: int, side: Side) -> None:
        if step == -1:   # after the sequence: the subject's upper loses a whiteout
            whiteout = side.upper / "b"
            assert stat.S_ISCHR(whiteout.lstat().st_mode)
            whiteout.unlink()

    script = scripted(Operation("unlink", ("b",)))
    with tempfile.TemporaryDirectory(prefix="cowfs-write-") as temporary, \
            pytest.raises(AssertionError, match=r"'b': only overlayfs over overlayfs's upper"):
        compare_sequence(Path(temporary), FIXED_STACK, script, subject=KERNEL, tamper=tamper)
