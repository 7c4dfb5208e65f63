"""Streaming WebDataset loader: shards split by rank and worker, seeded shuffles, padded batches.

`build_dataloader` is the entry point. Shards are read by `webdataset` (local paths,
brace patterns, `pipe:` commands and fsspec URLs alike); nothing assumes a disk shared
by all ranks.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import braceexpand
import torch
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from transformers import PreTrainedTokenizerBase

from mmscale.config.schema import DataConfig, VisionConfig
from mmscale.data.images import image_to_tensor
from mmscale.data.schema import SampleError, validate_sample
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


def check_readers(shards: list[str], key: str, world: int, workers: int) -> None:
    """Every reader (rank x worker) needs a shard of its own, or it would have nothing to read."""
    readers = world * max(1, workers)
    if len(shards) < readers:
        raise UserError(
            f"{key}: {len(shards)} shards for {world} ranks x {max(1, workers)} workers; every reader "
            f"needs a shard: write at least {readers} shards or lower data.num_workers"
        )


def _unreadable_shard(error: Exception) -> bool:
    # webdataset appends the shard URL to the error's args; name it, rather than a bare tarfile error.
    url = next((a for a in reversed(error.args) if isinstance(a, str)), "?")
    raise SampleError(f"shard {url} cannot be read as a tar file ({error.args[0]}); rebuild or remove it") from error


class ShardStream(IterableDataset):
    """Raw samples from shards, epoch after epoch, from a position that can be restored.

    Each epoch orders the shards by a seeded shuffle, gives rank r the shards r, r+world, ...
    and splits those among its readers the same way, then shuffles samples in a buffer
    seeded by (seed, epoch, rank, reader): a reader's stream is a pure function of those,
    so a position in it (samples consumed) is its whole state.

    Readers are logical workers: DataLoader worker p plays reader (p + rotation) % workers,
    so that after a restore the reader whose batch is due comes first (DataLoader always
    starts with worker 0 and then takes batches from its workers in turn).
    """

    def __init__(self, shards: list[str], seed: int, shuffle_buffer: int, shuffle: bool, key: str):
        super().__init__()
        self.shards, self.seed, self.shuffle_buffer, self.shuffle, self.key = shards, seed, shuffle_buffer, shuffle, key
        self.consumed: dict[int, int] = {}  # reader -> samples it has already delivered
        self.rotation = 0

    def reader_samples(self, rank: int, world: int, reader: int, readers: int) -> Iterator[dict]:
        """The endless sample stream of one reader of one rank, from its beginning."""
        for epoch in itertools.count():
            order = list(self.shards)
            if self.shuffle:
                random.Random(f"{self.seed}-shards-{epoch}").shuffle(order)
            mine = order[rank::world][reader::readers]
            samples = wds.tarfile_to_samples(handler=_unreadable_shard)(iter([{"url": url} for url in mine]))
            if self.shuffle:
                seed = f"{self.seed}-samples-{epoch}-{rank}-{reader}"
                samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=seed)(samples)
            yield from samples

    def __iter__(self) -> Iterator[dict]:
        rank, world, worker, num_workers = wds.utils.pytorch_worker_info()
        check_readers(self.shards, self.key, world, num_workers)
        reader = (worker + self.rotation) % num_workers
        start = self.consumed.get(reader, 0)
        # Skipping re-reads the tar members but decodes nothing: cheap next to training on them.
        samples = itertools.islice(self.reader_samples(rank, world, reader, num_workers), start, None)
        for position, sample in enumerate(samples, start=start + 1):
            sample["__reader__"] = (reader, position)
            yield sample


@dataclass(frozen=True)
class SampleEncoder:
    """Raw WebDataset sample -> token ids, labels and image tensors."""

    tokenizer: PreTrainedTokenizerBase
    vision: VisionConfig
    image_token_count: int
    max_seq_len: int

    def __call__(self, sample: dict) -> dict:
        where = f"shard {sample.get('__url__')} sample {sample.get('__key__')}"
        if "json" not in sample:
            raise SampleError(f"{where}: no .json member")
        try:
            meta = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SampleError(f"{where}: the .json member is not valid JSON ({e})") from e
        validate_sample(meta, where)
        images = []
        for name in meta["images"]:
            if name not in sample:
                raise SampleError(
                    f"{where}: image member '{name}' listed in the JSON is missing from the shard "
                    f"(members present: {sorted(k for k in sample if not k.startswith('__'))}; webdataset "
                    f"lowercases extensions and splits the key at its first dot)"
                )
            try:
                images.append(image_to_tensor(sample[name], self.vision))
            except Exception as e:  # Pillow signals bad bytes with many types (OSError, ValueError, ...)
                raise SampleError(f"{where}: image '{name}' cannot be decoded ({e})") from e
        input_ids, labels = encode_conversation(
            self.tokenizer, meta["messages"], self.image_token_count, self.max_seq_len, where
        )
        return {
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            "pixel_values": torch.stack(images) if images else torch.zeros(0, 3, self.vision.image_size, self.vision.image_size),
            "reader": sample["__reader__"],
        }


class _Encoded(IterableDataset):
    def __init__(self, stream: ShardStream, encode: SampleEncoder):
        super().__init__()
        self.stream, self.encode = stream, encode

    def __iter__(self) -> Iterator[dict]:
        return map(self.encode, self.stream)


@dataclass(frozen=True)
class Collator:
    """Right-pads a list of encoded samples into one batch; images of all samples are concatenated.

    `meta` is bookkeeping, not model input: `lengths` (real tokens per row; a pad id may
    also be a real token, for tokenizers that pad with eos) and `reader`, the reader that
    made the batch and its position after it.
    """

    pad_id: int

    def __call__(self, samples: list[dict]) -> dict:
        longest = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
        for i, s in enumerate(samples):
            input_ids[i, : len(s["input_ids"])] = s["input_ids"]
            labels[i, : len(s["labels"])] = s["labels"]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
            "meta": {"lengths": torch.tensor([len(s["input_ids"]) for s in samples]), "reader": samples[-1]["reader"]},
        }


class StatefulLoader:
    """A DataLoader over a ShardStream whose position is saved and restored exactly.

    Every iteration starts at the loaded position (the beginning, unless `load_state_dict`
    was called), so validation reads the same batches each time; `state_dict` gives the
    position after the last batch handed out. Restoring that position makes the next
    batches bitwise equal to those of an uninterrupted run.
    """

    def __init__(self, stream: ShardStream, encode: SampleEncoder, **loader_args):
        self.stream, self.encode, self.loader_args = stream, encode, loader_args
        self.readers = max(1, loader_args["num_workers"])
        self.start = {"batches": 0, "consumed": {}}
        self.position = self.start

    def __iter__(self) -> Iterator[dict]:
        position = {"batches": self.start["batches"], "consumed": dict(self.start["consumed"])}
        self.position = position
        # Workers copy the stream when they start, so the start is set on it before they do.
        self.stream.consumed = dict(position["consumed"])
        self.stream.rotation = position["batches"] % self.readers
        for batch in DataLoader(_Encoded(self.stream, self.encode), **self.loader_args):
            reader, after = batch["meta"].pop("reader")
            position["consumed"][int(reader)] = int(after)
            position["batches"] += 1
            yield batch

    def state_dict(self) -> dict:
        return {"readers": self.readers, "batches": self.position["batches"], "consumed": dict(self.position["consumed"])}

    def load_state_dict(self, state: dict) -> None:
        if state["readers"] != self.readers:
            raise UserError(
                f"{self.stream.key}: the checkpoint's loader had {state['readers']} readers per rank and "
                f"this one has {self.readers}; resume with the same data.num_workers"
            )
        # JSON and torch.save round trips may turn the reader keys into strings.
        self.start = {"batches": state["batches"], "consumed": {int(k): v for k, v in state["consumed"].items()}}
        self.position = self.start


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
    key = f"data.{split}"
    shards = resolve_shards(getattr(data, split), key)
    workers = data.num_workers if split == "train" else 0  # validation is short: spare the worker start-up
    check_readers(shards, key, dist.get_world_size() if dist.is_initialized() else 1, workers)
    stream = ShardStream(shards, seed, data.shuffle_buffer, shuffle=split == "train", key=key)
    encode = SampleEncoder(tokenizer, vision, image_token_count, data.max_seq_len)
    return StatefulLoader(
        stream,
        encode,
        batch_size=batch_size,
        collate_fn=Collator(tokenizer.pad_token_id),
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )
