"""Bad samples and broken shards, one builder per skip reason of mmscale.data.schema.SKIP_REASONS.

Shared by the loader's tests (tests/data/test_loader.py) and the corrupt-data reliability
scenario (tests/reliability/test_bad_data.py). The samples fit the tiny test recipes
(32-px images, data.max_seq_len=96) and any tokenizer with an `<image>` token.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import webdataset as wds
from PIL import Image

# The reasons a single sample is skipped for; the other two of SKIP_REASONS concern whole shards.
SAMPLE_REASONS = (
    "non_utf8", "bad_json", "schema", "placeholder_mismatch", "missing_image", "bad_image", "too_long",
)


def png(size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def conversation(images: int = 1, answer: str = "red") -> dict:
    return {"messages": [{"role": "user", "content": "<image>" * images + "\nWhat colour?"},
                         {"role": "assistant", "content": answer}]}


def good_sample(key: str) -> dict:
    """A valid sample: one red square and a question about it."""
    return {"__key__": key, "json": {"id": key, "images": ["img0.png"], **conversation()}, "img0.png": png()}


def bad_sample(reason: str, key: str) -> dict:
    """A sample the loader skips for `reason` (one of SAMPLE_REASONS). `too_long` is too long
    for data.max_seq_len=96 and is skipped only with data.overlong=skip (else truncated)."""
    ok = {"id": key, "images": ["img0.png"], **conversation()}
    members = {
        "non_utf8": {"json": b'{"id": "\xff\xfe"}', "img0.png": png()},
        "bad_json": {"json": b"{oops", "img0.png": png()},
        "schema": {"json": {**ok, "images": "img0.png"}, "img0.png": png()},
        "placeholder_mismatch": {"json": {**ok, **conversation(images=2)}, "img0.png": png()},
        "missing_image": {"json": ok},
        "bad_image": {"json": ok, "img0.png": b"\x89PNG but not really"},
        "too_long": {"json": {**ok, **conversation(answer="very long " * 80)}, "img0.png": png()},
    }[reason]
    return {"__key__": key, **members}


def write_shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def write_unreadable_shard(path: Path) -> None:
    """A .tar that is not a tar at all (counted as unreadable_shard)."""
    path.write_bytes(b"not a tar at all" * 64)


def write_truncated_shard(path: Path, samples: list[dict]) -> None:
    """`samples` as a tar cut inside the first member of the last sample (counted as truncated_shard).

    Inside the first member: a cut after some of a sample's members would also yield that
    partial sample, counted under its own reason (missing json or image). The samples before
    the last one stay readable.
    """
    write_shard(path, samples)
    with tarfile.open(path) as tar:
        first_of_last = next(m for m in tar.getmembers() if m.name.startswith(f"{samples[-1]['__key__']}."))
        cut = first_of_last.offset_data + 10
    path.write_bytes(path.read_bytes()[:cut])


def readable_samples(path: Path) -> int:
    """How many samples webdataset reads from a (possibly broken) shard before it gives up."""
    pipeline = wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples(handler=wds.ignore_and_continue))
    return len(list(pipeline))
