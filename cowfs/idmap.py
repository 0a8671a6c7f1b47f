"""Owner ids between the layers on disk and the merged view: fuse-overlayfs's `uidmapping=`,
`gidmapping=` and `squash_to_*` options, with the meaning container tools give them.

A mapping is a list of `A:B:N` triples: disk ids A..A+N-1 show as B..B+N-1 in the merged view,
and a caller with view id B+k creates files owned by A+k on disk. So an image unpacked with its
own ids (0 for root) serves a container whose processes run as host ids 100000 and up
(`uidmapping=0:100000:65536`) without a chown of the image. Ids outside every triple show, and are
stored, as the overflow id 65534, as fuse-overlayfs does. A squash id replaces every owner the
view shows (and nothing stored).
"""

import dataclasses
import itertools

OVERFLOW_ID = 65534


class MappingError(ValueError):
    """A malformed mapping; the message says what is wrong in one line."""


@dataclasses.dataclass(frozen=True)
class IdMap:
    ranges: tuple[tuple[int, int, int], ...] = ()     # (disk start, view start, length)
    squash: int | None = None

    def to_view(self, disk_id: int) -> int:
        if self.squash is not None:
            return self.squash
        if not self.ranges:
            return disk_id
        for disk_start, view_start, length in self.ranges:
            if disk_start <= disk_id < disk_start + length:
                return view_start + disk_id - disk_start
        return OVERFLOW_ID

    def to_disk(self, view_id: int) -> int:
        if not self.ranges:
            return view_id
        for disk_start, view_start, length in self.ranges:
            if view_start <= view_id < view_start + length:
                return disk_start + view_id - view_start
        return OVERFLOW_ID

    @property
    def is_identity(self) -> bool:
        return not self.ranges and self.squash is None


IDENTITY = IdMap()


def parse_mapping(text: str, option: str = "uidmapping") -> tuple[tuple[int, int, int], ...]:
    """`A:B:N[:A:B:N...]`, as containers-storage writes it (a leading colon is allowed)."""
    fields = text.removeprefix(":").split(":")
    try:
        numbers = [int(field) for field in fields]
    except ValueError:
        raise MappingError(f"{option}={text}: expected numbers A:B:N[:A:B:N...]") from None
    if len(numbers) % 3 or not numbers or any(number < 0 for number in numbers):
        raise MappingError(f"{option}={text}: expected triples A:B:N[:A:B:N...]")
    ranges = tuple((numbers[index], numbers[index + 1], numbers[index + 2])
                   for index in range(0, len(numbers), 3))
    if any(length == 0 for _, _, length in ranges):
        raise MappingError(f"{option}={text}: a range of length 0")
    for side, name in ((0, "disk"), (1, "view")):
        spans = sorted((triple[side], triple[side] + triple[2]) for triple in ranges)
        if any(previous[1] > current[0] for previous, current in itertools.pairwise(spans)):
            raise MappingError(f"{option}={text}: overlapping {name} ranges")
    return ranges
