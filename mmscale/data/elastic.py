"""The rest of an epoch, dealt to another number of readers: elastic resume.

A reader's shards follow from its index among all readers (ranks x workers, see
`stream.ShardStream`), so after a change in their number the old positions mean nothing to the
new readers. Instead, what the old readers had not delivered of their epochs, up to the epoch
of the furthest one, is listed as `Unit`s (a slice of one shuffle block of one old reader's
epoch, in that reader's order) and cut into equal contiguous shares, one per new reader. Each
new reader reads its share first, then its own epochs from the next one on: every sample of
those epochs is delivered exactly once, though not in the order an uninterrupted run would
have delivered them (not promised). The list (`Carry`) travels in every later checkpoint; a
further change lists what is left of it the same way.

A packed reader's position is the start of its packing block, some of whose rows were trained:
its rest starts there, and the samples of those rows (`RestorePoint.done`) are marked in their
units to be passed over. Dealing needs each shard's sample count (the shards' manifest).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

from mmscale.data.readers import reader_index
from mmscale.errors import UserError


class Stream(Protocol):
    """What dealing reads of the stream it deals for: `stream.ShardStream`, which imports this module."""

    key: str
    sources: Sequence[Any]  # stream.Source: its key and shard counts
    shuffle_buffer: int

    def place(self, index: int, rank: int, world: int, reader: int, readers: int, n: int,
              carry: Carry | None = None) -> tuple[int, int]: ...

    def epoch_length(self, source: Any, epoch: int, rank: int, world: int, reader: int, readers: int) -> int: ...


class Position(Protocol):
    """What dealing reads of a reader's position: `stream.RestorePoint`."""

    @property
    def position(self) -> int: ...
    @property
    def skipped(self) -> dict[str, int]: ...
    @property
    def drawn(self) -> tuple[int, ...]: ...
    @property
    def located(self) -> tuple[tuple[int, int] | None, ...]: ...
    @property
    def done(self) -> tuple[tuple[int, int, int], ...]: ...


class Unit(NamedTuple):
    """Samples [begin, end) of shuffle block `block` of one reader's epoch of a source, in that
    reader's order: (epoch, rank, world, reader, readers) name the reader and its epoch."""

    epoch: int
    rank: int
    world: int
    reader: int
    readers: int
    block: int
    begin: int
    end: int
    drop: tuple[int, ...] = ()  # samples of the block trained before, passed over (sorted)

    @property
    def size(self) -> int:
        return self.end - self.begin


