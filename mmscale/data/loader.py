"""Streaming WebDataset loader: shards split by rank and worker, seeded shuffles, padded batches.

`build_dataloader` is the entry point. Shards are read by `webdataset` (local paths,
brace patterns, `pipe:` commands and fsspec URLs alike); nothing assumes a disk shared
by all ranks.
"""

from __future__ import annotations

import io
import json
import signal
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import numpy as np
import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from mmscale.config.model import ModelConfig
from mmscale.config.schema import DataConfig
from mmscale.data.images import SquareImages
from mmscale.data.multicrop import ImageTokenIds, MultiCrop, MultiCropImages, batch_pooling
from mmscale.data.packing import Packer
from mmscale.data.schema import SampleError, validate_sample
from mmscale.data.readers import check_readers
from mmscale.data.stream import ShardStream, Source, StatefulLoader
from mmscale.data.tiling import TiledImages, image_spans
from mmscale.data.tokenizer import IGNORE_INDEX, encode_conversation, image_token_id
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


def manifest_samples(shards: list[str], key: str) -> int:
    """Samples in `shards`, from the manifest.json that `mmscale shards build/demo` write beside them.

    A manifest lists its shards by path relative to itself; it is looked for in each
    shard's folder and that folder's parent (the demo keeps one for train/ and val/).
    """
    counts = _listed_counts(shards)
    missing = [s for s in shards if Path(s).resolve() not in counts]
    if missing:
        raise UserError(
            f"{key}: no manifest.json lists {missing[0]} ({len(missing)} of {len(shards)} shards), so an epoch "
            "has no known size; build the shards with `mmscale shards build`, or set train.samples or train.steps"
        )
    return sum(counts[Path(s).resolve()] for s in shards)


def manifest_counts(shards: list[str]) -> list[int] | None:
    """Each shard's samples, as `manifest_samples` finds them, or None unless a manifest lists every shard."""
    counts = _listed_counts(shards)
    listed = [counts.get(Path(s).resolve()) for s in shards]
    return None if None in listed else listed


def _listed_counts(shards: list[str]) -> dict[Path, int]:
    counts: dict[Path, int] = {}
    for folder in {Path(s).resolve().parent for s in shards if "://" not in s and not s.startswith("pipe:")}:
        for manifest in (folder / "manifest.json", folder.parent / "manifest.json"):
            if manifest.is_file():
                counts.update(_manifest_counts(manifest))
    return counts


def _manifest_counts(path: Path) -> dict[Path, int]:
    def shard_lists(tree):  # `shards build` keeps one list at the top, the demo one per split
        if isinstance(tree, dict):
            if isinstance(tree.get("shards"), list):
                yield tree["shards"]
            for value in tree.values():
                yield from shard_lists(value)

    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a readable manifest ({e}); rebuild the shards or remove it") from e
    # Every training run reads the manifests beside its shards: entries of other tools' lists are passed over.
    return {
        (path.parent / s["name"]).resolve(): s["samples"]
        for shards in shard_lists(manifest) for s in shards
        if isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("samples"), int)
    }


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


ImageTransform = SquareImages | TiledImages | MultiCropImages


def teacher_member(image: str) -> str:
    """The member holding an image's cached VIRAL teacher features (mmscale.alignment.cache)."""
    return f"{image}.teacher.npy"


