"""The FLOPs accounting against PyTorch's own FLOP counter on tiny models."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmscale.config import Recipe, load_recipe
from mmscale.data.tokenizer import IGNORE_INDEX
from mmscale.models.cross_attention_vlm import CrossAttentionVLM
from mmscale.models.decoder_vlm import DecoderVLM
from mmscale.models.flops import output_layer_training, training_flops_per_sample
from mmscale.models.loss import labelled_tokens
from mmscale.training.freeze import freeze
from tests.helpers.recipes import CROSS_ATTENTION_OVERRIDES, REPO, TINY_OVERRIDES, tiny_with

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
        # What users train: a frozen tower (LLaVA stage 2), and only the connector (stage 1),
        # where the frozen LLM runs its backward for the connector's gradients alone.
        ["train.trainable=finetune"],
        ["train.trainable=align"],
        ["train.trainable=align", "model.connector.type=molmo", "model.vision.feature_layers=[-1,-2]"],
    ],
)
def test_decoder_vlm_flops_match_the_flop_counter(variant):
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", [*TINY_OVERRIDES, "model.vision.image_size=64", *variant])
    cfg = recipe.model
    model = DecoderVLM(cfg, VOCAB, IMAGE_ID)
    freeze(model, recipe.trainable_parts)
    n = cfg.image_tokens
    images, text = 2, 40
    ids = torch.randint(10, VOCAB, (1, images * n + text))
    ids[0, 1 : 1 + n] = IMAGE_ID
    ids[0, 5 + n : 5 + 2 * n] = IMAGE_ID
    counted = _counted(model, input_ids=ids, labels=ids, pixel_values=torch.randn(images, 3, 64, 64))
    ours = training_flops_per_sample(cfg, tokens=ids.shape[1], image_tiles=(1,) * images, vocab_size=VOCAB,
                                     trainable=recipe.trainable_parts)
    print(f"{variant}: ours {ours:.4g}, counted {counted:.4g}, ratio {ours / counted:.4f}")
    assert ours == pytest.approx(counted, rel=0.05)


@pytest.mark.parametrize("trainable", ["full", "align"])
def test_a_batch_counts_the_output_head_at_its_labelled_positions_only(trainable):
    """Training runs the head where a label follows; a large vocabulary makes it most of the work,
    so counting it at every position would miss the counter by far (checked too)."""
    vocab = 4096
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", [*TINY_OVERRIDES, f"train.trainable={trainable}"])
    model = DecoderVLM(recipe.model, vocab, IMAGE_ID)
    freeze(model, recipe.trainable_parts)
    n = recipe.model.image_tokens
    ids = torch.randint(10, vocab, (1, n + 60))
    ids[0, :n] = IMAGE_ID
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, -20:] = ids[0, -20:]  # 20 labelled tokens: the last 20 positions' predecessors
    size = recipe.model.vision.image_size
    counted = _counted(model, input_ids=ids, labels=labels, pixel_values=torch.randn(1, 3, size, size))
    every = training_flops_per_sample(recipe.model, ids.shape[1], (1,), vocab, recipe.trainable_parts)
    unlabelled = ids.shape[1] - labelled_tokens(labels)
    ours = every - output_layer_training(recipe.model, unlabelled, vocab, recipe.trainable_parts)
    print(f"{trainable}: ours {ours:.4g}, every position {every:.4g}, counted {counted:.4g}")
    assert ours == pytest.approx(counted, rel=0.05)
    assert every > 1.5 * counted


def _cross_attention_counted(trainable: str, images: int, max_tiles: int) -> tuple[int, Recipe]:
    """(counted FLOPs, recipe) of one sample of 48 text tokens and `images` images that fill all
    `max_tiles` tiles of the model."""
    recipe = load_recipe(REPO / "recipes" / "demo_cross_attention.yaml", [
        *tiny_with(TINY_OVERRIDES, CROSS_ATTENTION_OVERRIDES), f"train.trainable={trainable}",
        f"model.tiled_vision.max_num_tiles={max_tiles}",
        *(["model.tiled_vision.supported_aspect_ratios=[[1,1]]"] if max_tiles == 1 else []),
    ])
    cfg = recipe.model
    model = CrossAttentionVLM(cfg, VOCAB)
    freeze(model, recipe.trainable_parts)
    text = 48
    ids = torch.randint(10, VOCAB, (1, text))
    size = cfg.tiled_vision.image_size
    grid = cfg.tiled_vision.supported_aspect_ratios.index(max(cfg.tiled_vision.supported_aspect_ratios,
                                                              key=lambda r: r[0] * r[1])) + 1
    inputs = {
        "input_ids": ids, "labels": ids,
        "pixel_values": torch.randn(1, images, max_tiles, 3, size, size),
        "aspect_ratio_ids": torch.full((1, images), grid),  # the grid of all max_tiles tiles
        "aspect_ratio_mask": torch.ones(1, images, max_tiles, dtype=torch.long),
        "cross_attention_mask": torch.ones(1, text, images, max_tiles, dtype=torch.long),
    }
    counted = _counted(model, **inputs)
    return counted, recipe


@pytest.mark.parametrize("images, trainable", [(1, "full"), (2, "full"), (2, "adapter"), (1, "adapter")])
def test_cross_attention_vlm_flops_match_the_flop_counter(images, trainable):
    counted, recipe = _cross_attention_counted(trainable, images, max_tiles=4)
    ours = training_flops_per_sample(recipe.model, tokens=48, image_tiles=(4,) * images, vocab_size=VOCAB,
                                     trainable=recipe.trainable_parts)
    print(f"{images} images, {trainable}: ours {ours:.4g}, counted {counted:.4g}, ratio {ours / counted:.4f}")
    assert ours == pytest.approx(counted, rel=0.05)


def test_an_image_of_fewer_tiles_counts_the_tiles_it_has():
    """One tile of a 4-tile model costs what the encoder computes for a model of one tile slot:
    the padding tiles it also computes are not useful work."""
    counted, one_tile_recipe = _cross_attention_counted("adapter", images=1, max_tiles=1)
    recipe = load_recipe(REPO / "recipes" / "demo_cross_attention.yaml",
                         [*tiny_with(TINY_OVERRIDES, CROSS_ATTENTION_OVERRIDES), "train.trainable=adapter"])
    assert recipe.model.tiled_vision.max_num_tiles == 4
    kwargs = {"tokens": 48, "vocab_size": VOCAB, "trainable": recipe.trainable_parts}
    ours = training_flops_per_sample(recipe.model, image_tiles=(1,), **kwargs)
    assert ours == pytest.approx(counted, rel=0.05)
    assert ours == training_flops_per_sample(one_tile_recipe.model, image_tiles=(1,), **kwargs)
    assert training_flops_per_sample(recipe.model, image_tiles=(4,), **kwargs) > ours
