"""Elastic resume of the data stream: the rest of an epoch dealt to another number of readers."""

from __future__ import annotations

import zlib
from itertools import islice

import pytest
import torch

from mmscale.data.elastic import Carry, cut, rest_of_epochs
from mmscale.data.packing import Packer
from mmscale.data.stream import EncodedStream, RestorePoint, ShardStream, Source, _mark
from tests.helpers.shards import good_shards

SHARDS, PER_SHARD = 12, 8  # 96 samples: 3 shards for each of 4 readers, 4 for each of 3


def _stream(shards: list[str], mixture: bool = False) -> ShardStream:
    counts = [PER_SHARD] * len(shards)
    if not mixture:
        return ShardStream([Source("data.train[0]", shards, 1.0, counts)], seed=3, shuffle_buffer=5, shuffle=True)
    half = len(shards) // 2
    sources = [Source("data.train[0]", shards[:half], 2.0, counts[:half]),
               Source("data.train[1]", shards[half:], 1.0, counts[half:])]
    return ShardStream(sources, seed=3, shuffle_buffer=5, shuffle=True)


def _read(stream: ShardStream, world: int, readers: int, taken: dict[tuple[int, int], int],
          points: list[dict[int, RestorePoint]] | None = None) -> tuple[list[str], list[dict[int, RestorePoint]]]:
    """The ids each reader delivers taking `taken[(rank, reader)]` samples from its `points` (or
    the start), and the points after them."""
    ids, after = [], [{} for _ in range(world)]
    for rank in range(world):
        for reader in range(readers):
            start = (points[rank].get(reader) if points else None) or RestorePoint()
            samples = stream.reader_samples(rank, world, reader, readers, start.position, start.drawn,
                                            located=start.located)
            point = start
            for position, sample in enumerate(islice(samples, taken.get((rank, reader), 0)), start.position + 1):
                ids.append(sample["__key__"])
                drawn, located = sample["__drawn__"]
                point = RestorePoint(position, 0, {}, _mark(sample), drawn, located)
            if point.position:
                after[rank][reader] = point
    return ids, after


def _epoch(shards: list[str]) -> list[str]:
    return sorted(f"s{i}k{j}" for i in range(len(shards)) for j in range(PER_SHARD))


def test_the_rest_of_an_epoch_is_dealt_evenly_and_read_once(tmp_path):
    """2 ranks x 2 readers stop unevenly inside the epoch; 3 readers, then 1 x 3 after a second
    change, deliver the rest: every sample of the epoch once, in shares within a sample."""
    shards = good_shards(tmp_path / "s", [PER_SHARD] * SHARDS)
    stream = _stream(shards)
    first, points = _read(stream, 2, 2, {(0, 0): 11, (0, 1): 3, (1, 0): 0, (1, 1): 24})
    assert len(set(first)) == len(first) == 38
    stream.carry = rest_of_epochs(stream, 2, 2, points, [Carry()])
    shares = [sum(u.size for u in stream.carry[0].share(i, 3)) for i in range(3)]
    assert stream.carry[0].base == 1 and shares == [19, 19, 20]
    second, points = _read(stream, 3, 1, {(0, 0): 10, (1, 0): 2, (2, 0): 20})
    # A second change before the rest is read: what is left of it, dealt again.
    stream.carry = rest_of_epochs(stream, 3, 1, points, stream.carry)
    assert stream.carry[0].base == 1 and sum(u.size for u in stream.carry[0].units) == 26
    shares = [sum(u.size for u in stream.carry[0].share(i, 3)) for i in range(3)]
    third, _ = _read(stream, 1, 3, {(0, r): n for r, n in enumerate(shares)})
    assert sorted(first + second + third) == _epoch(shards)
    # After its share, a reader goes on with its own next epoch (32 samples on 3 readers).
    after, _ = _read(stream, 1, 3, {(0, 0): shares[0] + 32})
    assert after[shares[0]:] == _read(_stream(shards), 1, 3, {(0, 0): 64})[0][32:]


def test_a_reader_past_the_epoch_pulls_the_others_whole_next_epoch_in(tmp_path):
    """One reader already in epoch 1: the rest runs to the end of epoch 1 for every reader, so
    both epochs are delivered once each."""
    shards = good_shards(tmp_path / "s", [PER_SHARD] * SHARDS)
    stream = _stream(shards)
    first, points = _read(stream, 2, 2, {(0, 0): 30, (0, 1): 5, (1, 0): 24, (1, 1): 0})
    stream.carry = rest_of_epochs(stream, 2, 2, points, [Carry()])
    assert stream.carry[0].base == 2
    rest = sum(u.size for u in stream.carry[0].units)
    assert rest == 2 * 96 - 59
    second, _ = _read(stream, 3, 1, {(r, 0): sum(u.size for u in stream.carry[0].share(r, 3)) for r in range(3)})
    both = sorted(first + second)
    assert both == sorted(_epoch(shards) * 2)


