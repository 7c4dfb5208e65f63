"""Molmo2's multi-crop input: the numbers transformers' own tests publish, the geometry's
invariants, and (where torchvision imports: CUDA builds of torch) equality with its processor."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.utils import is_torchvision_available

from mmscale.config.model import CropsConfig
from mmscale.data.collate import Collator
from mmscale.data.multicrop import ImageTokenIds, MultiCrop, MultiCropImages, select_tiling
from mmscale.data.schema import SampleError
from mmscale.models.hf.molmo2 import crops_to_hf
from tests.helpers.recipes import toy_vision

MOLMO2_VISION = toy_vision(image_size=378, patch_size=14, hidden_size=1152, num_layers=25, num_heads=16,
                             image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), post_norm=False)
IDS = ImageTokenIds(patch=2, markers=(2, 3, 0, 4, 1))


def png(height: int, width: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_a_wide_image_takes_the_shapes_transformers_publishes():
    """transformers' Molmo2-8B integration test expects 7 crops of 729 patches and 955 image
    tokens for its image: the overview's 14x14 and a 2x3 canvas's 23x33, which a 480x700 image needs."""
    cut = MultiCrop(CropsConfig(), MOLMO2_VISION)(png(480, 700))
    assert cut.pixel_values.shape == (7, 3, 378, 378)
    assert cut.image_pooling.shape == (955, 4)
    assert cut.grid == (14, 14, 23, 33)


@pytest.mark.parametrize("size", [(480, 700), (378, 378), (1000, 1000), (90, 700), (2000, 300)])
def test_every_kept_patch_is_pooled_once_and_the_layout_counts_them(size):
    crops = CropsConfig()
    cut = MultiCrop(crops, MOLMO2_VISION)(png(*size))
    patches = 27 * 27
    overview, high = cut.image_pooling[:196], cut.image_pooling[196:]
    assert sorted(overview[overview >= 0].tolist()) == list(range(patches))
    used = high[high >= 0]
    assert len(used) == len(set(used.tolist()))  # each canvas patch in one window only
    assert used.min() >= patches and used.max() < len(cut.pixel_values) * patches
    assert (cut.image_pooling >= 0).any(dim=1).all()  # no window is all padding
    layout = MultiCrop(crops, MOLMO2_VISION).layout(cut.grid, IDS)
    assert layout.count(IDS.patch) == len(cut.image_pooling)
    assert len(layout) == crops.layout_length(cut.grid) <= crops.max_layout_length(MOLMO2_VISION)


def test_overlapping_crops_agree_where_they_overlap():
    """Neighbouring crops are cut from one canvas: their shared margins hold the same pixels."""
    cut = MultiCrop(CropsConfig(), MOLMO2_VISION)(png(480, 700))
    crops = cut.pixel_values[1:].view(2, 3, 3, 378, 378)
    overlap = 8 * 14  # both margins
    torch.testing.assert_close(crops[0, 0, :, :, -overlap:], crops[0, 1, :, :, :overlap], rtol=0, atol=0)
    torch.testing.assert_close(crops[0, 0, :, -overlap:, :], crops[1, 0, :, :overlap, :], rtol=0, atol=0)


def test_tiling_prefers_the_least_upscaling_then_the_least_downscaling():
    window = 19 * 14
    assert select_tiling(1000 - 112, 1000 - 112, window, 8) == (2, 2)  # all shrink: (2,2) shrinks least, first
    assert select_tiling(200, 500, window, 8) == (1, 2)  # the smallest canvas that holds it
    assert select_tiling(500, 200, window, 8) == (2, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not is_torchvision_available(),
                    reason="transformers' Molmo2 processor needs torchvision, which imports only beside CUDA torch")
@pytest.mark.parametrize("size", [(480, 700), (378, 378), (90, 700), (2000, 300)])
def test_crops_and_layout_equal_transformers_molmo2_processor(size):
    from transformers import Molmo2ImageProcessor

    data = png(*size)
    theirs = Molmo2ImageProcessor()(images=[Image.open(io.BytesIO(data))], return_tensors="pt")
    cut = MultiCrop(CropsConfig(), MOLMO2_VISION)(data)
    torch.testing.assert_close(crops_to_hf(cut.pixel_values, 14), theirs["pixel_values"], rtol=0, atol=1e-6)
    assert torch.equal(cut.image_pooling, theirs["image_token_pooling"])
    assert list(cut.grid) == theirs["image_grids"][0].tolist()


def test_a_layout_read_from_the_header_is_the_cut_images_and_text_cannot_fake_one():
    images = MultiCropImages(MultiCrop(CropsConfig(), MOLMO2_VISION), IDS)
    data = png(480, 700)
    cut = images(data)
    layout = images.layout(data)
    assert layout == images.cut.layout(tuple(cut["image_grid"][0].tolist()), IDS)
    images.check_text([7, *layout, 8], [layout], "sample")
    with pytest.raises(SampleError, match="its text holds Molmo2's image tokens") as err:
        images.check_text([7, *layout, IDS.patch, 8], [layout], "sample")
    assert err.value.reason == "placeholder_mismatch"


def test_the_collator_refuses_multi_crop_tables_without_the_patch_size():
    images = MultiCropImages(MultiCrop(CropsConfig(), MOLMO2_VISION), IDS)
    row = {"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([1, 2]), "samples": [], "reader": None,
           **images(png(100, 100))}
    with pytest.raises(ValueError, match="patch_size"):
        Collator(pad_id=0)([row])
    assert Collator(pad_id=0, patch_size=14)([row])["image_pooling"].shape == row["image_pooling"].shape
