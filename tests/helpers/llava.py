"""A tiny transformers LLaVA (CLIP or SigLIP towers; Llama, Qwen2 or Qwen3 LLMs) and token ids to feed it."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, Qwen2Config, Qwen3Config, SiglipVisionConfig

IMAGE_ID, PAD_ID, VOCAB, TOKENS = 5, 0, 128, 16  # 32 px images in 8 px patches: 16 tokens

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8}

TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": VOCAB, "rms_norm_eps": 1e-5}


# CLIP as in LLaVA-1.5 (second-to-last layer, class token dropped, untied head); SigLIP with
# two concatenated layers, every token kept, a bias-free projector and a tied head.
VARIANTS = {
    "clip": {"vision_config": CLIPVisionConfig(**VISION), "vision_feature_layer": -2,
             "vision_feature_select_strategy": "default"},
    "siglip": {"vision_config": SiglipVisionConfig(**VISION), "vision_feature_layer": [-3, -1],
               "vision_feature_select_strategy": "full", "multimodal_projector_bias": False,
               "tie_word_embeddings": True},
}


# Qwen-family LLMs under the same towers (LLaVA-OneVision and most recent VLMs sit on Qwen2/2.5;
# Qwen3's heads are 32 wide here, not hidden_size / heads = 16).
VARIANTS |= {"siglip_qwen2": VARIANTS["siglip"], "clip_qwen3": VARIANTS["clip"]}

TEXT_CONFIGS = {"siglip_qwen2": (Qwen2Config, {}), "clip_qwen3": (Qwen3Config, {"head_dim": 32})}


def hf_config(variant: str) -> LlavaConfig:
    config_class, extra = TEXT_CONFIGS.get(variant, (LlamaConfig, {}))
    text = config_class(**TEXT, **extra, tie_word_embeddings=VARIANTS[variant].get("tie_word_embeddings", False))
    return LlavaConfig(text_config=text, image_token_id=IMAGE_ID, **VARIANTS[variant])


def sample_ids(n_images: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(IMAGE_ID + 1, VOCAB, (length,), generator=g)
    for i in range(n_images):
        ids[2 + i * (TOKENS + 3) : 2 + i * (TOKENS + 3) + TOKENS] = IMAGE_ID
    return ids


SAMPLES = [(sample_ids(1, 24, 1), torch.randn(1, 3, 32, 32)), (sample_ids(2, 45, 2), torch.randn(2, 3, 32, 32))]
