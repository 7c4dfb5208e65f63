"""How a data stream's shards are dealt to its readers (ranks x loader workers), and whether
they get about equal work."""

from __future__ import annotations

from mmscale.errors import UserError

# How much more one reader may read per epoch than another (max/min - 1), beyond one sample
# per shard (what an even split of records into shards leaves). Readers deliver samples at
# the same rate, so one with less data starts its next epoch sooner and its samples are seen
# that much more often than the others': 10% is small next to the skews mixture weights set
# on purpose, while a whole shard more or less (+50% at two shards per reader) is not.
READER_SPREAD_TOLERANCE = 0.10


def reader_loads(counts: list[int], readers: int) -> tuple[int, int]:
    """The fewest and most samples a reader can get in an epoch, given each shard's samples.

    ShardStream deals each epoch's shuffled shards round-robin over all readers (ranks x
    workers), so a reader gets floor(N/R) or ceil(N/R) of the N shards, and in some epoch
    maybe the smallest or the largest ones: the bounds hold for every seed and epoch.
    """
    ordered = sorted(counts)
    most = -(-len(ordered) // readers)
    return sum(ordered[: len(ordered) // readers]), sum(ordered[len(ordered) - most :])


def uneven_readers(counts: list[int], readers: int) -> str | None:
    """Why `readers` readers of shards of `counts` samples would get unequal work, or None if they would not."""
    if len(counts) < readers:
        return f"{len(counts)} shards for {readers} readers leave some readers without a shard"
    fewest, most = reader_loads(counts, readers)
    if most - fewest <= max(READER_SPREAD_TOLERANCE * fewest, -(-len(counts) // readers)):
        return None
    spread = f"{most / fewest - 1:+.0%}" if fewest else "an empty shard"
    sizes = f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)} to {max(counts)}"
    return (
        f"{len(counts)} shards of {sizes} samples, dealt to {readers} readers, give a reader {fewest} to {most} "
        f"samples per epoch ({spread}; at most {READER_SPREAD_TOLERANCE:+.0%} is accepted)"
    )


def check_readers(shards: list[str], key: str, world: int, workers: int, counts: list[int] | None = None) -> None:
    """Every reader (rank x worker) needs a shard of its own, or it would have nothing to read;
    given each shard's samples (`counts`, from the shards' manifest), readers must also get
    about equal work (READER_SPREAD_TOLERANCE)."""
    readers = world * max(1, workers)
    if len(shards) < readers:
        raise UserError(
            f"{key}: {len(shards)} shards for {world} ranks x {max(1, workers)} workers; every reader "
            f"needs a shard: write at least {readers} shards or lower data.num_workers"
        )
    problem = None if counts is None else uneven_readers(counts, readers)
    if problem:
        raise UserError(
            f"{key}: readers would get unequal work ({world} ranks x {max(1, workers)} workers): {problem}; "
            f"rebuild the shards with `mmscale shards build --readers {readers}` (a multiple of {readers} equal "
            f"shards), or change data.num_workers so that ranks x workers divides the {len(shards)} shards"
        )


def reader_index(rank: int, world: int, reader: int) -> int:
    """A reader's index among all readers, as ShardStream deals shards: order[rank::world][reader::readers]
    is order[rank + world * reader :: world * readers]."""
    return rank + world * reader
