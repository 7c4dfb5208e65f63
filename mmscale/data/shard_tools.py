"""`mmscale shards inspect` and `mmscale shards validate`: look into shards without training."""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import webdataset as wds
from PIL import Image

from mmscale.data.encode import parse_sample
from mmscale.data.schema import SampleError
from mmscale.data.stream import shard_error


@dataclass(frozen=True)
class Problem:
    shard: str
    key: str  # "" when the shard itself cannot be read further
    reason: str
    message: str


def _samples(shard: str, problems: list[Problem]) -> Iterator[dict]:
    def on_error(error: Exception) -> bool:
        problem = shard_error(error)
        if problem is not None:
            problems.append(Problem(shard, "", problem.reason, str(problem)))
        return True

    yield from wds.DataPipeline(wds.SimpleShardList([shard]), wds.tarfile_to_samples(handler=on_error))


def validate_shards(shards: list[str]) -> tuple[int, list[Problem]]:
    """Read every member of every shard; returns (good samples, every problem with shard and key)."""
    problems: list[Problem] = []
    good = 0
    for shard in shards:
        for sample in _samples(shard, problems):
            where = f"shard {shard} sample {sample['__key__']}"
            try:
                meta, images = parse_sample(sample, where)
                for name, data in zip(meta["images"], images):
                    try:
                        with Image.open(io.BytesIO(data)) as img:
                            img.load()
                    except Exception as e:  # Pillow signals bad bytes with many types
                        raise SampleError(f"{where}: image '{name}' does not decode ({e})", "bad_image") from e
            except SampleError as e:
                problems.append(Problem(shard, sample["__key__"], e.reason, str(e)))
                continue
            good += 1
    return good, problems


def inspect_shards(shards: list[str], show: int = 3) -> dict:
    """Counts per shard and source, image counts, a histogram of text lengths (characters), and a few samples."""
    problems: list[Problem] = []
    per_shard: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    images: Counter[int] = Counter()
    lengths: Counter[int] = Counter()  # bucket: text characters rounded down to a power of two
    examples = []
    for shard in shards:
        for sample in _samples(shard, problems):
            try:
                meta, _ = parse_sample(sample, f"shard {shard} sample {sample['__key__']}")
            except SampleError as e:
                problems.append(Problem(shard, sample["__key__"], e.reason, str(e)))
                continue
            per_shard[shard] += 1
            sources[meta.get("source", "?")] += 1
            images[len(meta["images"])] += 1
            chars = sum(len(m["content"]) for m in meta["messages"])
            lengths[1 << max(chars, 1).bit_length() - 1] += 1
            if len(examples) < show:
                examples.append({"shard": shard, "key": sample["__key__"], **meta})
    return {
        "samples": sum(per_shard.values()),
        "per_shard": dict(per_shard),
        "sources": dict(sources),
        "images_per_sample": dict(sorted(images.items())),
        "text_chars_histogram": {f">={k}": v for k, v in sorted(lengths.items())},
        "examples": examples,
        "problems": len(problems),
    }
