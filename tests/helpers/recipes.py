"""The tiny recipes the tests train and build: overrides of recipes/demo*.yaml and small towers."""

from __future__ import annotations

from pathlib import Path

from mmscale.config.towers import CLIP_MEAN, CLIP_STD, VisionConfig

REPO = Path(__file__).resolve().parents[2]

RECIPE = str(REPO / "recipes" / "demo.yaml")


# Small enough to build in about a second, with enough shards for 2 ranks x 1 worker.
TINY_DATA = dict(train_samples=96, val_samples=32, samples_per_shard=24, image_size=32, vocab_size=512)


# A recipe small enough for a training step in tens of milliseconds.
TINY_OVERRIDES = [
    "model.vision.image_size=32",
    "model.vision.patch_size=8",
    "model.vision.hidden_size=32",
    "model.vision.num_layers=1",
    "model.vision.num_heads=2",
    "model.llm.hidden_size=64",
    "model.llm.num_layers=2",
    "model.llm.num_heads=4",
    "model.llm.num_kv_heads=2",
    "model.llm.intermediate_size=128",
    "data.max_seq_len=96",
    "data.shuffle_buffer=16",
    "train.micro_batch_size=4",
    "train.steps=6",
    "train.warmup_steps=2",
    "train.log_every=2",
    "train.val_every=3",
    "train.val_batches=2",
    "train.checkpoint_every=3",
    "train.eval_every=0",  # the tests of in-loop evaluation turn it on
]


# On top of TINY_OVERRIDES: a tiny Llama-3.2-Vision-style model (recipes/demo_cross_attention.yaml);
# the 32-px demo images become 2 x 2 tiles of 16 px, 4 patches and a class token each.
CROSS_ATTENTION_OVERRIDES = [
    "model.arch=cross_attention",
    "model.tiled_vision.image_size=16",
    "model.tiled_vision.patch_size=8",
    "model.tiled_vision.hidden_size=32",
    "model.tiled_vision.num_layers=2",
    "model.tiled_vision.num_global_layers=1",
    "model.tiled_vision.num_heads=2",
    "model.tiled_vision.intermediate_size=64",
    "model.tiled_vision.intermediate_layers=[0]",
    "model.llm.tie_embeddings=false",
    "model.cross_attention.layers=[1]",
]


# What the schema's model.vision defaults were before presets (SigLIP's layout with gelu, eps 1e-5
# and CLIP's statistics: no released tower), which the tests' small towers were written on.
TOY_TOWER = dict(preset=None, family="siglip", image_size=224, patch_size=16, hidden_size=768, num_layers=12,
                 num_heads=12, activation="gelu", layer_norm_eps=1e-5, image_mean=CLIP_MEAN, image_std=CLIP_STD)


def toy_vision(**fields: object) -> VisionConfig:
    """A VisionConfig of `fields`, the others as TOY_TOWER."""
    return VisionConfig(**{**TOY_TOWER, **fields})


def tiny_with(tiny: list[str], extra: list[str]) -> list[str]:
    """`tiny` (TINY_OVERRIDES, or the tiny_overrides fixture's) and then `extra`; where `extra` makes a
    cross-attention model (CROSS_ATTENTION_OVERRIDES), `tiny` without its model.vision keys: that
    section is a decoder VLM's, and a cross-attention model refuses it."""
    if "model.arch=cross_attention" in extra:
        tiny = [override for override in tiny if not override.startswith("model.vision.")]
    return [*tiny, *extra]


# On top of TINY_OVERRIDES: a tiny Molmo2-style model (recipes/demo_molmo2.yaml), features from both of its
# tower's two blocks (transformers' Molmo2 cannot take the embedding output). 24-px crops of 3 x 3
# patches overlapping by one: a 32-px image is an overview and 2 x 2 crops on a 40-px canvas,
# 4 + 9 image tokens whose edge windows are partly padding.
MOLMO2_OVERRIDES = [
    "model.vision.image_size=24",
    "model.vision.num_layers=2",
    "model.vision.feature_layers=[-1,1]",
    "model.crops.overlap_margins=[1,0]",
]