@dataclass(frozen=True)
class SampleEncoder:
    """Raw WebDataset sample -> token ids, labels and per-image tensors.

    With `spans_of` (the image token id of a cross-attention model) each sample also gets
    `image_spans`, the token range that sees each image (see `mmscale.data.tiling`). With
    `teacher_width` it gets `teacher_features` (images, image tokens, teacher_width), fp16,
    from the shards' cached VIRAL targets (see `mmscale.alignment.cache`).
    """

    tokenizer: PreTrainedTokenizerBase
    images: ImageTransform
    image_token_count: int
    max_seq_len: int
    truncate: bool
    spans_of: int | None = None
    teacher_width: int | None = None

    def __call__(self, sample: dict) -> dict:
        where = f"shard {sample.get('__url__')} sample {sample.get('__key__')}"
        meta, encoded_images = parse_sample(sample, where)
        multicrop = isinstance(self.images, MultiCropImages)
        expand = self.image_token_count
        if multicrop:  # each image's tokens depend on its size, which its header says
            expand = [self._decoded([name], [data], where, self.images.layout)[0]
                      for name, data in zip(meta["images"], encoded_images)]
        input_ids, labels, kept = encode_conversation(
            self.tokenizer, meta["messages"], expand, self.max_seq_len, where, self.truncate
        )
        if multicrop:
            self.images.check_text(input_ids, expand[:kept], where)
        # Truncation may drop the last images.
        per_image = self._decoded(meta["images"][:kept], encoded_images, where)
        encoded = {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}
        join = torch.cat if multicrop else torch.stack  # crops and windows per image vary
        images = {k: join([im[k] for im in per_image]) for k in per_image[0]} if per_image else self.images.empty()
        encoded.update(images)
        # (id, tokens, tiles of each image) per sample: ids name bad steps in logs, sizes count
        # FLOPs. A square image is one tile; a tiled one counts the tiles it has, not max_num_tiles;
        # a multi-crop one its crops.
        sample_id = f"{Path(str(sample.get('__url__'))).name}/{sample.get('__key__')}"
        counts = encoded.get("num_tiles", encoded.get("image_crops"))
        tiles = tuple(counts.tolist()) if counts is not None else (1,) * len(per_image)
        encoded["samples"] = [(sample_id, len(input_ids), tiles)]
        if self.spans_of is not None:
            encoded["image_spans"] = torch.tensor(image_spans(encoded["input_ids"], self.spans_of), dtype=torch.long).view(-1, 2)
        if self.teacher_width is not None:
            encoded["teacher_features"] = self.teacher_features(sample, meta["images"][:kept], where)
        return encoded

    def _decoded(self, names: list[str], encoded_images: list[bytes], where: str, read=None) -> list:
        """`read` (by default the image transform) of each image; a SampleError naming the one that fails."""
        decoded = []
        for name, data in zip(names, encoded_images):
            try:
                decoded.append((read or self.images)(data))
            except Exception as e:  # Pillow signals bad bytes with many types (OSError, ValueError, ...)
                raise SampleError(f"{where}: image '{name}' cannot be decoded ({e})", "bad_image") from e
        return decoded

    def teacher_features(self, sample: dict, images: list[str], where: str) -> torch.Tensor:
        """The cached teacher features of `images` (the images kept after truncation), in order."""
        shape = (self.image_token_count, self.teacher_width)
        features = []
        for name in images:
            member = teacher_member(name)
            if member not in sample:
                raise SampleError(
                    f"{where}: no cached teacher features '{member}' for image '{name}'; re-run "
                    "`mmscale shards cache-teacher` over this shard", "missing_image",
                )
            array = np.load(io.BytesIO(sample[member]), allow_pickle=False)
            if array.shape != shape:
                raise SampleError(f"{where}: cached teacher features '{member}' have shape {array.shape}, not {shape}")
            features.append(torch.from_numpy(array))
        return torch.stack(features) if features else torch.zeros(0, *shape, dtype=torch.float16)


