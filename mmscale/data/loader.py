"""Streaming WebDataset loader: shards split by rank and worker, seeded shuffles, padded batches.

`build_dataloader` is the entry point: it puts together the shard lists (shards.py), the
sample encoder (encode.py), packing (packing.py), the restorable stream (stream.py) and the
batch collator (collate.py). Shards are read by `webdataset` (local paths, brace patterns,
`pipe:` commands and fsspec URLs alike); nothing assumes a disk shared by all ranks.
"""

from __future__ import annotations

import signal

import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from mmscale.config.model import ModelConfig
from mmscale.config.schema import DataConfig
from mmscale.data.collate import collator_for
from mmscale.data.encode import SampleEncoder, image_transform
from mmscale.data.packing import Packer
from mmscale.data.readers import check_readers
from mmscale.data.shards import manifest_counts, resolve_shards
from mmscale.data.stream import ShardStream, Source, StatefulLoader


def leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`. PyTorch's workers die on a SIGTERM their parent did not send
    (and on SIGUSR2, by default); SLURM signals the whole process group, which would kill them
    under the step the main process is about to checkpoint. The main process stops them when done."""
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def build_dataloader(
    data: DataConfig,
    model: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    split: str,
    batch_size: int,
    seed: int,
    teacher_width: int | None = None,
) -> StatefulLoader:
    """An endless loader over `data.train` (shuffled) or `data.val` (in order) for this rank.

    Images are prepared for `model.arch`: squares of `model.vision` for decoder VLMs,
    tiles of `model.tiled_vision` (with cross-attention masks) for cross-attention VLMs.
    `teacher_width`: batches carry the shards' cached VIRAL teacher features of that width
    (checked first by `mmscale.alignment.cache.check_teacher_cache`).
    Checks here, before any batch is read, that every rank and worker will have shards.
    """
    spec = getattr(data, split)
    entries = [(f"data.{split}", spec, 1.0)] if isinstance(spec, str) else [
        (f"data.{split}[{i}]", source.shards, source.weight) for i, source in enumerate(spec)
    ]
    # The shards' sample counts (their manifests), for training only: they let a restore seek, and
    # show readers that would get unequal work. Validation reads the same batches from each rank's
    # start every time, so unequal readers change which samples those are, not how often any is trained on.
    listed = [(key, resolve_shards(shards, key), weight) for key, shards, weight in entries]
    sources = [Source(key, shards, weight, manifest_counts(shards) if split == "train" else None)
               for key, shards, weight in listed]
    workers = data.num_workers if split == "train" else 0  # validation is short: spare the worker start-up
    world = dist.get_world_size() if dist.is_initialized() else 1
    for source in sources:
        check_readers(source.shards, source.key, world, workers, source.counts)
    stream = ShardStream(sources, seed, data.shuffle_buffer, shuffle=split == "train", strict=data.strict)
    images, spans_of = image_transform(model, tokenizer)
    truncate = data.overlong == "truncate"
    encode = SampleEncoder(tokenizer, images, model.image_tokens, data.max_seq_len, truncate, spans_of, teacher_width)
    packer = Packer(data.pack_len or data.max_seq_len, data.pack_block) if data.pack else None
    return StatefulLoader(
        stream,
        encode,
        packer,
        batch_size=batch_size,
        collate_fn=collator_for(model, tokenizer.pad_token_id),
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        worker_init_fn=leave_stop_signals_to_the_main_process,
    )