def test_a_restore_inside_the_share_continues_exactly(tmp_path, caplog):
    """After an elastic start, checkpoints on the new readers resume bit-exactly, inside the
    share and past it, by seeking (no warning that the seek failed and the stream is read again)."""
    shards = good_shards(tmp_path / "s", [PER_SHARD] * SHARDS)
    stream = _stream(shards)
    _, points = _read(stream, 2, 2, {(0, 0): 7, (0, 1): 9, (1, 0): 4, (1, 1): 13})
    stream.carry = rest_of_epochs(stream, 2, 2, points, [Carry()])
    straight, _ = _read(stream, 1, 3, {(0, 1): 40})
    for stop in (5, 21, 30):  # inside the share (21 samples), at its end, past it
        head, mid = _read(stream, 1, 3, {(0, 1): stop})
        tail = [s["__key__"] for s in islice(stream._restored(mid[0][1], 0, 1, 1, 3), 40 - stop)]
        assert head + tail == straight
    assert "reading the stream again" not in caplog.text


def test_a_mixture_deals_each_source_on_its_own(tmp_path):
    shards = good_shards(tmp_path / "s", [PER_SHARD] * SHARDS)
    stream = _stream(shards, mixture=True)
    first, points = _read(stream, 2, 2, {(0, 0): 6, (0, 1): 9, (1, 0): 2, (1, 1): 5})
    stream.carry = rest_of_epochs(stream, 2, 2, points, [Carry(), Carry()])
    left = [sum(u.size for u in c.units) for c in stream.carry]
    assert sum(left) == 96 - 22 and all(c.base == 1 for c in stream.carry)
    # Drawn by weight, each source's share is read before its next epoch.
    shares = {r: [sum(u.size for u in c.share(r, 3)) for c in stream.carry] for r in range(3)}
    seen = list(first)
    for r in range(3):
        samples = stream.reader_samples(r, 3, 0, 1)
        counts = [0, 0]
        while counts != shares[r]:
            sample = next(samples)
            i = int(sample["__url__"].split("-")[-1][:6]) >= SHARDS // 2
            if counts[i] < shares[r][i]:
                seen.append(sample["__key__"])
            counts[i] = min(counts[i] + 1, shares[r][i])
    assert sorted(seen) == _epoch(shards)


@pytest.mark.parametrize("start, stop", [(0, 4), (3, 9), (7, 8), (0, 12)])
def test_cut_takes_a_slice_of_the_concatenation(start, stop):
    from mmscale.data.elastic import Unit

    units = (Unit(0, 0, 1, 0, 1, 0, 2, 5), Unit(0, 0, 1, 0, 1, 1, 0, 5), Unit(0, 0, 1, 0, 1, 2, 0, 4))
    flat = [(u.block, i) for u in units for i in range(u.begin, u.end)]
    assert [(u.block, i) for u in cut(units, start, stop) for i in range(u.begin, u.end)] == flat[start:stop]


def test_shards_without_counts_are_refused_naming_the_layout_to_resume_on(tmp_path):
    from mmscale.data.stream import StatefulLoader
    from mmscale.errors import UserError

    shards = good_shards(tmp_path / "s", [PER_SHARD] * SHARDS, manifest=False)
    stream = ShardStream([Source("data.train[0]", shards, 1.0, None)], seed=3, shuffle_buffer=5, shuffle=True)
    loader = StatefulLoader(stream, dict, None, num_workers=2, batch_size=1)
    saved = [{"readers": 2, "shards": loader.shards, "batches": 3, "points": {}, "carry": [Carry()]}] * 2
    with pytest.raises(UserError, match="has no manifest.json .*: resume on 2 ranks x 2 readers as before"):
        loader.resume(saved, 0, 1)
    assert loader.resume(saved, 1, 2) is None  # the same layout: restored exactly, nothing to say


def _encode(raw: dict) -> dict:
    """3 to 12 tokens (by its key), named by its key and the epoch its reader found it in (-1: a share)."""
    n = 3 + zlib.crc32(raw["__key__"].encode()) % 10
    return {"input_ids": torch.zeros(n, dtype=torch.long), "labels": torch.zeros(n, dtype=torch.long),
            "samples": [(f"{raw['__key__']}@{raw['__from__'][1]}", n, ())]}


def _packed(stream: ShardStream, monkeypatch, world: int, rows: list[int], points=None) -> tuple[list[str], list]:
    """The sample ids of the first `rows[r]` packed rows of each rank r (one reader each), from
    `points`, and the points after them."""
    ids, after = [], []
    for rank, count in enumerate(rows):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        stream.restore = dict(points[rank]) if points else {}
        taken = list(islice(EncodedStream(stream, _encode, Packer(24, 6)), count))
        ids += [s[0] for row in taken for s in row["samples"]]
        after.append({0: taken[-1]["reader"][1]})
    return ids, after


