"""The cross-attention VLM (Llama 3.2 Vision style; transformers' MllamaForConditionalGeneration).

The LLM keeps a text-only sequence. The tiled vision encoder's features, mapped to the
LLM width by the connector, are attended to from gated cross-attention layers that sit
between the LLM's self-attention blocks. Their tanh gates start at 0, so a fresh model
computes exactly what its text LLM computes. Which tiles a text token sees is given per
token by the cross-attention mask (batch, seq, images, tiles).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmscale.config.model import CrossAttentionModelConfig, LLMConfig
from mmscale.errors import UserError
from mmscale.models.attention import masked_attention, pack_layout
from mmscale.models.generate import KVCache, LayerCache
from mmscale.models.initialise import gathered, init_modules
from mmscale.models.llama import DecoderBlock, RMSNorm, SwiGLU, rope_cos_sin
from mmscale.models.loss import LossTokens, next_token_loss
from mmscale.models.mllama_vision import TiledVisionEncoder

# transformers' Mllama embeds 8 token ids beyond the output vocabulary (the image token
# among them), which the model reads but never predicts.
EXTRA_EMBEDDINGS = 8


def cross_attention_layer_indices(cfg: CrossAttentionModelConfig) -> tuple[int, ...]:
    """Positions of the cross-attention layers in the combined layer list."""
    num_self = cfg.llm.num_layers
    layers = cfg.cross_attention.layers
    if layers is None:
        # Llama 3.2 Vision: after self-attention blocks 3, 7, 11, ... -> [3, 8, 13, ...].
        layers = tuple(3 + 5 * k for k in range(num_self // 4))
    total = num_self + len(layers)
    if layers and layers[-1] >= total:
        raise UserError(
            f"model.cross_attention.layers {list(layers)} index past the {total} layers "
            f"(model.llm.num_layers={num_self} self-attention blocks plus {len(layers)} cross-attention layers)"
        )
    return layers


@dataclass(frozen=True)
class CrossAttentionMask:
    """Which vision tokens each text token attends to, derived once per forward."""

    keys: torch.Tensor  # bool (batch, 1, seq, vision_tokens)
    # 1.0 where the token sees at least one tile, else 0 (transformers'
    # full_text_row_masked_out_mask): zeroes the cross-attention layer's MLP branch.
    sees_image: torch.Tensor  # (batch, seq, 1)
    # 0 for tokens of a sample without (real) images, whose attention output is dropped
    # (transformers skips the cross-attention layers for a batch without images).
    has_keys: torch.Tensor


def build_cross_attention_mask(
    cross_attention_mask: torch.Tensor,
    real_images: torch.Tensor,
    tokens_per_tile: int,
    segment_ids: torch.Tensor | None,
    dtype: torch.dtype,
) -> CrossAttentionMask:
    """From the per-tile mask (batch, seq, images, tiles), 1 where a token may see a tile.

    `real_images` (batch, images) is False for the padding image slots of rows with fewer
    images. A token that sees no tile attends, as in transformers, to every tile of its
    sample's images (its MLP branch is zeroed, its attention branch is not); "its sample"
    is the row, or with `segment_ids` the token's packed sample. Unlike transformers, that
    fallback leaves out padding image slots, and a sample without images gets nothing
    from the cross-attention layers (as transformers gives a batch without images): so a
    sample's result does not depend on how many images the other samples of its batch
    have, and is the same packed or not. transformers' logits are matched exactly for
    every row whose image slots are all real.
    """
    tiles = cross_attention_mask.bool()
    sees_tile = tiles.flatten(2).any(-1)  # (batch, seq)
    if segment_ids is None:
        owned = real_images[:, None, :].expand(tiles.shape[:3])
    else:
        owned = _images_of_own_sample(tiles.any(-1), segment_ids) & real_images[:, None, :]
    fallback = owned[..., None].expand_as(tiles)
    has_keys = (sees_tile | owned.any(-1)).to(dtype)[..., None]
    allowed = torch.where(sees_tile[..., None, None], tiles, fallback)
    # A query with no key at all would make softmax NaN; its output is dropped anyway.
    keys = allowed.repeat_interleave(tokens_per_tile, dim=-1).flatten(2) | ~has_keys.bool()
    return CrossAttentionMask(keys[:, None], sees_image=sees_tile.to(dtype)[..., None], has_keys=has_keys)


def _images_of_own_sample(sees_image: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq, images) bool: whether any token of this token's sample sees the image."""
    # Per-sample sums by scatter, O(seq * images) rather than a seq x seq comparison.
    # Segment ids lie in [0, seq] (1..n for samples, 0 for padding).
    index = segment_ids.long()[..., None].expand_as(sees_image)
    batch, seq, images = sees_image.shape
    per_sample = sees_image.new_zeros(batch, seq + 1, images, dtype=torch.int32)
    per_sample.scatter_add_(1, index, sees_image.to(torch.int32))
    return per_sample.gather(1, index) > 0


