"""Model building: `build_model(recipe, tokenizer)` returns the model the recipe describes."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from mmscale.config.schema import ModelConfig
from mmscale.data.schema import IMAGE_PLACEHOLDER
from mmscale.errors import UserError
from mmscale.models.decoder_vlm import DecoderVLM, image_tokens_per_image


def vocab_size_for(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    if cfg.llm.vocab_size is not None:
        if cfg.llm.vocab_size < len(tokenizer):
            raise UserError(f"model.llm.vocab_size={cfg.llm.vocab_size} is below the tokenizer's {len(tokenizer)} tokens")
        return cfg.llm.vocab_size
    return -(-len(tokenizer) // 64) * 64


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> DecoderVLM:
    return DecoderVLM(cfg, vocab_size_for(cfg, tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER))


__all__ = ["DecoderVLM", "build_model", "image_tokens_per_image"]
