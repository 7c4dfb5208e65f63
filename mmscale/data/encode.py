"""Raw WebDataset samples, parsed and checked against the schema, encoded into token ids, labels and image tensors.

`SampleEncoder` is what the loader runs on each sample; `image_transform` picks the per-image
transform of a model's architecture.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from mmscale.config.model import ModelConfig
from mmscale.data.images import SquareImages
from mmscale.data.multicrop import ImageTokenIds, MultiCrop, MultiCropImages
from mmscale.data.schema import SampleError, validate_sample
from mmscale.data.tiling import TiledImages, image_spans
from mmscale.data.tokenizer import encode_conversation, image_token_id


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


def image_transform(model: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[ImageTransform, int | None]:
    """The per-image transform of `model.arch` (and connector), and for cross-attention models the
    image token id whose spans the samples get."""
    if model.arch == "cross_attention":
        return TiledImages(model.tiled_vision), image_token_id(tokenizer)
    if model.is_molmo2:
        return MultiCropImages(MultiCrop(model.crops, model.vision), ImageTokenIds.of_tokenizer(tokenizer)), None
    return SquareImages(model.vision), None
