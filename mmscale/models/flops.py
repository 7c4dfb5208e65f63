"""Training FLOPs per sample, from the model config: the numerator of MFU.

Counts the matrix multiplications the model runs, 2 FLOPs per multiply-add: every
Linear and convolution, and attention's two products (scores and weighted values) over
the full query x key square, causal or not (the convention of PaLM's MFU and
torchtitan). Norms, activations, softmax and embedding lookups are left out. A training
step is 3x the forward: the backward computes gradients of both inputs and weights.

A packed row is counted sample by sample: each sample's attention square is its own, as
flash-attn's variable-length kernel computes it (SDPA's dense mask computes the row's
whole square; that waste is not useful work, so it stays out of MFU).
"""

from __future__ import annotations

from mmscale.config.schema import POOL_WINDOW, LLMConfig, ModelConfig, TiledVisionConfig, VisionConfig
from mmscale.models.cross_attention_vlm import cross_attention_layer_indices
from mmscale.models.mllama_vision import PATCH_PAD_MULTIPLE

TRAIN_MULTIPLIER = 3  # forward + backward (input and weight gradients)


def linear(tokens: int, n_in: int, n_out: int) -> int:
    return 2 * tokens * n_in * n_out


def attention_products(queries: int, keys: int, width: int) -> int:
    """QK^T and attention x V over all heads (`width` = heads x head_dim)."""
    return 2 * linear(queries, width, keys)


def llm_block(cfg: LLMConfig, tokens: int, context: int | None = None) -> int:
    """One Llama block over `tokens` that attend to `context` keys (default: themselves)."""
    d = cfg.hidden_size
    kv = _kv_width(cfg)
    projections = linear(tokens, d, d) * 2 + linear(tokens, d, kv) * 2
    mlp = linear(tokens, d, cfg.intermediate_size) * 3
    return projections + mlp + attention_products(tokens, context or tokens, d)


def llm_forward(cfg: LLMConfig, tokens: int, vocab_size: int) -> int:
    """The decoder over one sample of `tokens` tokens, including the output head on every position."""
    return cfg.num_layers * llm_block(cfg, tokens) + linear(tokens, cfg.hidden_size, vocab_size)


def vit_block(tokens: int, width: int, mlp: int) -> int:
    return linear(tokens, width, width) * 4 + linear(tokens, width, mlp) * 2 + attention_products(tokens, tokens, width)


def vision_tower_forward(cfg: VisionConfig, class_token: bool) -> int:
    """One image through the patch embedding and the blocks the tower builds (up to its deepest feature layer)."""
    patches = cfg.num_patches
    tokens = patches + int(class_token)
    embed = linear(patches, 3 * cfg.patch_size**2, cfg.hidden_size)
    return embed + cfg.depth * vit_block(tokens, cfg.hidden_size, cfg.mlp_size)


def connector_forward(cfg: ModelConfig) -> int:
    """One image's features through the connector into the LLM width."""
    tokens = cfg.connector.image_tokens(cfg.vision)
    d = cfg.llm.hidden_size
    if cfg.connector.type == "molmo":
        n_in, width, window = cfg.vision.feature_size, cfg.vision.hidden_size, POOL_WINDOW**2
        # One query per pooled token against its window's patches, which are all keys and values.
        pool = (
            linear(tokens, n_in, width) * (1 + 2 * window)
            + attention_products(tokens, window, width)
            + linear(tokens, width, width)
        )
        return pool + linear(tokens, width, cfg.llm.intermediate_size) * 2 + linear(tokens, cfg.llm.intermediate_size, d)
    n_in = cfg.vision.feature_size * (POOL_WINDOW**2 if cfg.connector.pools else 1)
    first = linear(tokens, n_in, d)
    return first if cfg.connector.type == "linear" else first + linear(tokens, d, d)


def decoder_vlm_forward(cfg: ModelConfig, tokens: int, images: int, vocab_size: int) -> int:
    """Forward FLOPs of one sample of a decoder VLM: `tokens` in the sequence (image tokens included)."""
    per_image = vision_tower_forward(cfg.vision, cfg.vision.family == "clip") + connector_forward(cfg)
    return images * per_image + llm_forward(cfg.llm, tokens, vocab_size)


def tiled_vision_forward(cfg: TiledVisionConfig) -> int:
    """One image through the tiled encoder: every tile slot is computed, real or padding, and
    the local and global layers attend over all tiles' tokens (padded to a multiple of 8)."""
    patches = (cfg.image_size // cfg.patch_size) ** 2
    tokens = cfg.max_num_tiles * -(-cfg.num_patches // PATCH_PAD_MULTIPLE) * PATCH_PAD_MULTIPLE
    embed = linear(cfg.max_num_tiles * patches, 3 * cfg.patch_size**2, cfg.hidden_size)
    layers = cfg.num_layers + cfg.num_global_layers
    return embed + layers * vit_block(tokens, cfg.hidden_size, cfg.intermediate_size)


def cross_attention_vlm_forward(cfg: ModelConfig, tokens: int, images: int, vocab_size: int) -> int:
    """Forward FLOPs of one sample of a cross-attention VLM: `tokens` text tokens, `images` images.

    Each cross-attention layer projects the sample's vision tokens to keys and values once,
    and its text queries attend to them.
    """
    vision, llm = cfg.tiled_vision, cfg.llm
    vision_tokens = images * vision.max_num_tiles * vision.num_patches
    per_image = tiled_vision_forward(vision) + linear(vision.max_num_tiles * vision.num_patches, vision.output_dim, llm.hidden_size)
    cross_layers = len(cross_attention_layer_indices(cfg))
    cross = llm_block(llm, tokens, context=vision_tokens) - linear(tokens, llm.hidden_size, _kv_width(llm)) * 2
    cross += linear(vision_tokens, llm.hidden_size, _kv_width(llm)) * 2  # keys and values come from the images
    return images * per_image + cross_layers * cross + llm_forward(llm, tokens, vocab_size)


def _kv_width(cfg: LLMConfig) -> int:
    return cfg.num_kv_heads * (cfg.hidden_size // cfg.num_heads)


def training_flops_per_sample(cfg: ModelConfig, tokens: int, images: int, vocab_size: int) -> int:
    """Forward + backward FLOPs of one sample (see the module docstring for what counts).

    `tokens`: the sample's sequence length (for decoder VLMs including its image tokens).
    """
    if cfg.arch == "decoder":
        forward = decoder_vlm_forward(cfg, tokens, images, vocab_size)
    else:
        forward = cross_attention_vlm_forward(cfg, tokens, images, vocab_size)
    return TRAIN_MULTIPLIER * forward
