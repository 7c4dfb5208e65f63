"""Model building: `build_model(recipe, tokenizer)` returns the model the recipe describes."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from mmscale.config.schema import ModelConfig
from mmscale.data.tokenizer import image_token_id
from mmscale.errors import UserError
from mmscale.models.cross_attention_vlm import EXTRA_EMBEDDINGS, CrossAttentionVLM
from mmscale.models.decoder_vlm import DecoderVLM, image_tokens_per_image


def vocab_size_for(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    if cfg.llm.vocab_size is not None:
        # Mllama's embedding table reads 8 ids beyond the output vocabulary (its <|image|> among them),
        # Molmo2's additional_vocab_size (its image markers).
        extra = EXTRA_EMBEDDINGS if cfg.arch == "cross_attention" else cfg.llm.additional_vocab_size
        readable = cfg.llm.vocab_size + extra
        if readable < len(tokenizer):
            raise UserError(f"model.llm.vocab_size={cfg.llm.vocab_size} is below the tokenizer's {len(tokenizer)} tokens")
        return cfg.llm.vocab_size
    return -(-len(tokenizer) // 64) * 64


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> DecoderVLM | CrossAttentionVLM:
    return build_vlm(cfg, vocab_size_for(cfg, tokenizer), image_token_id(tokenizer))


def build_vlm(cfg: ModelConfig, vocab_size: int, image_token_id: int) -> DecoderVLM | CrossAttentionVLM:
    """The model of `cfg`; under `torch.device("meta")` it is built without memory or weights, under
    `deepspeed.zero.Init` partitioned module by module (with the weights of a normal build)."""
    if cfg.arch == "cross_attention":
        # The `<image>` token is an ordinary input token here: it marks where an image is
        # seen from (data.tiling.image_spans), and the model never splices features into it.
        return CrossAttentionVLM(cfg, vocab_size)
    return DecoderVLM(cfg, vocab_size, image_token_id)


__all__ = ["CrossAttentionVLM", "DecoderVLM", "build_model", "build_vlm", "image_tokens_per_image"]