def test_packed_readers_hand_on_the_rest_of_their_blocks(tmp_path, monkeypatch):
    """3 packed readers stop inside their packing blocks; 2, then 1, go on: the samples of rows
    already trained are passed over, the rest of each block is read, and every sample of the
    epoch is trained once."""
    shards = good_shards(tmp_path / "s", [PER_SHARD] * SHARDS)
    stream = _stream(shards)
    first, points = _packed(stream, monkeypatch, 3, [5, 2, 7])
    assert any(p[0].emitted and p[0].done for p in points)  # inside a block: some of its rows trained
    stream.carry = rest_of_epochs(stream, 3, 1, points, [Carry()])
    assert any(u.drop for u in stream.carry[0].units)
    second, points = _packed(stream, monkeypatch, 2, [4, 3])
    assert all(i.endswith("@-1") for i in second)
    stream.carry = rest_of_epochs(stream, 2, 1, points, stream.carry)
    third, _ = _packed(stream, monkeypatch, 1, [200])
    assert all(i.endswith("@0") for i in first)
    # The last reader's share is read first, then its own epochs from epoch 1 on.
    trained = [i.split("@")[0] for i in first + second + third if i.endswith(("@0", "@-1"))]
    assert sorted(trained) == _epoch(shards)


def test_packed_readers_still_in_their_first_block_hand_on_its_rest(tmp_path, monkeypatch):
    """Each reader handed out one row of its first packing block (its position: the stream's start):
    the new readers read the rest of the epoch, passing over the samples of those rows."""
    shards = good_shards(tmp_path / "s", [PER_SHARD] * SHARDS)
    stream = _stream(shards)
    first, points = _packed(stream, monkeypatch, 3, [1, 1, 1])
    assert all(p[0].position == 0 and p[0].done for p in points)
    stream.carry = rest_of_epochs(stream, 3, 1, points, [Carry()])
    second, _ = _packed(stream, monkeypatch, 2, [200, 200])
    trained = [i.split("@")[0] for i in first + second if i.endswith(("@0", "@-1"))]
    assert sorted(trained) == _epoch(shards)


def test_a_packed_block_that_reaches_into_the_next_epoch_hands_that_on_too(tmp_path, monkeypatch):
    """A nested change where a reader's block starts inside its share and its rows handed out reach
    its own next epoch: those samples are not trained again there."""
    shards = good_shards(tmp_path / "s", [PER_SHARD] * SHARDS)
    stream = _stream(shards)
    _, points = _packed(stream, monkeypatch, 3, [5, 2, 7])
    stream.carry = carry = rest_of_epochs(stream, 3, 1, points, [Carry()])
    share = sum(u.size for u in carry[0].share(0, 2))
    for rows in range(1, 40):  # the first stop whose block starts in the share and hands out epoch-1 rows
        stream.carry = carry
        second, points = _packed(stream, monkeypatch, 2, [rows, 1])
        point = points[0][0]
        if (point.drawn[0] if point.position else 0) <= share and any(e >= 1 for _, e, _ in point.done):
            break
    else:
        pytest.fail("no stop of this layout has a block straddling the share's end")
    stream.carry = rest_of_epochs(stream, 2, 1, points, carry)
    third, _ = _packed(stream, monkeypatch, 1, [300])
    epoch_1 = [i for i in second + third if i.endswith("@1")]
    assert len(epoch_1) == len(set(epoch_1))


def test_counts_that_do_not_place_a_reader_where_it_read_are_refused(tmp_path):
    from mmscale.data.stream import StatefulLoader
    from mmscale.errors import UserError

    shards = good_shards(tmp_path / "s", [PER_SHARD] * SHARDS)
    stream = _stream(shards)
    _, points = _read(stream, 2, 2, {(0, 0): 7, (0, 1): 9, (1, 0): 4, (1, 1): 13})
    moved = [dict(p) for p in points]
    moved[1][1] = moved[1][1]._replace(located=((1, 0),))  # as if a shard had held fewer samples
    with pytest.raises(UserError, match=r"rank 1 reader 1 .* read its sample 12 at \(\(1, 0\),\)|where the shards' counts"):
        rest_of_epochs(stream, 2, 2, moved, [Carry()])
    # A shard that could not be read whole: the counts of its manifest are not what was read.
    loader = StatefulLoader(stream, dict, None, num_workers=1, batch_size=1)
    states = [{"readers": 2, "shards": loader.shards, "batches": 2, "carry": [Carry()],
               "points": {r: p._replace(skipped={"truncated_shard": 1} if (rank, r) == (0, 0) else {})
                          for r, p in rank_points.items()}} for rank, rank_points in enumerate(points)]
    with pytest.raises(UserError, match=r"met \{'truncated_shard': 1\}.*resume on 2 ranks x 2 readers"):
        loader.resume(states, 0, 1)
