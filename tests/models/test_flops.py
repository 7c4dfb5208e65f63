"""The FLOPs accounting against PyTorch's own FLOP counter on tiny models."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmscale.config import load_recipe
from mmscale.models.cross_attention_vlm import CrossAttentionVLM
from mmscale.models.decoder_vlm import DecoderVLM, image_tokens_per_image
from mmscale.models.flops import training_flops_per_sample
from tests.conftest import CROSS_ATTENTION_OVERRIDES, REPO, TINY_OVERRIDES

IMAGE_ID, VOCAB = 3, 96


def _counted(model: torch.nn.Module, **inputs) -> int:
    """FLOPs PyTorch counts for one forward and backward.

    SDPA's fused CPU kernel is invisible to the counter; its math backend runs the same
    products as counted matmuls.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**inputs).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "variant",
    [
        [],  # SigLIP-style tower, last layer, mlp connector
        ["model.vision.family=clip", "model.vision.feature_layers=[-2]", "model.connector.type=linear"],
        ["model.connector.type=pool_mlp", "model.vision.feature_layers=[-1,-2]", "model.vision.num_layers=3"],
        ["model.connector.type=molmo", "model.vision.feature_layers=[-1,-2]", "model.vision.num_layers=3"],
    ],
)
def test_decoder_vlm_flops_match_the_flop_counter(variant):
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", [*TINY_OVERRIDES, "model.vision.image_size=64", *variant])
    cfg = recipe.model
    model = DecoderVLM(cfg, VOCAB, IMAGE_ID)
    n = image_tokens_per_image(cfg)
    images, text = 2, 40
    ids = torch.randint(10, VOCAB, (1, images * n + text))
    ids[0, 1 : 1 + n] = IMAGE_ID
    ids[0, 5 + n : 5 + 2 * n] = IMAGE_ID
    counted = _counted(model, input_ids=ids, labels=ids, pixel_values=torch.randn(images, 3, 64, 64))
    ours = training_flops_per_sample(cfg, tokens=ids.shape[1], images=images, vocab_size=VOCAB)
    print(f"{variant}: ours {ours:.4g}, counted {counted:.4g}, ratio {ours / counted:.4f}")
    assert ours == pytest.approx(counted, rel=0.05)


@pytest.mark.parametrize("images", [1, 2])
def test_cross_attention_vlm_flops_match_the_flop_counter(images):
    recipe = load_recipe(REPO / "recipes" / "demo_cross_attention.yaml", [*TINY_OVERRIDES, *CROSS_ATTENTION_OVERRIDES])
    cfg = recipe.model
    model = CrossAttentionVLM(cfg, VOCAB)
    tiles = cfg.tiled_vision.max_num_tiles
    text = 48
    ids = torch.randint(10, VOCAB, (1, text))
    size = cfg.tiled_vision.image_size
    inputs = {
        "input_ids": ids, "labels": ids,
        "pixel_values": torch.randn(1, images, tiles, 3, size, size),
        "aspect_ratio_ids": torch.full((1, images), 6),  # (2, 2): four real tiles
        "aspect_ratio_mask": torch.ones(1, images, tiles, dtype=torch.long),
        "cross_attention_mask": torch.ones(1, text, images, tiles, dtype=torch.long),
    }
    counted = _counted(model, **inputs)
    ours = training_flops_per_sample(cfg, tokens=text, images=images, vocab_size=VOCAB)
    print(f"{images} images: ours {ours:.4g}, counted {counted:.4g}, ratio {ours / counted:.4f}")
    assert ours == pytest.approx(counted, rel=0.05)
