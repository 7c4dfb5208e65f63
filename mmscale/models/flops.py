"""Training FLOPs per sample, from the model config and what trains: the numerator of MFU.

Counts the matrix multiplications the model runs, 2 FLOPs per multiply-add: every
Linear and convolution, and attention's two products (scores and weighted values) over
the full query x key square, causal or not (the convention of PaLM's MFU and
torchtitan). Norms, activations, softmax and embedding lookups are left out, and so are
VIRAL's projector (under 0.2% of a 7B model's FLOPs) and activation checkpointing's
recomputation (MFU counts the model's work, not the hardware's).

The backward runs only where gradients are needed, part by part (`train.trainable`):
- a trainable part: forward + gradients of its weights and of its inputs, 3x its forward
  (the usual 6N-per-token convention);
- a frozen part that gradients pass through, to a trainable part below it (a frozen LLM
  over a trained connector): forward + input gradients, 2x its weight products and 3x its
  attention products (whose backward differentiates both operands);
- a frozen part with nothing trainable below it (LLaVA's vision tower): its forward alone.
A part is one unit: the first layer of a trainable part with nothing trainable below it
needs no input gradients, nor does a frozen cross-attention layer's vision side when only
the LLM trains, yet both are counted with them (within 3% of torch's FLOP counter on the
tests' models: tests/models/test_flops.py).

`training_flops_per_sample` counts the output head at every position of a sample; training
runs it only where a label follows (mmscale.models.loss), so a batch's FLOPs are its samples'
less `output_layer_training` at its unlabelled positions (what the trainer counts).

A packed row is counted sample by sample: each sample's attention square is its own, as
flash-attn's variable-length kernel computes it (SDPA's dense mask computes the row's
whole square; that waste is not useful work, so it stays out of MFU). For the same
reason a tiled image counts the tiles it has, not the `max_num_tiles` slots the encoder
computes.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from mmscale.config.model import POOL_WINDOW, CrossAttentionModelConfig, DecoderModelConfig, LLMConfig, ModelConfig
from mmscale.config.towers import TiledVisionConfig, VisionConfig
from mmscale.models.cross_attention_vlm import cross_attention_layer_indices
from mmscale.models.mllama_vision import PATCH_PAD_MULTIPLE


@dataclass(frozen=True)
class Flops:
    """Forward FLOPs of a part: products with its weights, and attention's products of activations."""

    weights: int = 0
    attention: int = 0

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.weights + other.weights, self.attention + other.attention)

    def __rmul__(self, n: int) -> Flops:
        return Flops(n * self.weights, n * self.attention)

    @property
    def forward(self) -> int:
        return self.weights + self.attention

    def training(self, trainable: bool, gradients_through: bool) -> int:
        """Forward and backward FLOPs of the part (see the module docstring)."""
        if trainable:
            return 3 * self.forward
        if gradients_through:
            return 2 * self.weights + 3 * self.attention
        return self.forward


def linear(tokens: int, n_in: int, n_out: int) -> int:
    return 2 * tokens * n_in * n_out


def attention_products(queries: int, keys: int, width: int) -> int:
    """QK^T and attention x V over all heads (`width` = heads x head_dim)."""
    return 2 * linear(queries, width, keys)


def llm_block(cfg: LLMConfig, tokens: int, context: int | None = None) -> Flops:
    """One Llama block over `tokens` that attend to `context` keys (default: themselves)."""
    d, width = cfg.hidden_size, cfg.num_heads * cfg.head_size  # width = d unless head_dim is set apart
    kv = _kv_width(cfg)
    projections = linear(tokens, d, width) * 2 + linear(tokens, d, kv) * 2
    mlp = linear(tokens, d, cfg.intermediate_size) * 3
    return Flops(projections + mlp, attention_products(tokens, context or tokens, width))


def output_layer(cfg: LLMConfig, tokens: int, vocab_size: int) -> Flops:
    """The output head over `tokens` positions."""
    return Flops(linear(tokens, cfg.hidden_size, vocab_size))


def output_layer_training(cfg: ModelConfig, positions: int, vocab_size: int, trainable: Collection[str]) -> int:
    """Training FLOPs of the output head at `positions` positions, as `training_flops_per_sample`
    counts it (it trains with the LLM; gradients pass it to any trainable part below)."""
    through = any(part in trainable for part in ("vision_tower", "connector", "cross_attention"))
    return output_layer(cfg.llm, positions, vocab_size).training("llm" in trainable, through)


def vit_block(tokens: int, width: int, mlp: int) -> Flops:
    return Flops(linear(tokens, width, width) * 4 + linear(tokens, width, mlp) * 2,
                 attention_products(tokens, tokens, width))


def vision_tower_forward(cfg: VisionConfig, class_token: bool) -> Flops:
    """One image through the patch embedding and the blocks the tower builds (up to its deepest feature layer)."""
    patches = cfg.num_patches
    tokens = patches + int(class_token)
    embed = Flops(linear(patches, 3 * cfg.patch_size**2, cfg.hidden_size))
    return embed + cfg.depth * vit_block(tokens, cfg.hidden_size, cfg.mlp_size)