class CrossAttention(nn.Module):
    """Text queries, vision keys/values; RMSNorm on each query and key head; no positions."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, vision: torch.Tensor, mask: CrossAttentionMask, cache: LayerCache | None = None
    ) -> torch.Tensor:
        """x: (batch, seq, hidden); vision: (batch, vision_tokens, hidden). While generating, `cache`
        keeps the images' keys and values from the prompt's forward for the answer's tokens."""
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.num_heads, self.head_dim)).transpose(1, 2)

        def project() -> tuple[torch.Tensor, torch.Tensor]:
            k = self.k_norm(self.k_proj(vision).view(b, -1, self.num_kv_heads, self.head_dim)).transpose(1, 2)
            return k, self.v_proj(vision).view(b, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)

        k, v = project() if cache is None else cache.cross(project)
        out = masked_attention(q, k, v, mask.keys).transpose(1, 2).reshape(b, s, -1)
        out = out * mask.has_keys
        return self.o_proj(out)


class CrossAttentionBlock(nn.Module):
    """Gated cross-attention and MLP; both tanh gates start at 0 (the block is the identity)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn = CrossAttention(cfg)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self, x: torch.Tensor, vision: torch.Tensor, mask: CrossAttentionMask, cache: LayerCache | None = None
    ) -> torch.Tensor:
        x = x + self.cross_attn_attn_gate.tanh() * self.cross_attn(self.input_layernorm(x), vision, mask, cache)
        mlp = self.mlp(self.post_attention_layernorm(x)) * mask.sees_image
        return x + self.cross_attn_mlp_gate.tanh() * mlp


class CrossAttentionLM(nn.Module):
    """Llama self-attention blocks interleaved with cross-attention blocks (transformers' layout)."""

    # A VLM runs it through hidden_states and output, never forward (convert.verify.computed_in_fp32).
    entered_by_methods = True

    def __init__(self, cfg: CrossAttentionModelConfig, vocab_size: int):
        super().__init__()
        llm = cfg.llm
        if llm.tie_embeddings:
            raise UserError(
                "model.llm.tie_embeddings must be false for model.arch=cross_attention: the embedding table "
                f"has {EXTRA_EMBEDDINGS} rows more than the output layer (as in transformers' Mllama)"
            )
        self.cfg = llm
        cross = set(cross_attention_layer_indices(cfg))
        self.embed_tokens = nn.Embedding(vocab_size + EXTRA_EMBEDDINGS, llm.hidden_size)
        self.layers = nn.ModuleList(
            CrossAttentionBlock(llm) if i in cross else DecoderBlock(llm) for i in range(llm.num_layers + len(cross))
        )
        self.norm = RMSNorm(llm.hidden_size, llm.rms_norm_eps)
        self.lm_head = nn.Linear(llm.hidden_size, vocab_size, bias=False)
        init_modules(self, _init_weights)

    @property
    def cross_layers(self) -> list[CrossAttentionBlock]:
        return [layer for layer in self.layers if isinstance(layer, CrossAttentionBlock)]

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        vision: torch.Tensor | None = None,
        mask: CrossAttentionMask | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab). Without `vision` the cross-attention blocks are skipped.
        With a `cache` (generation) the tokens continue those already in it."""
        return self.output(self.hidden_states(input_ids, position_ids, vision, mask, segment_ids, cache))

    def output(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm and output layer, position by position (see `LlamaLM.output`)."""
        return self.lm_head(self.norm(hidden))

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        vision: torch.Tensor | None = None,
        mask: CrossAttentionMask | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The last layer's output (batch, seq, hidden), before the final norm; arguments as for `forward`."""
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(position_ids, self.cfg)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        layout = pack_layout(segment_ids)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, CrossAttentionBlock):
                if vision is not None and cache is not None:
                    x = layer(x, vision, mask, cache.layer(i))
                elif vision is not None:
                    x = self._run(layer, x, vision, mask)
            elif cache is not None:
                x = layer(x, cos, sin, layout, cache.layer(i))
            else:
                x = self._run(layer, x, cos, sin, layout)
        return x

    def _run(self, layer: nn.Module, x: torch.Tensor, *args: object) -> torch.Tensor:
        if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, x, *args, use_reentrant=False)
        return layer(x, *args)


def _init_weights(module: nn.Module) -> None:
    # Llama's N(0, 0.02); the gates keep their zeros.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)


