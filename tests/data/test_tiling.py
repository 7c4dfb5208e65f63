"""Llama-3.2-Vision tiling and cross-attention spans, checked against transformers' Mllama processor."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

from mmscale.data.tiling import image_spans, supported_aspect_ratios, tile_image

MEAN, STD = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)


def _image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("max_tiles", [1, 4, 6])
def test_tiles_ids_and_masks_equal_the_transformers_processor(max_tiles):
    reference = MllamaImageProcessorPil(
        size={"height": 32, "width": 32}, max_image_tiles=max_tiles, image_mean=list(MEAN), image_std=list(STD)
    )
    # Upscaled, wide, tall, downscaled, exactly one tile, odd sizes.
    sizes = [(20, 12), (100, 30), (30, 100), (300, 200), (32, 32), (47, 61), (130, 33)]
    seen_grids = set()
    for i, (w, h) in enumerate(sizes):
        img = _image(w, h, i)
        want = reference([[img]], return_tensors="pt")
        tiles, grid = tile_image(img, 32, max_tiles, MEAN, STD)
        seen_grids.add(grid)
        n = grid[0] * grid[1]
        assert want["num_tiles"] == [[n]], (w, h)
        assert int(want["aspect_ratio_ids"][0, 0]) == supported_aspect_ratios(max_tiles).index(grid) + 1
        assert want["aspect_ratio_mask"][0, 0].tolist() == [1] * n + [0] * (max_tiles - n)
        torch.testing.assert_close(tiles, want["pixel_values"][0, 0], atol=1e-5, rtol=0)
    if max_tiles > 1:
        assert len(seen_grids) >= 3  # the sizes exercise several tile grids, not one


def test_image_spans_equal_the_transformers_token_mask():
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.choice([7, 7, 7, 9]) for _ in range(rng.randint(1, 30))]  # 9 is the image token
        want = get_cross_attention_token_mask(ids, 9)
        want = [(s, len(ids) if e == -1 else e) for s, e in want]
        assert image_spans(torch.tensor(ids), 9) == want, ids