def connector_forward(cfg: DecoderModelConfig) -> Flops:
    """One image's features through the connector into the LLM width."""
    tokens = cfg.connector.tokens_per_crop(cfg.vision)
    d = cfg.llm.hidden_size
    if cfg.connector.type in ("molmo", "molmo2"):
        n_in, width, window = cfg.vision.feature_size, cfg.vision.hidden_size, POOL_WINDOW**2
        inner = cfg.connector.intermediate_size or cfg.llm.intermediate_size
        # One query per pooled token against its window's patches, which are all keys and values.
        pool = Flops(
            linear(tokens, n_in, width) * (1 + 2 * window) + linear(tokens, width, width),
            attention_products(tokens, window, width),
        )
        projector = linear(tokens, width, inner) * 2 + linear(tokens, inner, d)
        return pool + Flops(projector)
    n_in = cfg.vision.feature_size * (POOL_WINDOW**2 if cfg.connector.pools else 1)
    first = linear(tokens, n_in, d)
    return Flops(first if cfg.connector.type == "linear" else first + linear(tokens, d, d))


def decoder_vlm_training(
    cfg: DecoderModelConfig, tokens: int, images: int, vocab_size: int, trainable: Collection[str]
) -> int:
    """Training FLOPs of one sample of a decoder VLM: `tokens` in the sequence (image tokens
    included). Its parts run in the order vision tower, connector, LLM."""
    tower, connector = "vision_tower" in trainable, "connector" in trainable
    llm = cfg.llm.num_layers * llm_block(cfg.llm, tokens) + output_layer(cfg.llm, tokens, vocab_size)
    return (
        images * vision_tower_forward(cfg.vision, cfg.vision.family == "clip").training(tower, False)
        + images * connector_forward(cfg).training(connector, tower)
        + llm.training("llm" in trainable, tower or connector)
    )


def tiled_vision_forward(cfg: TiledVisionConfig, tiles: int) -> Flops:
    """One image of `tiles` tiles through the tiled encoder: its local and global layers attend
    over all its tiles' tokens (padded to a multiple of 8)."""
    patches = (cfg.image_size // cfg.patch_size) ** 2
    tokens = tiles * -(-cfg.num_patches // PATCH_PAD_MULTIPLE) * PATCH_PAD_MULTIPLE
    embed = Flops(linear(tiles * patches, 3 * cfg.patch_size**2, cfg.hidden_size))
    return embed + (cfg.num_layers + cfg.num_global_layers) * vit_block(tokens, cfg.hidden_size, cfg.intermediate_size)


def cross_attention_vlm_training(
    cfg: CrossAttentionModelConfig, tokens: int, image_tiles: tuple[int, ...], vocab_size: int,
    trainable: Collection[str],
) -> int:
    """Training FLOPs of one sample of a cross-attention VLM: `tokens` text tokens and images
    of `image_tiles` tiles each.

    The images run through the tower and the connector, whose output every cross-attention
    layer projects to keys and values once; the text runs through the LLM's blocks, the
    cross-attention layers among them. Gradients reach the LLM's blocks below the first
    cross-attention layer only when the LLM itself trains.
    """
    vision, llm = cfg.tiled_vision, cfg.llm
    tower, connector, cross, lm = (
        part in trainable for part in ("vision_tower", "connector", "cross_attention", "llm")
    )
    vision_tokens = sum(image_tiles) * vision.num_patches
    kv_width = _kv_width(llm)
    attending = llm_block(llm, tokens, context=vision_tokens)
    # Keys and values come from the images, not from the text.
    keys_values = linear(vision_tokens, llm.hidden_size, kv_width) * 2 - linear(tokens, llm.hidden_size, kv_width) * 2
    per_cross_layer = Flops(attending.weights + keys_values, attending.attention)
    layers = cross_attention_layer_indices(cfg)
    below = layers[0] if layers else llm.num_layers  # self-attention blocks under the first cross-attention layer
    block = llm_block(llm, tokens)
    return (
        sum(tiled_vision_forward(vision, tiles).training(tower, False) for tiles in image_tiles)
        + Flops(linear(vision_tokens, vision.output_dim, llm.hidden_size)).training(connector, tower)
        + len(layers) * per_cross_layer.training(cross, tower or connector or lm)
        + (below * block).training(lm, False)
        + ((llm.num_layers - below) * block + output_layer(llm, tokens, vocab_size)).training(
            lm, tower or connector or cross
        )
    )


def training_flops_per_sample(
    cfg: ModelConfig, tokens: int, image_tiles: tuple[int, ...], vocab_size: int, trainable: Collection[str]
) -> int:
    """Forward + backward FLOPs of one sample whose `trainable` parts train (see the module docstring).

    `tokens`: the sample's sequence length (for decoder VLMs including its image tokens);
    `image_tiles`: the tiles of each of its images (1 for each square image; its crops, overview
    included, for connector.type=molmo2, which encodes and pools each crop alike).
    """
    if cfg.arch == "decoder":
        crops = sum(image_tiles) if cfg.is_molmo2 else len(image_tiles)
        return decoder_vlm_training(cfg, tokens, crops, vocab_size, trainable)
    return cross_attention_vlm_training(cfg, tokens, image_tiles, vocab_size, trainable)


def _kv_width(cfg: LLMConfig) -> int:
    return cfg.num_kv_heads * cfg.head_size
