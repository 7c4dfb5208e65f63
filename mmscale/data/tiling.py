"""Llama-3.2-Vision image tiling and cross-attention masks, with Pillow + torch.

An image is resized, keeping its aspect ratio, onto the canvas of whole tiles (rows x
cols, at most `max_tiles`) that needs the least scaling, padded with black to the canvas,
normalised and cut into tiles. Each image gets an aspect-ratio id (its (rows, cols) in
`supported_aspect_ratios`, counted from 1; 0 marks a padding image) and a tile mask. The
arithmetic follows `transformers`' MllamaImageProcessor, so released checkpoints see the
inputs they were trained on; a test checks tile-for-tile equality with it.

Text tokens see images through a cross-attention mask: an image is visible from its
`<|image|>` token until the next image's token, or to the end of the sample; images
whose tokens stand next to each other share the later end.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mmscale.config.towers import TiledVisionConfig


@functools.cache
def supported_aspect_ratios(max_tiles: int) -> list[tuple[int, int]]:
    """Tile grids (rows, cols) with rows x cols <= max_tiles, in the order ids count them."""
    return [(r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1) if r * c <= max_tiles]


@functools.lru_cache(maxsize=1024)
def best_canvas(height: int, width: int, grids: tuple[tuple[int, int], ...], tile: int) -> tuple[int, int]:
    """(rows, cols) of the canvas that fits the image with the least upscaling, else the least downscaling.

    Ties (same scale) go to the smaller canvas, so padding is minimal.
    """
    options = []
    for rows, cols in grids:
        scale = min(rows * tile / height, cols * tile / width)
        options.append((scale, rows * cols, (rows, cols)))
    upscales = [o for o in options if o[0] >= 1]
    if upscales:
        chosen = min(o[0] for o in upscales)
    else:
        chosen = max(o[0] for o in options)
    return min((area, grid) for scale, area, grid in options if scale == chosen)[1]


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """Size of the image on its canvas: aspect ratio kept, each side between one tile and the canvas."""
    target_h = min(max(height, tile), canvas_h)
    target_w = min(max(width, tile), canvas_w)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def tile_image(
    img: Image.Image, tile: int, max_tiles: int, mean: tuple[float, ...], std: tuple[float, ...],
    grids: tuple[tuple[int, int], ...] | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """An RGB image -> (max_tiles, 3, tile, tile) normalised tiles (zeros past the real ones) and its (rows, cols).

    `grids` are the (rows, cols) the model knows (default: every grid of at most max_tiles).
    """
    grids = grids or tuple(supported_aspect_ratios(max_tiles))
    rows, cols = best_canvas(img.height, img.width, grids, tile)
    new_h, new_w = fit_to_canvas(img.height, img.width, rows * tile, cols * tile, tile)
    img = img.convert("RGB").resize((new_w, new_h), Image.Resampling.BILINEAR)
    canvas = np.zeros((rows * tile, cols * tile, 3), dtype=np.float32)
    canvas[:new_h, :new_w] = np.asarray(img, dtype=np.float32) / 255.0
    pixels = (torch.from_numpy(canvas) - torch.tensor(mean)) / torch.tensor(std)  # padding is normalised black
    tiles = pixels.view(rows, tile, cols, tile, 3).permute(0, 2, 4, 1, 3).reshape(rows * cols, 3, tile, tile)
    out = torch.zeros(max_tiles, 3, tile, tile)
    out[: rows * cols] = tiles
    return out, (rows, cols)


def image_spans(input_ids: torch.Tensor, image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) token range from which each image of one sample is visible, in image order."""
    locations = (input_ids == image_token_id).nonzero().flatten().tolist()
    ends = locations[1:] + [len(input_ids)]
    # Walking back: an image whose token is directly followed by the next image's token
    # takes over that image's end, so a run of images is visible to all the text after it.
    for i in range(len(locations) - 2, -1, -1):
        if ends[i] == locations[i] + 1:
            ends[i] = ends[i + 1]
    return list(zip(locations, ends))


@dataclass(frozen=True)
class TiledImages:
    """Per-image transform of cross-attention VLMs: tiles, aspect-ratio id and tile count."""

    vision: TiledVisionConfig

    def __call__(self, data: bytes) -> dict[str, torch.Tensor]:
        cfg = self.vision
        grids = cfg.supported_aspect_ratios
        with Image.open(io.BytesIO(data)) as img:
            tiles, (rows, cols) = tile_image(img, cfg.image_size, cfg.max_num_tiles, cfg.image_mean, cfg.image_std, grids)
        ratio_id = grids.index((rows, cols)) + 1  # the model's aspect-ratio embeddings count from 1
        return {"pixel_values": tiles, "aspect_ratio_ids": torch.tensor(ratio_id), "num_tiles": torch.tensor(rows * cols)}

    def empty(self) -> dict[str, torch.Tensor]:
        size = self.vision.image_size
        return {
            "pixel_values": torch.zeros(0, self.vision.max_num_tiles, 3, size, size),
            "aspect_ratio_ids": torch.zeros(0, dtype=torch.long),
            "num_tiles": torch.zeros(0, dtype=torch.long),
        }