class Carry(NamedTuple):
    """One source's rest of epochs carried over a change of readers: its units, and the epoch
    from which the readers' own epochs go on."""

    base: int = 0
    units: tuple[Unit, ...] = ()

    def share(self, index: int, count: int) -> list[Unit]:
        """Reader `index` of `count` readers' contiguous share; shares differ by one sample at most."""
        total = sum(u.size for u in self.units)
        return cut(self.units, index * total // count, (index + 1) * total // count)

    @classmethod
    def from_json(cls, saved: list) -> Carry:
        base, units = saved
        return cls(base, tuple(Unit(*u[:8], tuple(u[8]) if len(u) > 8 else ()) for u in units))


def cut(units: tuple[Unit, ...] | list[Unit], start: int, stop: int) -> list[Unit]:
    """Samples [start, stop) of the concatenated `units`, as units."""
    out, at = [], 0
    for unit in units:
        lo, hi = max(start, at), min(stop, at + unit.size)
        if lo < hi:
            out.append(unit._replace(begin=unit.begin + lo - at, end=unit.begin + hi - at))
        at += unit.size
        if at >= stop:
            break
    return out


def rest_of_epochs(stream: Stream, world: int, readers: int, points: list[dict[int, Position]],
                   carries: list[Carry]) -> list[Carry]:
    """Per source of `stream`, the samples that `world` ranks of `readers` readers had not yet
    delivered up to the end of the furthest reader's epoch, given each rank's reader positions
    (`points`) and the carry they read under."""
    result = []
    for i, (source, carry) in enumerate(zip(stream.sources, carries)):
        where = []  # per old reader: (its units left, (epoch, offset) its own epochs go on from)
        furthest = carry.base - 1  # the epoch of the furthest sample delivered
        for rank in range(world):
            for reader in range(readers):
                point = points[rank].get(reader)
                n = point.drawn[i] if point is not None and point.position else 0
                done = {(e, o) for s, e, o in (point.done if point is not None else ()) if s == i}
                held = _dropping(carry.share(reader_index(rank, world, reader), world * readers), done)
                size = sum(u.size for u in held)
                layout = (rank, world, reader, readers)
                if n:
                    _check_placed(stream, i, point.located[i], n, carry, layout)
                # Rows handed out from a packing block may reach past its start, into the next epoch.
                furthest = max([furthest, *(e for e, _ in done)])
                if n <= size:
                    where.append((cut(held, n, size), (carry.base, 0), done))
                    continue
                furthest = max(furthest, stream.place(i, *layout, n - 1, carry)[0])
                where.append(([], stream.place(i, *layout, n, carry), done))
        units = []
        for index, (left, (epoch, offset), done) in enumerate(where):
            rank, reader = index // readers, index % readers
            units += left
            for e in range(epoch, furthest + 1):
                own = _epoch_units(stream, source, e, rank, world, reader, readers, offset if e == epoch else 0)
                size = stream.shuffle_buffer
                units += [u._replace(drop=tuple(sorted(o - u.block * size for d, o in done
                                                       if d == e and o // size == u.block))) for u in own]
        result.append(Carry(max(carry.base, furthest + 1), tuple(units)))
    return result


def _check_placed(stream: Stream, index: int, located: tuple[int, int] | None, n: int, carry: Carry,
                  layout: tuple[int, int, int, int]) -> None:
    """UserError unless the shards' counts place an old reader's last sample of source `index`
    where it was read: a shard that broke or changed since its manifest shifts every position
    after it, and the rest of the epoch would be dealt wrong (a resume on the same layout reads
    the stream again instead)."""
    placed = stream.place(index, *layout, n - 1, carry)
    if located is None or tuple(located) != placed:
        rank, world, reader, readers = layout
        raise UserError(
            f"{stream.sources[index].key}: rank {rank} reader {reader} of the checkpoint's {world} x {readers} read its sample "
            f"{n - 1} at {located}, where the shards' counts place {placed}: a shard changed or broke since its "
            f"manifest, so the rest of the epoch cannot be dealt to other readers; resume on {world} ranks x "
            f"{readers} readers (which reads the stream again), or rebuild the shards' manifest"
        )


def _dropping(held: list[Unit], done: set[tuple[int, int]]) -> list[Unit]:
    """A reader's share of a carry with the samples it trained in packed rows (epoch -1, n: its
    n-th sample of the share) added to their units' drops."""
    marked, at = [], 0
    for unit in held:
        new = {unit.begin + n - at for d, n in done if d == -1 and at <= n < at + unit.size}
        marked.append(unit._replace(drop=tuple(sorted(set(unit.drop) | new))) if new else unit)
        at += unit.size
    return marked


def _epoch_units(stream: Stream, source, epoch: int, rank: int, world: int, reader: int, readers: int,
                 offset: int) -> list[Unit]:
    """One reader's epoch of `source` from sample `offset` on, block by block."""
    length = stream.epoch_length(source, epoch, rank, world, reader, readers)
    size = stream.shuffle_buffer
    units = []
    for block in range(offset // size, -(-length // size)):
        begin, end = max(0, offset - block * size), min(size, length - block * size)
        if begin < end:
            units.append(Unit(epoch, rank, world, reader, readers, block, begin, end))
    return units


def check_elastic(stream: Stream, old: str, new: str) -> None:
    """UserError unless the stream can deal the rest of its epoch to other readers."""
    fix = f"resume on {old} as before"
    missing = [s.key for s in stream.sources if s.counts is None]
    if missing:
        raise UserError(
            f"{stream.key}: the checkpoint was written by {old} and this start has {new}; dealing the rest of the "
            f"epoch to other readers needs each shard's sample count, and {missing[0]} has no manifest.json "
            f"(written by `mmscale shards build`): {fix}"
        )


def skipped_in_all(points: list[dict[int, Position]]) -> dict[str, int]:
    """The skip counts of every reader of every rank, added up."""
    total = Counter()
    for rank_points in points:
        for point in rank_points.values():
            total.update(point.skipped)
    return dict(total)
