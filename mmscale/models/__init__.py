"""The models: attention kernels, towers, connectors, LLMs, both VLM architectures, and `build_model`.

`build_model(recipe, tokenizer)` returns the model the recipe describes."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from mmscale.config.model import ModelConfig
from mmscale.data.multicrop import ImageTokenIds
from mmscale.data.tokenizer import image_token_id
from mmscale.errors import UserError
from mmscale.models.cross_attention_vlm import EXTRA_EMBEDDINGS, CrossAttentionVLM
from mmscale.models.decoder_vlm import DecoderVLM
from mmscale.models.molmo2 import Molmo2VLM


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


def image_token_ids_for(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> int | ImageTokenIds:
    """What `build_vlm` takes as `image_token_id`: the image token's id, or for connector.type=molmo2
    the ids of its image layout."""
    if cfg.is_molmo2:
        return ImageTokenIds.of_tokenizer(tokenizer)
    return image_token_id(tokenizer)


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> DecoderVLM | CrossAttentionVLM:
    return build_vlm(cfg, vocab_size_for(cfg, tokenizer), image_token_ids_for(cfg, tokenizer))


def build_vlm(
    cfg: ModelConfig, vocab_size: int, image_token_id: int | ImageTokenIds
) -> DecoderVLM | CrossAttentionVLM:
    """The model of `cfg`; under `torch.device("meta")` it is built without memory or weights, under
    `deepspeed.zero.Init` partitioned module by module (with the weights of a normal build).

    `image_token_id`: the image placeholder's id; for connector.type=molmo2 the ids of its image
    layout (an int there stands for all of them: enough for plans and meta builds).
    """
    if cfg.arch == "cross_attention":
        # The `<image>` token is an ordinary input token here: it marks where an image is
        # seen from (data.tiling.image_spans), and the model never splices features into it.
        return CrossAttentionVLM(cfg, vocab_size)
    if cfg.is_molmo2:
        tokens = image_token_id
        if isinstance(tokens, int):
            tokens = ImageTokenIds(tokens, (tokens,))
        return Molmo2VLM(cfg, vocab_size, tokens)
    return DecoderVLM(cfg, vocab_size, image_token_id)


__all__ = ["CrossAttentionVLM", "DecoderVLM", "Molmo2VLM", "build_model", "build_vlm", "image_token_ids_for"]