@dataclass(frozen=True)
class Collator:
    """Right-pads a list of encoded samples into one batch; images of all samples are concatenated.

    Rows are single samples or packed rows (with position_ids and segment_ids). `meta` is
    bookkeeping, not model input: `lengths` (real tokens per row; a pad id may also be a
    real token, for tokenizers that pad with eos), `slots` (tokens including padding),
    `samples` ((id, tokens, tiles of each image) of each sample in the batch) and `reader`, the restore
    point of the reader that made the batch.
    """

    pad_id: int
    patch_size: int = 0  # the tower's, for Molmo2's pooling tables

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
        if "image_spans" in rows[0]:
            batch.update(cross_attention_images(rows, longest))
        else:
            batch["pixel_values"] = torch.cat([r["pixel_values"] for r in rows])
        if "image_pooling" in rows[0]:  # Molmo2: the images' tables, made to index the batch's crops
            if not self.patch_size:
                raise ValueError("Collator(patch_size=...) is needed for multi-crop images: the tower's patch size")
            crops, windows = (torch.cat([r[k] for r in rows]) for k in ("image_crops", "image_windows"))
            patches = batch["pixel_values"].shape[-1] // self.patch_size
            batch["image_pooling"] = batch_pooling(torch.cat([r["image_pooling"] for r in rows]), crops, windows,
                                                   patches * patches)
        if "teacher_features" in rows[0]:
            batch["teacher_features"] = torch.cat([r["teacher_features"] for r in rows])
        lengths = torch.tensor([len(r["input_ids"]) for r in rows])
        batch["meta"] = {
            "lengths": lengths, "slots": len(rows) * longest,
            "samples": [s for r in rows for s in r["samples"]], "reader": rows[-1]["reader"],
        }
        if "image_pooling" in rows[0]:  # what transformers' Molmo2 takes instead (evaluating an export)
            batch["meta"]["images"] = {
                "image_token_pooling": torch.cat([r["image_pooling"] for r in rows]),
                "image_grids": torch.cat([r["image_grid"] for r in rows]), "image_num_crops": crops,
            }
        return batch


def cross_attention_images(rows: list[dict], seq_len: int) -> dict[str, torch.Tensor]:
    """Images of tiled rows in `transformers`' Mllama layout, with the per-token cross-attention mask.

    pixel_values (rows, images, tiles, 3, tile, tile), aspect_ratio_ids (rows, images),
    aspect_ratio_mask (rows, images, tiles), cross_attention_mask (rows, seq_len, images,
    tiles). Rows with fewer images are padded with images of id 0 that no token sees; a
    batch without images still gets one padding image, so the vision encoder runs in every
    step on every rank (as ZeRO needs).
    """
    images = max(1, max(len(r["image_spans"]) for r in rows))
    tiles_shape = rows[0]["pixel_values"].shape[1:]
    pixel_values = torch.zeros(len(rows), images, *tiles_shape)
    ratio_ids = torch.zeros(len(rows), images, dtype=torch.long)
    ratio_mask = torch.zeros(len(rows), images, tiles_shape[0], dtype=torch.long)
    ratio_mask[:, :, 0] = 1  # as transformers' processor marks padding images
    cross_mask = torch.zeros(len(rows), seq_len, images, tiles_shape[0], dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["image_spans"])
        pixel_values[i, :n] = row["pixel_values"]
        ratio_ids[i, :n] = row["aspect_ratio_ids"]
        for j, ((start, end), tiles) in enumerate(zip(row["image_spans"].tolist(), row["num_tiles"].tolist())):
            ratio_mask[i, j, :tiles] = 1
            cross_mask[i, start:end, j, :tiles] = 1
    return {
        "pixel_values": pixel_values, "aspect_ratio_ids": ratio_ids,
        "aspect_ratio_mask": ratio_mask, "cross_attention_mask": cross_mask,
    }


def leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`. PyTorch's workers die on a SIGTERM their parent did not send
    (and on SIGUSR2, by default); SLURM signals the whole process group, which would kill them
    under the step the main process is about to checkpoint. The main process stops them when done."""
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def image_transform(model: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[ImageTransform, int | None]:
    """The per-image transform of `model.arch` (and connector), and for cross-attention models the
    image token id whose spans the samples get."""
    if model.arch == "cross_attention":
        return TiledImages(model.tiled_vision), image_token_id(tokenizer)
    if model.is_molmo2:
        return MultiCropImages(MultiCrop(model.crops, model.vision), ImageTokenIds.of_tokenizer(tokenizer)), None
    return SquareImages(model.vision), None


def collator_for(model: ModelConfig, pad_id: int) -> Collator:
    """The collator of `model`'s batches, with the tower's patch size that Molmo2's pooling tables need."""
    return Collator(pad_id, model.vision.patch_size if model.arch == "decoder" else 0)


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
