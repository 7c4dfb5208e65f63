"""The micro-batch a memory plan is made for: the largest one the recipe's loader can produce.

Rows are full (data.pack_len with packing, else data.max_seq_len), every row carries the
most images the recipe allows, and every text token after the prompt is labelled. The plan
and its CPU measurement (benchmarks/memory.py) run this same batch.
"""

from __future__ import annotations

import torch

from mmscale.config import Recipe
from mmscale.data.multicrop import ImageTokenIds, MultiCrop, batch_pooling
from mmscale.data.tokenizer import IGNORE_INDEX

# Text tokens around each image in a packed row (a short question and answer): a packed row
# holds row_len // (image tokens + this) images, the most a LLaVA-like mix puts in one row.
TEXT_PER_IMAGE = 64
# The share of a sample's text tokens that are labelled (the answer); the rest is prompt.
LABELLED_SHARE = 0.5


def row_len(recipe: Recipe) -> int:
    return (recipe.data.pack_len or recipe.data.max_seq_len) if recipe.data.pack else recipe.data.max_seq_len


def labelled_tokens_of(recipe: Recipe, span: int) -> int:
    """The labelled tokens of a planned sample of `span` positions: LABELLED_SHARE of its text."""
    return int(LABELLED_SHARE * (span - recipe.model.image_tokens))


def images_per_row(recipe: Recipe) -> int:
    """One image per unpacked row; a packed row as many as fit with TEXT_PER_IMAGE tokens of text each."""
    return max(1, row_len(recipe) // (recipe.model.image_tokens + TEXT_PER_IMAGE)) if recipe.data.pack else 1


def worst_case_batch(recipe: Recipe, micro_batch: int, image_token_id: int) -> dict[str, torch.Tensor]:
    """Model inputs of one micro-batch, as real CPU tensors (the plan moves the floating-point ones to meta)."""
    rows, length, images = micro_batch, row_len(recipe), images_per_row(recipe)
    span = length // images  # each sample: its image, then its text; the last half of the text labelled
    image_tokens = recipe.model.image_tokens
    input_ids = torch.randint(0, image_token_id, (rows, length))  # text: any id but the image token's
    labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(rows, length, dtype=torch.long)
    segment_ids = torch.zeros(rows, length, dtype=torch.long)
    for i in range(images):
        start = i * span
        end = length if i == images - 1 else start + span
        input_ids[:, start : start + image_tokens] = image_token_id
        answer = end - labelled_tokens_of(recipe, end - start)
        labels[:, answer:end] = input_ids[:, answer:end]
        position_ids[:, start:end] = torch.arange(end - start)
        segment_ids[:, start:end] = i + 1
    batch = {"input_ids": input_ids, "labels": labels}
    if recipe.data.pack:
        batch.update(position_ids=position_ids, segment_ids=segment_ids)
    if recipe.model.is_molmo2:
        batch.update(_multicrop_images(recipe, [i * span for i in range(images)], rows, image_token_id, input_ids))
        return batch
    if recipe.model.arch == "decoder":
        size = recipe.model.vision.image_size
        batch["pixel_values"] = torch.randn(rows * images, 3, size, size)
        return batch
    vision = recipe.model.tiled_vision
    tiles = vision.max_num_tiles
    batch["pixel_values"] = torch.randn(rows, images, tiles, 3, vision.image_size, vision.image_size)
    # The aspect ratio whose grid uses every tile (ids count from 1; 0 marks a padding image).
    grid = max(range(len(vision.supported_aspect_ratios)), key=lambda k: vision.supported_aspect_ratios[k][0] * vision.supported_aspect_ratios[k][1])
    batch["aspect_ratio_ids"] = torch.full((rows, images), grid + 1, dtype=torch.long)
    batch["aspect_ratio_mask"] = torch.ones(rows, images, tiles, dtype=torch.long)
    cross = torch.zeros(rows, length, images, tiles, dtype=torch.long)
    for i in range(images):
        cross[:, i * span : length if i == images - 1 else (i + 1) * span, i] = 1
    batch["cross_attention_mask"] = cross
    return batch


def _multicrop_images(
    recipe: Recipe, starts: list[int], rows: int, image_token_id: int, input_ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Images of the longest multi-crop layout at `starts` of every row: their crops and pooling
    table, and their layouts written into `input_ids` (the patches as `image_token_id`, the other
    markers as the id below it)."""
    model = recipe.model
    crops, vision = model.crops, model.vision
    tiling = crops.longest_tiling(vision)
    side = vision.grid_size - sum(crops.overlap_margins)
    margin = sum(crops.overlap_margins) * vision.patch_size
    # An image the size of that tiling's canvas: the tiling that fits it exactly.
    canvas = [n * side * vision.patch_size + margin for n in tiling]
    cut = MultiCrop(crops, vision)
    image = cut.cut(torch.zeros(3, *canvas, dtype=torch.uint8))
    ids = ImageTokenIds(image_token_id, (image_token_id,) + (image_token_id - 1,) * 4)
    layout = torch.tensor(cut.layout(image.grid, ids))
    for start in starts:
        input_ids[:, start : start + len(layout)] = layout
    count = rows * len(starts)
    crops_each, windows = torch.full((count,), len(image.pixel_values)), torch.full((count,), len(image.image_pooling))
    pooling = batch_pooling(image.image_pooling.repeat(count, 1), crops_each, windows, vision.num_patches)
    return {"pixel_values": torch.randn(count * len(image.pixel_values), *image.pixel_values.shape[1:]),
            "image_pooling": pooling}
