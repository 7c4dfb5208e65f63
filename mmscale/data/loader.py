"""Streaming WebDataset loader: shards split by rank and worker, seeded shuffles, padded batches.

`build_dataloader` is the entry point. Shards are read by `webdataset` (local paths,
brace patterns, `pipe:` commands and fsspec URLs alike); nothing assumes a disk shared
by all ranks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from mmscale.config.schema import DataConfig, VisionConfig
from mmscale.data.images import image_to_tensor
from mmscale.data.packing import Packer
from mmscale.data.schema import SampleError, validate_sample
from mmscale.data.stream import ShardStream, Source, StatefulLoader, check_readers
from mmscale.data.tokenizer import IGNORE_INDEX, encode_conversation
from mmscale.errors import UserError


def resolve_shards(spec: str, key: str) -> list[str]:
    """Shard URLs for a recipe entry: a folder of .tar files, a brace pattern, or URLs.

    Local folders are checked here, before any model is built, so a typo costs seconds.
    """
    if "://" in spec or spec.startswith("pipe:"):
        return list(braceexpand.braceexpand(spec))
    path = Path(spec)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise UserError(
                f"{key}: folder {path} holds no .tar shards; build them first "
                f"(for the demo: `mmscale shards demo --out {path.parent}`)"
            )
        return shards
    shards = list(braceexpand.braceexpand(spec))
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise UserError(
            f"{key}: {missing[0]} does not exist ({len(missing)} of {len(shards)} shards missing); "
            f"point {key} at a folder of .tar shards or a brace pattern of existing files"
        )
    return shards


def parse_sample(sample: dict, where: str) -> tuple[dict, list[bytes]]:
    """A raw WebDataset sample's JSON (checked against the schema) and its images' bytes, in order."""
    if "json" not in sample:
        raise SampleError(f"{where}: no .json member")
    try:
        meta = json.loads(sample["json"].decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SampleError(f"{where}: the .json member is not UTF-8 ({e})", "non_utf8") from e
    except json.JSONDecodeError as e:
        raise SampleError(f"{where}: the .json member is not valid JSON ({e})", "bad_json") from e
    validate_sample(meta, where)
    for name in meta["images"]:
        if name not in sample:
            raise SampleError(
                f"{where}: image member '{name}' listed in the JSON is missing from the shard "
                f"(members present: {sorted(k for k in sample if not k.startswith('__'))}; webdataset "
                f"lowercases extensions and splits the key at its first dot)",
                "missing_image",
            )
    return meta, [sample[name] for name in meta["images"]]


@dataclass(frozen=True)
class SampleEncoder:
    """Raw WebDataset sample -> token ids, labels and image tensors."""

    tokenizer: PreTrainedTokenizerBase
    vision: VisionConfig
    image_token_count: int
    max_seq_len: int
    truncate: bool

    def __call__(self, sample: dict) -> dict:
        where = f"shard {sample.get('__url__')} sample {sample.get('__key__')}"
        meta, encoded_images = parse_sample(sample, where)
        input_ids, labels, kept = encode_conversation(
            self.tokenizer, meta["messages"], self.image_token_count, self.max_seq_len, where, self.truncate
        )
        images = []
        for name, data in zip(meta["images"][:kept], encoded_images):  # truncation may drop the last images
            try:
                images.append(image_to_tensor(data, self.vision))
            except Exception as e:  # Pillow signals bad bytes with many types (OSError, ValueError, ...)
                raise SampleError(f"{where}: image '{name}' cannot be decoded ({e})", "bad_image") from e
        return {
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            "pixel_values": torch.stack(images) if images else torch.zeros(0, 3, self.vision.image_size, self.vision.image_size),
        }


@dataclass(frozen=True)
class Collator:
    """Right-pads a list of encoded samples into one batch; images of all samples are concatenated.

    Rows are single samples or packed rows (with position_ids and segment_ids). `meta` is
    bookkeeping, not model input: `lengths` (real tokens per row; a pad id may also be a
    real token, for tokenizers that pad with eos), `slots` (tokens including padding) and
    `reader`, the restore point of the reader that made the batch.
    """

    pad_id: int

    def __call__(self, rows: list[dict]) -> dict:
        longest = max(len(r["input_ids"]) for r in rows)
        # Padding values: pad id / no label, and for packed rows position 0 in a segment 0
        # of their own, which no real token attends to.
        fill = {"input_ids": self.pad_id, "labels": IGNORE_INDEX, "position_ids": 0, "segment_ids": 0}
        batch = {}
        for key in [k for k in fill if k in rows[0]]:
            batch[key] = torch.full((len(rows), longest), fill[key], dtype=torch.long)
            for i, row in enumerate(rows):
                batch[key][i, : len(row[key])] = row[key]
        batch["pixel_values"] = torch.cat([r["pixel_values"] for r in rows])
        lengths = torch.tensor([len(r["input_ids"]) for r in rows])
        batch["meta"] = {"lengths": lengths, "slots": len(rows) * longest, "reader": rows[-1]["reader"]}
        return batch


def build_dataloader(
    data: DataConfig,
    vision: VisionConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    split: str,
    batch_size: int,
    image_token_count: int,
    seed: int,
) -> StatefulLoader:
    """An endless loader over `data.train` (shuffled) or `data.val` (in order) for this rank.

    Checks here, before any batch is read, that every rank and worker will have shards.
    """
    spec = getattr(data, split)
    entries = [(f"data.{split}", spec, 1.0)] if isinstance(spec, str) else [
        (f"data.{split}[{i}]", source.shards, source.weight) for i, source in enumerate(spec)
    ]
    sources = [Source(key, resolve_shards(shards, key), weight) for key, shards, weight in entries]
    workers = data.num_workers if split == "train" else 0  # validation is short: spare the worker start-up
    for source in sources:
        check_readers(source.shards, source.key, dist.get_world_size() if dist.is_initialized() else 1, workers)
    stream = ShardStream(sources, seed, data.shuffle_buffer, shuffle=split == "train", strict=data.strict)
    encode = SampleEncoder(tokenizer, vision, image_token_count, data.max_seq_len, data.overlong == "truncate")
    packer = Packer(data.pack_len or data.max_seq_len, data.pack_block) if data.pack else None
    return StatefulLoader(
        stream,
        encode,
        packer,
        batch_size=batch_size,
        collate_fn=Collator(tokenizer.pad_token_id),
        num_workers=workers,
        prefetch_factor=4 if workers else None,
    )
