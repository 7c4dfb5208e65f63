"""8. Resume: the time to restore a reader's position in a long stream, near its start and near its end.

A synthetic stream of 1,000,000 small samples (one JSON member each, as webdataset writes
them) in 128 shards (--smoke: 20,000 in 10), read by one reader with the loader's default
shuffle buffer (1,000), is restored near its start (early in the first shard, and late in it)
and near its end (late in the last shard), two ways:

- seeking, with the shards' sample counts (what `mmscale train` does when the shards have a
  manifest, as `mmscale shards build` and the demo write): the restore opens the shard holding
  the position, finds its shuffle block's first sample through the tar headers alone, and reads
  from there;
- reading the stream again up to the position (what it does for shards without a manifest,
  and what every resume did before): the restore reads every sample before it.

Time: from the restore to the first sample after it (the sample the checkpoint names is
checked on the way), median of 3 for seeking, once for reading again. Both restores check
the same sample there, so they agree on where the stream is.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import webdataset as wds

from benchmarks.common import Context
from benchmarks.report import Table
from mmscale.data.stream import RestorePoint, ShardStream, Source

BUFFER = 1000  # data.shuffle_buffer's default


def run(ctx: Context) -> list[Table]:
    samples, shards = (20_000, 10) if ctx.smoke else (1_000_000, 128)
    start = time.perf_counter()
    urls = write_stream(ctx.scratch / "resume", samples, shards)
    written_s = time.perf_counter() - start
    counts = [samples // shards] * shards
    per_shard = samples // shards
    late = per_shard - per_shard % BUFFER - BUFFER // 2  # in the last whole shuffle block of the first shard
    rows = []
    for name, position in (("near the start", BUFFER + 1), ("near the start", late), ("near the end", samples - 500)):
        point = point_before(urls, counts, position)
        seek = statistics.median(restore_seconds(urls, counts, point) for _ in range(3))
        again = restore_seconds(urls, None, point)
        block = position - position % BUFFER  # where the restore starts reading: its shuffle block
        rows.append([f"{name}: sample {position:,} (its block from sample {block % per_shard:,} of its shard)",
                     seek, again, again / seek])
    return [Table(
        "8. Resume time of a reader's position: seeking with the shards' counts vs reading the stream again",
        ["position", "seek s", "read again s", "read again / seek"], rows,
        [f"{samples:,} samples of about 100 bytes in {shards} shards of {per_shard:,} ({written_s:.0f} s to write), one "
         f"reader, shuffle buffer {BUFFER:,}; seek: median of 3, read again: once.",
         f"Seeking at the stream's end takes {rows[2][1] / rows[1][1]:.2f}x as long as at the same place of the first "
         f"shard, {rows[2][1] / rows[0][1]:.2f}x as long as early in it: a restore reads the tar headers of its shard "
         "up to its shuffle block, then the block, wherever the position is in the run."],
    )]


def write_stream(folder: Path, samples: int, shards: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = samples // shards
    with wds.ShardWriter(str(folder / "stream-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(per_shard * shards):
            sink.write({"__key__": f"{i:09d}", "json": json.dumps({"id": i, "text": "x" * 64}).encode()})
    return sorted(str(p) for p in folder.glob("stream-*.tar"))


def _stream(urls: list[str], counts: list[int] | None) -> ShardStream:
    return ShardStream([Source("data.train", urls, counts=counts)], seed=0, shuffle_buffer=BUFFER, shuffle=True)


def point_before(urls: list[str], counts: list[int], position: int) -> RestorePoint:
    """The restore point after the sample before `position` (what a checkpoint there holds), found
    by seeking; reading the stream again checks it independently (`restore_seconds` without counts)."""
    stream = _stream(urls, counts)
    at = stream.locate(stream.sources[0], 0, 1, 0, 1, position - 1)
    sample = next(stream.reader_samples(0, 1, 0, 1, position - 1, (position - 1,), None, (at,)))
    return RestorePoint(position, mark=f"{sample['__url__']}#{sample['__key__']}", drawn=(position,), located=(at,))


def restore_seconds(urls: list[str], counts: list[int] | None, point: RestorePoint) -> float:
    stream = _stream(urls, counts)
    stream.restore = {0: point}
    start = time.perf_counter()
    next(iter(stream))
    return time.perf_counter() - start
