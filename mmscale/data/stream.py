"""Sample streams that can stop and resume exactly, and that skip bad samples by reason.

A rank's data is split among readers (DataLoader workers). A reader's raw stream is a
pure function of (seed, epoch, rank, reader), so its state is how many raw samples it
delivered (from each source of a mixture) plus its skip counts; `StatefulLoader` keeps those
per reader, and restoring them makes the next batches bitwise equal to those of an
uninterrupted run.

A restore takes the same time at any point of a run: with the shards' sample counts (their
manifest), a position maps to an epoch, a shard and a sample inside it, and the shuffle
permutes fixed blocks of a reader's epoch, so a restore reads from the start of the current
block only. Without counts (shards from URLs), it reads the stream again up to the position.
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

from mmscale.data.elastic import Carry, Unit, check_elastic, cut, rest_of_epochs, skipped_in_all
from mmscale.data.packing import Packer
from mmscale.data.readers import check_readers, reader_index
from mmscale.data.schema import SKIP_REASONS, SampleError
from mmscale.data.tar_seek import tar_samples
from mmscale.errors import UserError

log = logging.getLogger(__name__)

# A reader that meets this many bad samples in a row stops the run: its data is broken,
# and an endless stream would otherwise search it forever.
MAX_CONSECUTIVE_BAD = 1000
# A mixture's source draws come in seeded blocks of this many, so that the draw of any position
# is found without drawing all those before it.
DRAW_BLOCK = 4096


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
    drawn: tuple[int, ...] = ()  # of those, how many from each source (empty: not known, read again)
    # each source's (epoch, sample in the epoch) of its last one delivered (None: none yet), to
    # check where the shards' counts place it before seeking there
    located: tuple[tuple[int, int] | None, ...] = ()
    # packed: (source, epoch, sample in the epoch) of the samples in the rows handed out from the
    # block, where `located` counts them; epoch -1: a sample of the reader's share of a carry
    done: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True)
class Source:
    """One dataset of a (possibly weighted) mixture."""

    key: str  # where it comes from in the recipe, for messages, e.g. "data.train[1]"
    shards: list[str]
    weight: float = 1.0
    counts: list[int] | None = None  # each shard's samples (its manifest): a restore seeks with them


class ShardStream(IterableDataset):
    """Raw samples from one or several weighted sources, endlessly, from a restorable position.

    Per source, each epoch orders its shards by a seeded shuffle, gives rank r the shards
    r, r+world, ... and splits those among the rank's readers the same way, then permutes the
    reader's samples in consecutive blocks of `shuffle_buffer`, each by a seed of (seed, source,
    epoch, rank, reader, block); each source goes through its epochs on its own. With several
    sources, a seeded draw per sample picks the source by weight. A reader's stream is thus a
    pure function of the seed, its rank and its index, and its position (samples delivered,
    from each source) is its whole state.

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
        # per source: the rest of epochs read first, after the readers changed in number (data.elastic)
        self.carry = [Carry()] * len(sources)
        self.reader = 0  # set in each worker's copy when it starts
        self.rotation = 0
        self.skipped: Counter[str] = Counter()  # this reader's running counts, in its worker process
        self._draws: tuple[tuple[int, int, int] | None, list[int]] = (None, [])  # (rank, reader, block), its picks
        self._quiet = 0  # > 0 while a block read before a restore is read again: its shard errors were counted

    def skip(self, error: SampleError) -> None:
        """Count a bad sample or shard, or, in strict mode, stop on it."""
        if self.strict:
            raise error
        self.skipped[error.reason] += 1
        count = self.skipped[error.reason]
        if count & (count - 1) == 0:  # rate-limited: the 1st, 2nd, 4th, 8th, ... of each reason
            log.warning("skipped %d %s so far (data.strict=true stops instead); latest: %s", count, error.reason, error)

    def can_seek(self, point: RestorePoint) -> bool:
        """Whether a restore to `point` can seek (every source's shard counts known) rather than read again."""
        known = len(point.drawn) == len(point.located) == len(self.sources)
        return known and all(s.counts is not None for s in self.sources)

    def reader_samples(
        self, rank: int, world: int, reader: int, readers: int, start: int = 0, drawn: tuple[int, ...] = (),
        again: int | None = None, located: tuple = (),
    ) -> Iterator[dict]:
        """The endless raw stream of one reader of one rank, from sample `start`, of which `drawn`
        came from each source (given: read from there on; not given: read from the beginning, the
        first `start` samples not counted again as skipped). `again`: the source whose sample
        `start` is one delivered before (read again to check a restore). Each sample carries the
        draws so far and where each source's last one was (`located`, given with `drawn`)."""
        delivered = start if drawn else 0

        def on_shard_error(error: Exception) -> bool:
            problem = shard_error(error)
            # Met before `start` (reading again), or while a source reads again the shuffle block it had
            # begun before a restore (seeking): the restored counts hold it.
            if problem is not None and delivered >= start and not self._quiet:
                self.skip(problem)
            elif problem is not None and self.strict:
                raise problem
            return True  # go on with the next shard

        drawn, located = list(drawn or [0] * len(self.sources)), list(located or [None] * len(self.sources))
        streams = [self._source_samples(i, rank, world, reader, readers, on_shard_error, first, i == again)
                   for i, first in enumerate(drawn)]
        for index in itertools.count(delivered):
            pick = self._draw(rank, reader, index)
            sample = next(streams[pick])
            delivered += 1
            drawn[pick] += 1
            located[pick] = sample.pop("__at__")
            sample["__drawn__"] = (tuple(drawn), tuple(located))
            sample["__from__"] = (pick, *located[pick])
            yield sample

    def _draw(self, rank: int, reader: int, index: int) -> int:
        """The source of a reader's sample `index`."""
        if len(self.sources) == 1:
            return 0
        block, at = divmod(index, DRAW_BLOCK)
        if self._draws[0] != (rank, reader, block):
            draws = random.Random(f"{self.seed}-mixture-{rank}-{reader}-{block}")
            picks = draws.choices(range(len(self.sources)), [s.weight for s in self.sources], k=DRAW_BLOCK)
            self._draws = ((rank, reader, block), picks)
        return self._draws[1][at]

    def _source_samples(
        self, index: int, rank: int, world: int, reader: int, readers: int, handler: Callable, start: int,
        delivered: bool = False,
    ) -> Iterator[dict]:
        """One reader's samples of source `index`, endlessly, from its `start`-th (sought through
        the shards' counts, or read through without them): its share of the source's carry first
        (samples at (-1, n)), then its own epochs. `delivered`: that sample was delivered before a
        restore, so its shuffle block was read then."""
        source, carry = self.sources[index], self.carry[index]
        share = carry.share(reader_index(rank, world, reader), world * readers)
        held = sum(unit.size for unit in share)
        if start < held:
            at = start
            for sample in self._unit_samples(source, cut(share, start, held), handler, delivered):
                sample["__at__"] = (-1, at)
                at += 1
                yield sample
            start, delivered = held, False
        start -= held
        seed = self._seed(source)
        epoch, offset = (self.locate(source, rank, world, reader, readers, start, carry.base) if source.counts
                         else (carry.base, start))
        for epoch in itertools.count(epoch):
            mine = self._mine(source, seed, epoch, rank, world, reader, readers)
            in_epoch = 0
            block_seed = _block_seed(seed, epoch, rank, reader)
            for sample in self._epoch_samples(source, block_seed, mine, handler, offset, delivered):
                sample["__at__"] = (epoch, offset + in_epoch)
                in_epoch += 1
                yield sample
            delivered = False
            if not in_epoch and not offset:
                urls = [source.shards[i] for i in mine]
                raise UserError(f"{source.key}: rank {rank} reader {reader} read no sample in a whole epoch of {urls}")
            offset = 0

    def _seed(self, source: Source) -> str | int:
        # A lone source keeps the seeds it had before mixtures existed, so runs reproduce.
        return self.seed if len(self.sources) == 1 else f"{self.seed}-{source.key}"

    def locate(self, source: Source, rank: int, world: int, reader: int, readers: int, n: int,
               epoch: int = 0) -> tuple[int, int]:
        """(epoch, sample in the epoch) of a reader's sample `n` of `source` counted from the
        start of `epoch`, by the shards' counts."""
        while True:
            length = self.epoch_length(source, epoch, rank, world, reader, readers)
            if n < length or not length:
                return epoch, n
            n, epoch = n - length, epoch + 1

    def epoch_length(self, source: Source, epoch: int, rank: int, world: int, reader: int, readers: int) -> int:
        mine = self._mine(source, self._seed(source), epoch, rank, world, reader, readers)
        return sum(source.counts[i] for i in mine)

    def place(self, index: int, rank: int, world: int, reader: int, readers: int, n: int,
              carry: Carry | None = None) -> tuple[int, int]:
        """Where a reader's sample `n` of source `index` is, as `_source_samples` marks it, reading
        under `carry` (by default the stream's own)."""
        carry = carry if carry is not None else self.carry[index]
        held = sum(unit.size for unit in carry.share(reader_index(rank, world, reader), world * readers))
        if n < held:
            return -1, n
        return self.locate(self.sources[index], rank, world, reader, readers, n - held, carry.base)

    def _unit_samples(self, source: Source, units: list[Unit], handler: Callable, delivered: bool) -> Iterator[dict]:
        """The samples of `units`, each read as the reader it comes from read its block."""
        seed = self._seed(source)
        for unit in units:
            mine = self._mine(source, seed, unit.epoch, unit.rank, unit.world, unit.reader, unit.readers)
            block_seed = _block_seed(seed, unit.epoch, unit.rank, unit.reader)
            offset = unit.block * self.shuffle_buffer + unit.begin
            # A block begun by its reader, or by another new reader's share, had its shard errors counted.
            samples = self._epoch_samples(source, block_seed, mine, handler, offset, delivered or unit.begin > 0)
            drop = set(unit.drop)
            try:
                for index, sample in enumerate(itertools.islice(samples, unit.size), start=unit.begin):
                    if index in drop:  # trained in a packed row before the change (EncodedStream skips it)
                        sample["__done__"] = True
                    yield sample
            finally:
                samples.close()
            delivered = False

    def _mine(self, source: Source, seed: str | int, epoch: int, rank: int, world: int, reader: int, readers: int) -> list[int]:
        """The indices of the shards one reader reads in one epoch of `source`."""
        order = list(range(len(source.shards)))
        if self.shuffle:
            random.Random(f"{seed}-shards-{epoch}").shuffle(order)
        return order[rank::world][reader::readers]

    def _epoch_samples(
        self, source: Source, block_seed: str, mine: list[int], handler: Callable, offset: int, delivered: bool
    ) -> Iterator[dict]:
        """One reader's epoch of `source` (shards `mine`) from its sample `offset` (`delivered`
        before a restore, see _source_samples): the shards are opened from the one holding the
        start of the block `offset` is in, that one at the sample."""
        size = self.shuffle_buffer if self.shuffle else 1
        first = offset - offset % size  # the first sample of the block holding `offset`
        opened, within = 0, first
        while source.counts is not None and opened < len(mine) and within >= source.counts[mine[opened]]:
            within -= source.counts[mine[opened]]
            opened += 1
        urls = [{"url": source.shards[i]} for i in mine[opened:]]
        samples = tar_samples(urls, handler, within)
        blocks = iter(lambda: list(itertools.islice(samples, size)), [])
        if offset > first or delivered:  # the block was read before the restore
            self._quiet += 1
            try:
                begun = next(blocks, [])
            finally:
                self._quiet -= 1
            blocks = itertools.chain([begun] if begun else [], blocks)
        for number, block in enumerate(blocks, start=first // size):
            if self.shuffle:
                random.Random(f"{block_seed}-{number}").shuffle(block)
            yield from block[offset - first :] if number == first // size else block

    def __iter__(self) -> Iterator[dict]:
        rank, world, worker, num_workers = wds.utils.pytorch_worker_info()
        for source in self.sources:
            check_readers(source.shards, source.key, world, num_workers)
        reader = self.reader = (worker + self.rotation) % num_workers
        point = self.restore.get(reader, RestorePoint())
        self.skipped = Counter(point.skipped)
        samples = self._restored(point, rank, world, reader, num_workers)
        for position, sample in enumerate(samples, start=point.position + 1):
            sample["__reader__"] = (reader, position, _mark(sample), *sample.pop("__drawn__"))
            yield sample

    def _restored(self, point: RestorePoint, rank: int, world: int, reader: int, readers: int) -> Iterator[dict]:
        """The reader's stream after `point`, whose last sample is checked against the one the
        checkpoint names: otherwise the shards (or what could be read of them) changed, and the
        stream would silently shift. Sought where possible; read again from the beginning where
        not, or where seeking finds another sample (a shard with fewer samples than its manifest
        says, say, cut short, which the first reading skipped the rest of)."""
        start = point.position
        if not start:
            return self.reader_samples(rank, world, reader, readers)
        if self.can_seek(point):
            # The counts must place each source's last sample where it was read (a shard that broke
            # or changed since its manifest shifts the epochs), and the seek must find the sample named.
            placed = [self.place(i, rank, world, reader, readers, n - 1) if n else None
                      for i, n in enumerate(point.drawn)]
            before, last_pick = list(point.drawn), self._draw(rank, reader, start - 1)
            before[last_pick] -= 1  # from the last sample delivered, to check it
            samples = self.reader_samples(rank, world, reader, readers, start - 1, tuple(before), last_pick,
                                          point.located)
            last = next(samples, None) if tuple(placed) == point.located else None
            if last is not None and _mark(last) == point.mark:
                return samples
            log.warning("%s: rank %d reader %d: seeking to sample %d found %s, not %s; reading the stream again "
                        "up to it", self.key, rank, reader, start, _mark(last) if last else "another place", point.mark)
            self.skipped = Counter(point.skipped)  # without what the attempt counted
        samples = self.reader_samples(rank, world, reader, readers, start)
        # Skipping re-reads the tar members but decodes nothing.
        skipped_ahead = collections.deque(itertools.islice(samples, start), maxlen=1)
        last = skipped_ahead[0] if skipped_ahead else None
        if last is None or _mark(last) != point.mark:
            raise UserError(
                f"{self.key}: rank {rank} reader {reader} cannot resume: sample {start} of its stream is "
                f"{_mark(last) if last else 'missing'}, the checkpoint expects {point.mark}; "
                f"the shards changed or could not be read the same way since the checkpoint"
            )
        return samples


def _block_seed(seed: str | int, epoch: int, rank: int, reader: int) -> str:
    return f"{seed}-samples-{epoch}-{rank}-{reader}"


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

    def _good(self) -> Iterator[tuple[dict, tuple]]:
        """(encoded sample, (raw position after it, its mark, the draws from each source up to it,
        where each source's last one was, (its source, where it was))) for each good sample that
        was not trained before a change of readers (see data.elastic)."""
        bad_in_a_row = 0
        for raw in self.stream:
            if raw.get("__done__"):
                continue
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
            yield sample, (*raw["__reader__"][1:], raw["__from__"])

    def __iter__(self) -> Iterator[dict]:
        good = self._good()
        if self.packer is None:
            for sample, (position, mark, drawn, located, _) in good:
                point = RestorePoint(position, 0, dict(self.stream.skipped), mark, drawn, located)
                sample["reader"] = (self.stream.reader, point)
                yield sample
            return
        first = next(good)  # starts the stream, which tells this worker which reader it plays
        reader = self.stream.reader
        block_start = self.stream.restore.get(reader, RestorePoint())
        block = [first, *itertools.islice(good, self.packer.block - 1)]
        while True:
            samples = [sample for sample, _ in block]
            groups = self.packer.rows_of(samples)
            rows, handed = self.packer(samples, groups), block_start.emitted
            done = [block[i][1][-1] for group in groups[:handed] for i in group]  # where each sample was
            for emitted, (row, group) in enumerate(zip(rows[handed:], groups[handed:]), start=handed + 1):
                done += [block[i][1][-1] for i in group]
                row["reader"] = (reader, block_start._replace(emitted=emitted, done=tuple(done)))
                yield row
            _, (position, mark, drawn, located, _) = block[-1]
            block_start = RestorePoint(position, 0, dict(self.stream.skipped), mark, drawn, located)
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
        # Which shards the positions refer to: a changed list makes them meaningless. By name, so that
        # a run resumes with its shards moved to another folder (run_dir.MAY_MOVE_ON_RESUME).
        self.shards = _listing_hash(stream.sources, lambda shard: shard.rsplit("/", 1)[-1])
        # Checkpoints written before named the shards by their whole paths.
        self.shards_by_path = _listing_hash(stream.sources, str)
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
        return {"readers": self.readers, "shards": self.shards, **self.position, "carry": self.stream.carry}

    def resume(self, states: list[dict], rank: int, world: int) -> str | None:
        """Restore this rank's position from every rank's saved state (`states`); on as many
        readers as they had, exactly (`load_state_dict`); on another number, by dealing the rest
        of their epochs to these readers (see data.elastic), which is described in the returned line."""
        old_world, old_readers = len(states), states[0]["readers"]
        if (old_world, old_readers) == (world, self.readers):
            self.load_state_dict(states[rank])
            return None
        old, new = (f"{w} rank{'s' * (w != 1)} x {r} reader{'s' * (r != 1)}"
                    for w, r in ((old_world, old_readers), (world, self.readers)))
        self._check_shards(states[0])
        check_elastic(self.stream, old, new)
        points = [_restore_points(state) for state in states]
        if any(p.position and not p.drawn for rank_points in points for p in rank_points.values()):
            raise UserError(f"{self.stream.key}: the checkpoint's data positions predate elastic resume: resume on {old}")
        broken = {r: n for r, n in skipped_in_all(points).items() if r in ("truncated_shard", "unreadable_shard") and n}
        if broken:
            # Shards that could not be read whole hold fewer samples than their manifest says.
            raise UserError(f"{self.stream.key}: the old readers met {broken}; the shards' counts cannot be trusted to "
                            f"deal the rest of the epoch to other readers: resume on {old}, or fix the shards")
        carries = rest_of_epochs(self.stream, old_world, old_readers, points, _carry(states[0], len(self.stream.sources)))
        self.stream.carry = carries
        # The skip counts go on, added up on one reader of rank 0.
        self.start = {"batches": 0, "points": {0: RestorePoint(skipped=skipped_in_all(points))} if rank == 0 else {}}
        self.position = self.start
        rest = " + ".join(f"{sum(u.size for u in c.units)}" for c in carries)
        return (f"{self.stream.key}: data positions of {old} dealt to {new}: the rest of the epoch, {rest} samples, "
                f"is read first, in equal shares; the readers' own epochs start at epoch "
                f"{', '.join(str(c.base) for c in carries)}")

    def _check_shards(self, state: dict) -> None:
        if state["shards"] not in (self.shards, self.shards_by_path):
            raise UserError(
                f"{self.stream.key}: the shard list (or mixture) differs from the one the checkpoint was "
                f"written with; resume with the same shards, or start a new run"
            )

    def load_state_dict(self, state: dict) -> None:
        if state["readers"] != self.readers:
            raise UserError(
                f"{self.stream.key}: the checkpoint's loader had {state['readers']} readers per rank and "
                f"this one has {self.readers}; resume with the same data.num_workers"
            )
        self._check_shards(state)
        self.start = {"batches": state["batches"], "points": _restore_points(state)}
        self.position = self.start
        self.stream.carry = _carry(state, len(self.stream.sources))


def _listing_hash(sources: list[Source], name: Callable[[str], str]) -> str:
    listing = "\n".join(f"{s.key} {s.weight} {' '.join(map(name, s.shards))}" for s in sources)
    return hashlib.sha256(listing.encode()).hexdigest()


def _carry(state: dict, sources: int) -> list[Carry]:
    """The carry a saved loader state read under (none before elastic resume existed)."""
    saved = state.get("carry")
    return [Carry.from_json(c) for c in saved] if saved else [Carry()] * sources


def _restore_points(state: dict) -> dict[int, RestorePoint]:
    # JSON round trips turn reader keys into strings and points into lists.
    return {int(reader): _restore_point(point) for reader, point in state["points"].items()}


def _restore_point(saved: tuple | list) -> RestorePoint:
    point = RestorePoint(*saved)  # lists after a JSON round trip
    located = tuple(None if at is None else tuple(at) for at in point.located)
    return point._replace(drawn=tuple(point.drawn), located=located)
