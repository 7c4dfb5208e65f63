"""Collation: encoded samples (or packed rows) into one right-padded batch, and cross-attention
(Mllama) images into `transformers`' batch layout with their per-token mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmscale.config.model import ModelConfig
from mmscale.data.multicrop import batch_pooling
from mmscale.data.tokenizer import IGNORE_INDEX


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


def collator_for(model: ModelConfig, pad_id: int) -> Collator:
    """The collator of `model`'s batches, with the tower's patch size that Molmo2's pooling tables need."""
    return Collator(pad_id, model.vision.patch_size if model.arch == "decoder" else 0)
