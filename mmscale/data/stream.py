"""Sample streams that can stop and resume exactly, and that skip bad samples by reason.

A rank's data is split among readers (DataLoader workers). A reader's raw stream is a
pure function of (seed, epoch, rank, reader), so its state is how many raw samples it
delivered plus its skip counts; `StatefulLoader` keeps those per reader, and restoring
them makes the next batches bitwise equal to those of an uninterrupted run.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from mmscale.data.packing import Packer
from mmscale.data.schema import SKIP_REASONS, SampleError
from mmscale.errors import UserError

log = logging.getLogger(__name__)

# A reader that meets this many bad samples in a row stops the run: its data is broken,
# and an endless stream would otherwise search it forever.
MAX_CONSECUTIVE_BAD = 1000


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


def shard_error(error: Exception) -> SampleError | None:
    """The SampleError for a shard webdataset cannot read, or None for the report to ignore.

    webdataset reports a member it cannot read twice: first from inside the tar (no URL),
    then, as the tar ends there, for the shard, appending (stream, url) to the args. Only
    the second is counted.
    """
    if len(error.args) < 3:
        return None
    url = error.args[-1]
    if not isinstance(url, str):
        # Raised while grouping members into samples (e.g. a member name repeated inside
        # one sample), where webdataset appends no URL: the sample is malformed, not the shard.
        return SampleError(f"a malformed sample in a shard ({error.args[0]})", "schema")
    reason = "truncated_shard" if "unexpected end of data" in str(error.args[0]) else "unreadable_shard"
    return SampleError(f"shard {url} cannot be read as a tar file ({error.args[0]}); rebuild or remove it", reason)


class RestorePoint(NamedTuple):
    """Where a reader resumes: all of its state."""

    position: int = 0  # raw samples it had delivered
    emitted: int = 0  # packed rows already handed out from there (packing restarts a block)
    skipped: dict[str, int] = {}  # skip counts up to there
    mark: str | None = None  # "url#key" of the raw sample at `position`, to check the restore


@dataclass(frozen=True)
class Source:
    """One dataset of a (possibly weighted) mixture."""

    key: str  # where it comes from in the recipe, for messages, e.g. "data.train[1]"
    shards: list[str]
    weight: float = 1.0


class ShardStream(IterableDataset):
    """Raw samples from one or several weighted sources, endlessly, from a restorable position.

    Per source, each epoch orders its shards by a seeded shuffle, gives rank r the shards
    r, r+world, ... and splits those among the rank's readers the same way, then shuffles
    samples in a buffer seeded by (seed, source, epoch, rank, reader); each source goes
    through its epochs on its own. With several sources, a seeded draw per sample picks
    the source by weight. A reader's stream is thus a pure function of the seed, its rank
    and its index, and its position (samples delivered) is its whole state.

    Readers are logical workers: DataLoader worker p plays reader (p + rotation) % workers,
    so that after a restore the reader whose batch is due comes first (DataLoader always
    starts with worker 0 and then takes batches from its workers in turn).
    """

    def __init__(self, sources: list[Source], seed: int, shuffle_buffer: int, shuffle: bool, strict: bool = False):
        super().__init__()
        self.sources, self.seed, self.shuffle_buffer, self.shuffle = sources, seed, shuffle_buffer, shuffle
        self.key = sources[0].key.split("[")[0]
        self.strict = strict
        self.restore: dict[int, RestorePoint] = {}  # reader -> where it resumes
        self.reader = 0  # set in each worker's copy when it starts
        self.rotation = 0
        self.skipped: Counter[str] = Counter()  # this reader's running counts, in its worker process

    def skip(self, error: SampleError) -> None:
        """Count a bad sample or shard, or, in strict mode, stop on it."""
        if self.strict:
            raise error
        self.skipped[error.reason] += 1
        count = self.skipped[error.reason]
        if count & (count - 1) == 0:  # rate-limited: the 1st, 2nd, 4th, 8th, ... of each reason
            log.warning("skipped %d %s so far (data.strict=true stops instead); latest: %s", count, error.reason, error)

    def reader_samples(self, rank: int, world: int, reader: int, readers: int, start: int = 0) -> Iterator[dict]:
        """The endless raw stream of one reader of one rank; shard errors before `start` are not counted again."""
        delivered = 0

        def on_shard_error(error: Exception) -> bool:
            problem = shard_error(error)
            if problem is not None and delivered >= start:  # before that, the restored counts hold it
                self.skip(problem)
            elif problem is not None and self.strict:
                raise problem
            return True  # go on with the next shard

        streams = [self._source_samples(s, rank, world, reader, readers, on_shard_error) for s in self.sources]
        if len(streams) == 1:
            picks = itertools.repeat(0)
        else:
            draws = random.Random(f"{self.seed}-mixture-{rank}-{reader}")
            weights = [s.weight for s in self.sources]
            picks = (draws.choices(range(len(streams)), weights)[0] for _ in itertools.count())
        for pick in picks:
            sample = next(streams[pick])
            delivered += 1
            yield sample

    def _source_samples(
        self, source: Source, rank: int, world: int, reader: int, readers: int, handler: Callable
    ) -> Iterator[dict]:
        # A lone source keeps the seeds it had before mixtures existed, so runs reproduce.
        seed = self.seed if len(self.sources) == 1 else f"{self.seed}-{source.key}"
        for epoch in itertools.count():
            order = list(source.shards)
            if self.shuffle:
                random.Random(f"{seed}-shards-{epoch}").shuffle(order)
            mine = order[rank::world][reader::readers]
            samples = wds.tarfile_to_samples(handler=handler)(iter([{"url": url} for url in mine]))
            if self.shuffle:
                buffer_seed = f"{seed}-samples-{epoch}-{rank}-{reader}"
                samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=buffer_seed)(samples)
            in_epoch = 0
            for sample in samples:
                in_epoch += 1
                yield sample
            if not in_epoch:
                raise UserError(f"{source.key}: rank {rank} reader {reader} read no sample in a whole epoch of {mine}")

    def __iter__(self) -> Iterator[dict]:
        rank, world, worker, num_workers = wds.utils.pytorch_worker_info()
        for source in self.sources:
            check_readers(source.shards, source.key, world, num_workers)
        reader = self.reader = (worker + self.rotation) % num_workers
        point = self.restore.get(reader, RestorePoint())
        start = point.position
        self.skipped = Counter(point.skipped)
        samples = self.reader_samples(rank, world, reader, num_workers, start)
        # Skipping re-reads the tar members but decodes nothing: cheap next to training on
        # them. The last one skipped must be the one the checkpoint names, or the shards
        # (or what could be read of them) changed, and the stream would silently shift.
        skipped_ahead = collections.deque(itertools.islice(samples, start), maxlen=1)
        last = skipped_ahead[0] if skipped_ahead else None
        if start and (last is None or _mark(last) != point.mark):
            raise UserError(
                f"{self.key}: rank {rank} reader {reader} cannot resume: sample {start} of its stream is "
                f"{_mark(last) if last else 'missing'}, the checkpoint expects {point.mark}; "
                f"the shards changed or could not be read the same way since the checkpoint"
            )
        for position, sample in enumerate(samples, start=start + 1):
            sample["__reader__"] = (reader, position, _mark(sample))
            yield sample


def _mark(sample: dict) -> str:
    return f"{sample.get('__url__')}#{sample.get('__key__')}"


class EncodedStream(IterableDataset):
    """Encoded samples, or packed rows of them; bad samples are skipped and counted (or, in
    strict mode, stop the run).

    Each item carries (its reader, the reader's RestorePoint after it). Unpacked, the point is
    just after the item's sample. Packed, it is the start of the item's block: a restore
    re-reads and re-packs the block (packing is deterministic) and skips the rows handed out.
    """

    def __init__(self, stream: ShardStream, encode: Callable[[dict], dict], packer: Packer | None):
        super().__init__()
        self.stream, self.encode, self.packer = stream, encode, packer

    def _good(self) -> Iterator[tuple[dict, int, str]]:
        """(encoded sample, raw position after it, its mark) for each good sample."""
        bad_in_a_row = 0
        for raw in self.stream:
            try:
                sample = self.encode(raw)
            except SampleError as error:
                self.stream.skip(error)
                bad_in_a_row += 1
                if bad_in_a_row >= MAX_CONSECUTIVE_BAD:
                    raise UserError(
                        f"{self.stream.key}: {bad_in_a_row} bad samples in a row (latest: {error}); "
                        f"skip counts {dict(self.stream.skipped)}: the data is broken"
                    ) from error
                continue
            bad_in_a_row = 0
            yield sample, *raw["__reader__"][1:]

    def __iter__(self) -> Iterator[dict]:
        good = self._good()
        if self.packer is None:
            for sample, position, mark in good:
                sample["reader"] = (self.stream.reader, RestorePoint(position, 0, dict(self.stream.skipped), mark))
                yield sample
            return
        first = next(good)  # starts the stream, which tells this worker which reader it plays
        reader = self.stream.reader
        block_start = self.stream.restore.get(reader, RestorePoint())
        block = [first, *itertools.islice(good, self.packer.block - 1)]
        while True:
            rows = self.packer([sample for sample, _, _ in block])
            for emitted, row in enumerate(rows[block_start.emitted :], start=block_start.emitted + 1):
                row["reader"] = (reader, block_start._replace(emitted=emitted))
                yield row
            _, position, mark = block[-1]
            block_start = RestorePoint(position, 0, dict(self.stream.skipped), mark)
            block = list(itertools.islice(good, self.packer.block))


class StatefulLoader:
    """A DataLoader over an EncodedStream whose position is saved and restored exactly.

    Every iteration starts at the loaded position (the beginning, unless `load_state_dict`
    was called), so validation reads the same batches each time; `state_dict` gives the
    position after the last batch handed out.
    """

    def __init__(self, stream: ShardStream, encode: Callable[[dict], dict], packer: Packer | None, **loader_args):
        self.stream, self.encode, self.packer, self.loader_args = stream, encode, packer, loader_args
        self.readers = max(1, loader_args["num_workers"])
        self.start: dict = {"batches": 0, "points": {}}  # points: reader -> RestorePoint
        # Which shards the positions refer to: a changed list makes them meaningless.
        listing = "\n".join(f"{s.key} {s.weight} {' '.join(s.shards)}" for s in stream.sources)
        self.shards = hashlib.sha256(listing.encode()).hexdigest()
        self.position = self.start

    def __iter__(self) -> Iterator[dict]:
        position = {"batches": self.start["batches"], "points": dict(self.start["points"])}
        self.position = position
        # Workers copy the stream when they start, so the start is set on it before they do.
        self.stream.restore = dict(position["points"])
        self.stream.rotation = position["batches"] % self.readers
        batches = iter(DataLoader(EncodedStream(self.stream, self.encode, self.packer), **self.loader_args))
        try:
            for batch in batches:
                reader, point = batch["meta"].pop("reader")
                position["points"][reader] = point
                position["batches"] += 1
                yield batch
        finally:
            # Stop the workers now rather than when the iterator is garbage-collected: an
            # exception's traceback keeps the iterator alive past the run, and at exit
            # multiprocessing would SIGTERM workers that ignore SIGTERM (see
            # loader.leave_stop_signals_to_the_main_process) and wait for them forever.
            # PyTorch offers no public call for this; _shutdown_workers is what its __del__ runs.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def skipped(self) -> dict[str, int]:
        """This rank's skip counts by reason, over all its readers, up to the last batch handed out."""
        total = Counter()
        for point in self.position["points"].values():
            total.update(point.skipped)
        return {reason: total[reason] for reason in SKIP_REASONS}

    def state_dict(self) -> dict:
        return {"readers": self.readers, "shards": self.shards, **self.position}

    def load_state_dict(self, state: dict) -> None:
        if state["readers"] != self.readers:
            raise UserError(
                f"{self.stream.key}: the checkpoint's loader had {state['readers']} readers per rank and "
                f"this one has {self.readers}; resume with the same data.num_workers"
            )
        if state["shards"] != self.shards:
            raise UserError(
                f"{self.stream.key}: the shard list (or mixture) differs from the one the checkpoint was "
                f"written with; resume with the same shards, or start a new run"
            )
        # JSON round trips turn reader keys into strings and points into lists.
        self.start = {
            "batches": state["batches"],
            "points": {int(reader): RestorePoint(*point) for reader, point in state["points"].items()},
        }
        self.position = self.start