class CrossAttentionVLM(nn.Module):
    def __init__(self, cfg: CrossAttentionModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = TiledVisionEncoder(cfg.tiled_vision)
        # Mllama's multi_modal_projector: one Linear from the concatenated features.
        self.connector = nn.Linear(cfg.tiled_vision.output_dim, cfg.llm.hidden_size)
        with gathered(self.connector.parameters()):
            _init_weights(self.connector)
            nn.init.zeros_(self.connector.bias)
        self.language_model = CrossAttentionLM(cfg, vocab_size)

    def encode_images(
        self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, aspect_ratio_mask: torch.Tensor
    ) -> torch.Tensor:
        """Vision tokens (batch, images * tiles * num_patches, llm hidden) for cross-attention."""
        features = self.vision_tower(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        return self.connector(features).flatten(1, 3)

    def logits(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        aspect_ratio_ids: torch.Tensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab); shapes as in transformers' MllamaForConditionalGeneration.

        pixel_values (batch, images, max_num_tiles, 3, size, size) with aspect_ratio_ids
        (batch, images), aspect_ratio_mask (batch, images, max_num_tiles) and
        cross_attention_mask (batch, seq, images, max_num_tiles); packed rows list their
        samples' images in order and pass `segment_ids` and restarting `position_ids`.
        With a `cache` (see `generate.greedy`) the tokens continue those already in it: the
        prompt's images, encoded once, stay in the cache, and an answer's tokens pass only
        their own cross_attention_mask.
        """
        hidden = self.hidden_states(
            input_ids, pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask,
            position_ids, segment_ids, cache,
        )
        return self.language_model.output(hidden)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        aspect_ratio_ids: torch.Tensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """The LLM's last hidden states (batch, seq, hidden), before its final norm; inputs as for `logits`."""
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        if pixel_values is not None:
            _check_image_inputs(input_ids, pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask)
            images = self.encode_images(pixel_values, aspect_ratio_ids, aspect_ratio_mask), aspect_ratio_ids > 0
            if cache is not None:
                cache.images = images
        elif cache is not None and cache.images is not None:
            images = cache.images
        else:
            vision, mask = self._blank_vision(input_ids)
            return self.language_model.hidden_states(input_ids, position_ids, vision, mask, segment_ids, cache)
        vision, real_images = images  # real_images: False for a padding image slot (aspect ratio id 0)
        tokens_per_tile = self.cfg.tiled_vision.num_patches
        mask = build_cross_attention_mask(cross_attention_mask, real_images, tokens_per_tile, segment_ids, vision.dtype)
        return self.language_model.hidden_states(input_ids, position_ids, vision, mask, segment_ids, cache)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        aspect_ratio_ids: torch.Tensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        loss_tokens: LossTokens | None = None,
    ) -> torch.Tensor:
        """Next-token cross-entropy summed over the labelled tokens (labels != IGNORE_INDEX), divided
        by the optimizer step's labelled tokens (`loss_tokens`; by default this batch's: its mean)."""
        hidden = self.hidden_states(
            input_ids, pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask,
            position_ids, segment_ids,
        )
        return next_token_loss(hidden, labels, self.language_model.output, loss_tokens)

    def _blank_vision(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, CrossAttentionMask]:
        """Vision tokens of one blank single-tile image for every row, with a mask that zeroes both
        branches of every cross-attention layer: the logits stay exactly the text LLM's.

        A text-only batch still runs the vision and cross-attention parameters, and in the order
        a batch with images runs them: every rank must use the same parameters in every step,
        and ZeRO-3 gathers them module by module as they run, so a rank that skipped them or ran
        them in another order would hang or mismatch its peers' collectives (DecoderVLM also
        runs its tower on a blank image).
        """
        vcfg = self.cfg.tiled_vision
        device = input_ids.device
        blank = torch.zeros(1, 1, vcfg.max_num_tiles, 3, vcfg.image_size, vcfg.image_size, device=device)
        tile_mask = torch.zeros(1, 1, vcfg.max_num_tiles, dtype=torch.long, device=device)
        tile_mask[..., 0] = 1
        vision = self.encode_images(blank, torch.ones(1, 1, dtype=torch.long, device=device), tile_mask)
        batch, seq = input_ids.shape
        sees_nothing = vision.new_zeros(batch, seq, 1)
        mask = CrossAttentionMask(
            # Every key allowed keeps the softmax finite; has_keys then zeroes the output.
            keys=torch.ones(batch, 1, seq, vision.shape[1], dtype=torch.bool, device=device),
            sees_image=sees_nothing,
            has_keys=sees_nothing,
        )
        return vision.expand(batch, -1, -1), mask


def _check_image_inputs(
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    aspect_ratio_ids: torch.Tensor | None,
    aspect_ratio_mask: torch.Tensor | None,
    cross_attention_mask: torch.Tensor | None,
) -> None:
    if aspect_ratio_ids is None or aspect_ratio_mask is None or cross_attention_mask is None:
        raise ValueError("pixel_values need aspect_ratio_ids, aspect_ratio_mask and cross_attention_mask")
    batch, images, tiles = pixel_values.shape[:3]
    expected = {
        "aspect_ratio_ids": (aspect_ratio_ids, (batch, images)),
        "aspect_ratio_mask": (aspect_ratio_mask, (batch, images, tiles)),
        "cross_attention_mask": (cross_attention_mask, (*input_ids.shape, images, tiles)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected {shape} for pixel_values {tuple(pixel_values.shape)}"
            )
