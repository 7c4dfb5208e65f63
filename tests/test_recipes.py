"""The real-size recipes: each validates, builds on the meta device (no memory, no weights),
and has the size of the published model it reproduces.

The published counts are checked here too, against `transformers` models of the published
configs built on the meta device, and the recipes against those configs the way
`model.pretrained` checks a folder before loading it.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MllamaConfig,
    MllamaForConditionalGeneration,
    Molmo2Config,
    Molmo2ForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from mmscale.config import Recipe, load_recipe
from mmscale.models import build_vlm
from mmscale.models.hf import llama, llava, mllama, molmo2
from mmscale.models.pretrained import check_agrees
from tests.helpers.recipes import REPO

TOLERANCE = 0.005

# Parameter counts of the released checkpoints.
LLAVA15_7B = 7_063_427_072  # llava-hf/llava-1.5-7b-hf
LLAMA32_11B_VISION = 10_670_220_835  # meta-llama/Llama-3.2-11B-Vision
MOLMO_7B_D = 8_021_025_280  # allenai/Molmo-7B-D-0924
# allenai/Molmo2-8B: transformers' Molmo2ForConditionalGeneration at its config (the hub lists it
# rounded, as "9B"; no exact count is published).
MOLMO2_8B = 8_661_703_120

# Molmo-7B-D's connector, from its released modelling code: "attention-meanq" 2x2 pooling over
# the two concatenated ViT layers (wq, wk, wv: 2048 -> 16 heads x 64, wo: 1024 -> 1024, biased),
# a SwiGLU projector without biases (w1, w3: 1024 -> 18944; w2: 18944 -> 3584) and pad_embed
# (2 x 2048, which only multi-crop uses). 7,344,128 + 106,692,608 + 4,096 = 114,040,832.
MOLMO_CONNECTOR = 3 * (2048 * 1024 + 1024) + (1024 * 1024 + 1024) + 2 * 1024 * 18944 + 18944 * 3584 + 2 * 2048


@dataclass(frozen=True)
class Case:
    recipe: str
    published: int
    image_tokens: int
    trainable: tuple[str, ...]


CASES = [
    # Our CLIP tower builds only up to its deepest feature layer (-2, block 23 of 24) and skips
    # the unused post_layernorm, so it is one ViT-L block (12,596,224) + 2,048 below llava-hf's.
    Case("llava15_7b_align", LLAVA15_7B, 576, ("connector",)),
    Case("llava15_7b_finetune", LLAVA15_7B, 576, ("connector", "llm")),
    Case("llama32_11b_vision_adapter", LLAMA32_11B_VISION, 1, ("vision_tower", "connector", "cross_attention")),
    # Ours lacks one ViT block (Molmo keeps 23 of 24, we build the 22 its features need),
    # Molmo's 128 extra embedding rows and its pad_embed.
    Case("molmo_7b_style", MOLMO_7B_D, 144, ("vision_tower", "connector", "llm")),
    # The longest multi-crop layout (8 crops) rather than a fixed count per image.
    Case("molmo2_style", MOLMO2_8B, 1400, ("vision_tower", "connector", "llm")),
]


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # tied weights once


def load(name: str) -> Recipe:
    return load_recipe(REPO / "recipes" / f"{name}.yaml")


def build_meta(recipe: Recipe) -> nn.Module:
    with torch.device("meta"):
        return build_vlm(recipe.model, recipe.model.llm.vocab_size, image_token_id=0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.recipe)
def test_recipe_builds_at_the_published_size(case: Case):
    recipe = load(case.recipe)  # validates every section
    model = build_meta(recipe)
    assert recipe.model.image_tokens == case.image_tokens
    assert recipe.trainable_parts == case.trainable
    parts = {name: count(child) for name, child in model.named_children()}
    total = count(model)
    print(f"\n{case.recipe}: " + ", ".join(f"{k} {v:,}" for k, v in parts.items()) + f"; total {total:,}")
    print(f"  published {case.published:,}: {100 * (total / case.published - 1):+.3f}%")
    assert abs(total - case.published) <= TOLERANCE * case.published


# The published architectures as transformers configs (released configs differ only in fields
# that do not change parameter counts: dtype, token ids, rope_scaling's spelling).
CLIP_L14_336 = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
VICUNA_7B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "vocab_size": 32064,
}
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def llava_config() -> LlavaConfig:
    return LlavaConfig(
        vision_config=CLIP_L14_336,
        text_config=VICUNA_7B,
        image_token_index=32000,
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )


def mllama_config() -> MllamaConfig:
    # transformers' defaults are Llama-3.2-11B-Vision's except the tile size (448 there).
    return MllamaConfig(vision_config={"image_size": 560}, text_config={"rope_parameters": LLAMA31_ROPE})


def qwen2_7b_config() -> Qwen2Config:
    return Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, rope_theta=1000000.0,
                       rms_norm_eps=1e-6)


def molmo_7b_d_reference() -> int:
    """Molmo-7B-D from its parts: Qwen2-7B with 128 extra embedding rows, the CLIP tower's first
    23 blocks without the final LayerNorm, and the connector above."""
    vision = CLIPVisionModel(CLIPVisionConfig(**{**CLIP_L14_336, "num_hidden_layers": 23}))
    qwen2 = Qwen2ForCausalLM(qwen2_7b_config())
    return count(qwen2) + 128 * 3584 + count(vision) - count(vision.post_layernorm) + MOLMO_CONNECTOR


def test_published_counts_are_those_of_the_published_architectures():
    with torch.device("meta"):
        assert count(LlavaForConditionalGeneration(llava_config())) == LLAVA15_7B
        assert count(MllamaForConditionalGeneration(mllama_config())) == LLAMA32_11B_VISION
        assert molmo_7b_d_reference() == MOLMO_7B_D


def molmo2_8b_config() -> Molmo2Config:
    """allenai/Molmo2-8B's config as transformers reads it (its 27-block tower trimmed to the 25 the
    weights hold, the adapter reading blocks 24 and 18 counted from 0)."""
    return Molmo2Config(
        vision_config={"num_hidden_layers": 25},
        adapter_config={"vision_feature_layer": [24, 18], "intermediate_size": 12288, "text_hidden_size": 4096},
        text_config={"rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}},
    )


def test_molmo2_recipe_is_molmo2_8b_part_by_part():
    recipe = load("molmo2_style")
    ours = build_meta(recipe)
    with torch.device("meta"):
        theirs = Molmo2ForConditionalGeneration(molmo2_8b_config())
    assert count(theirs) == MOLMO2_8B
    assert count(ours.vision_tower) == count(theirs.model.vision_tower)
    assert count(ours.connector) == count(theirs.model.multi_modal_projector)
    assert count(ours.language_model) == count(theirs.model.language_model) + count(theirs.lm_head)
    # Its processor_config.json: column tokens after the crops' rows, none in the overview.
    processor = {"image_use_col_tokens": True, "use_single_crop_col_tokens": False}
    released = molmo2.config_from_hf(molmo2_8b_config().to_dict(), None, processor)
    for section in ("vision", "connector", "crops", "llm"):
        check_agrees(getattr(recipe.model, section), getattr(released, section), f"model.{section}", "Molmo2-8B")


def test_molmo_connector_has_molmos_parameters():
    ours = build_meta(load("molmo_7b_style"))
    assert count(ours.connector) == MOLMO_CONNECTOR - 2 * 2048  # all but pad_embed


def test_llava_parts_match_transformers_but_the_unbuilt_blocks():
    recipe = load("llava15_7b_finetune")
    ours = build_meta(recipe)
    with torch.device("meta"):
        theirs = LlavaForConditionalGeneration(llava_config())
    tower = theirs.model.vision_tower
    unbuilt = tower.encoder.layers[recipe.model.vision.depth :]
    assert count(ours.vision_tower) == count(tower) - count(unbuilt) - count(tower.post_layernorm)
    assert count(ours.connector) == count(theirs.model.multi_modal_projector)
    assert count(ours.language_model) == count(theirs.model.language_model) + count(theirs.lm_head)


def test_llama32_vision_parts_match_transformers():
    ours = build_meta(load("llama32_11b_vision_adapter"))
    with torch.device("meta"):
        theirs = MllamaForConditionalGeneration(mllama_config())
    assert count(ours.vision_tower) == count(theirs.model.vision_model)
    assert count(ours.connector) == count(theirs.model.multi_modal_projector)
    assert count(ours.language_model) == count(theirs.model.language_model) + count(theirs.lm_head)


@pytest.mark.parametrize("name", ["llava15_7b_align", "llava15_7b_finetune", "molmo_7b_style"])
def test_decoder_recipes_describe_the_released_weights(name: str):
    """As model.pretrained checks a folder: the recipe's sections equal the released config's."""
    theirs = llava.config_from_hf(llava_config().to_dict())
    model = load(name).model
    check_agrees(model.vision, theirs.vision, "model.vision", "clip-vit-large-patch14-336")
    if name != "molmo_7b_style":  # Molmo's connector and Qwen2 LLM are not LLaVA's
        check_agrees(model.connector, theirs.connector, "model.connector", "llava-1.5-7b-hf")
        check_agrees(model.llm, theirs.llm, "model.llm", "llava-1.5-7b-hf")
    else:  # its LLM is Qwen2-7B's, as model.pretrained.llm will check the folder
        qwen2 = llama.config_from_hf({**qwen2_7b_config().to_dict(), "vocab_size": model.llm.vocab_size})
        check_agrees(model.llm, qwen2, "model.llm", "Qwen2-7B")


def test_llama32_recipe_describes_the_released_weights():
    theirs = mllama.config_from_hf(mllama_config().to_dict())
    model = load("llama32_11b_vision_adapter").model
    for section in ("tiled_vision", "cross_attention", "llm"):
        check_agrees(getattr(model, section), getattr(theirs, section), f"model.{section}", "Llama-3.2-11B-Vision")
