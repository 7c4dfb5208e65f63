"""The tiled vision encoder of Llama 3.2 Vision (transformers' MllamaVisionModel).

An image arrives as up to `max_num_tiles` square tiles plus an aspect-ratio id naming its
tile grid. Each tile becomes a class token and patch tokens; positional embeddings know
the tile's place in the grid. A local transformer runs over all tiles of an image at once
(the sequence is tiles x padded patches), a gated global transformer follows, and the
output is the global features concatenated with chosen local layers' features.

Parameter names follow transformers' MllamaVisionModel so import is a prefix rename.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmscale.config.towers import TiledVisionConfig
from mmscale.models.attention import masked_attention
from mmscale.models.initialise import init_modules
from mmscale.models.vision import run_layer

# The local transformer pads each tile's tokens to a multiple of this (as Meta's and
# transformers' code do, for kernel-friendly shapes); the padding is masked.
PATCH_PAD_MULTIPLE = 8


def tile_padding_mask(
    aspect_ratio_mask: torch.Tensor, real_tokens: int, padded_tokens: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive mask (images, 1, tiles * padded_tokens, tiles * padded_tokens) of the encoder.

    As in Meta's and transformers' code, only pairs of two padding tokens (tokens of an
    absent tile, or the padding after a tile's real tokens) are masked: real tokens do
    attend to padding. Keeping that quirk keeps the features equal to the released model's.
    """
    images, tiles = aspect_ratio_mask.shape
    is_pad = ~aspect_ratio_mask.bool()[:, :, None].expand(images, tiles, padded_tokens).clone()
    is_pad[:, :, real_tokens:] = True
    is_pad = is_pad.reshape(images, tiles * padded_tokens)
    both_pad = is_pad[:, :, None] & is_pad[:, None, :]
    zero = torch.zeros((), dtype=dtype, device=aspect_ratio_mask.device)
    return torch.where(both_pad, torch.finfo(dtype).min, zero)[:, None]


class AspectRatioEmbedding(nn.Module):
    """A gated embedding per (aspect ratio, tile), added to every token of the tile."""

    def __init__(self, cfg: TiledVisionConfig):
        super().__init__()
        self.max_num_tiles, self.hidden_size = cfg.max_num_tiles, cfg.hidden_size
        self.embedding = nn.Embedding(len(cfg.supported_aspect_ratios) + 1, cfg.max_num_tiles * cfg.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x: (images, tiles, tokens, hidden); aspect_ratio_ids: (images,)."""
        embeds = self.embedding(aspect_ratio_ids).view(-1, self.max_num_tiles, 1, self.hidden_size)
        return x + embeds * self.gate.tanh()


class GatedPositionalEmbedding(nn.Module):
    """Per-token positions within a tile, blended by one gate with per-(aspect ratio, tile) ones."""

    def __init__(self, cfg: TiledVisionConfig):
        super().__init__()
        self.max_num_tiles, self.num_patches, self.hidden_size = cfg.max_num_tiles, cfg.num_patches, cfg.hidden_size
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.zeros(cfg.num_patches, cfg.hidden_size))
        self.tile_embedding = nn.Embedding(
            len(cfg.supported_aspect_ratios) + 1, cfg.max_num_tiles * cfg.num_patches * cfg.hidden_size
        )

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x: (images, tiles, num_patches, hidden); aspect_ratio_ids: (images,)."""
        gate = self.gate.tanh()
        tile_embeds = self.tile_embedding(aspect_ratio_ids)
        tile_embeds = tile_embeds.view(-1, self.max_num_tiles, self.num_patches, self.hidden_size)
        return x + (1 - gate) * self.embedding + gate * tile_embeds


class VisionAttention(nn.Module):
    def __init__(self, cfg: TiledVisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        dim = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = (p(x).view(b, s, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.o_proj(masked_attention(q, k, v, mask).transpose(1, 2).reshape(b, s, d))


class VisionMLP(nn.Module):
    def __init__(self, cfg: TiledVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    """Pre-norm transformer layer; the global transformer's layers scale both branches by tanh gates."""

    def __init__(self, cfg: TiledVisionConfig, gated: bool):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = VisionMLP(cfg)
        self.gated = gated
        if gated:
            # Meta's initial value: both branches open at tanh(pi/4) ~ 0.66.
            self.gate_attn = nn.Parameter(torch.full((1,), math.pi / 4))
            self.gate_ffn = nn.Parameter(torch.full((1,), math.pi / 4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), mask)
        x = x + (self.gate_attn.tanh() * attn if self.gated else attn)
        mlp = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * mlp if self.gated else mlp)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: TiledVisionConfig, num_layers: int, gated: bool):
        super().__init__()
        self.checkpointing = cfg.activation_checkpointing
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg, gated) for _ in range(num_layers))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, keep: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The final output and the outputs of the layers listed in `keep`, in that order."""
        # A kept output is a checkpointed layer's output like any other (the next layer's saved
        # input), so checkpointing stores nothing extra for it and its gradient is exact.
        outputs = []
        for layer in self.layers:
            x = run_layer(layer, self.checkpointing, x, mask)
            outputs.append(x)
        return x, [outputs[i] for i in keep]


class TiledVisionEncoder(nn.Module):
    def __init__(self, cfg: TiledVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.gated_positional_embedding = GatedPositionalEmbedding(cfg)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(cfg)
        self.post_tile_positional_embedding = AspectRatioEmbedding(cfg)
        # Default eps, not cfg.norm_eps: the released model was trained that way.
        self.layernorm_pre = nn.LayerNorm(cfg.hidden_size)
        self.layernorm_post = nn.LayerNorm(cfg.hidden_size)
        self.transformer = VisionEncoder(cfg, cfg.num_layers, gated=False)
        self.global_transformer = VisionEncoder(cfg, cfg.num_global_layers, gated=True)
        init_modules(self, self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # transformers' initialisation: N(0, 0.02) weights, embedding gates closed, so a
        # fresh encoder starts from plain per-tile positions.
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, GatedPositionalEmbedding):
            nn.init.normal_(module.embedding, std=0.02)
        elif module is self:
            nn.init.normal_(module.class_embedding, std=0.02)

    def forward(
        self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, aspect_ratio_mask: torch.Tensor
    ) -> torch.Tensor:
        """Features (batch, images, tiles, num_patches, output_dim) of the tiles.

        pixel_values: (batch, images, max_num_tiles, 3, size, size); aspect_ratio_ids:
        (batch, images), 0 for an absent image; aspect_ratio_mask: (batch, images,
        max_num_tiles), 1 for a real tile. Images are encoded independently of each other.
        """
        batch, images, tiles = pixel_values.shape[:3]
        if tiles != self.cfg.max_num_tiles:
            # The tile embeddings are laid out for max_num_tiles, and since real tokens see
            # padding tiles, fewer slots would change the features.
            raise ValueError(
                f"pixel_values has {tiles} tile slots; pad every image to max_num_tiles={self.cfg.max_num_tiles}"
            )
        ids = aspect_ratio_ids.reshape(batch * images)
        x = self._embed(pixel_values.flatten(0, 2).to(self.patch_embedding.weight.dtype), ids, tiles)
        real, padded = x.shape[2], -(-x.shape[2] // PATCH_PAD_MULTIPLE) * PATCH_PAD_MULTIPLE
        x = F.pad(x, (0, 0, 0, padded - real))
        mask = tile_padding_mask(aspect_ratio_mask.reshape(batch * images, tiles), real, padded, x.dtype)
        x, kept = self.transformer(x.flatten(1, 2), mask, self.cfg.intermediate_layers)
        x = self.layernorm_post(x)
        x = self.post_tile_positional_embedding(x.view(batch * images, tiles, padded, -1), ids)
        x, _ = self.global_transformer(x.flatten(1, 2), mask)
        # transformers stacks the kept layers on a new last axis and flattens it, so the
        # intermediate features interleave (hidden unit major, layer minor); keep that order.
        features = torch.cat([x, torch.stack(kept, dim=-1).flatten(-2)], dim=-1)
        features = features.view(batch, images, tiles, padded, -1)[:, :, :, :real]
        return features

    def _embed(self, tiles_pixels: torch.Tensor, ids: torch.Tensor, tiles: int) -> torch.Tensor:
        """(images * tiles, 3, size, size) -> normalised tokens (images, tiles, num_patches, hidden)."""
        x = self.patch_embedding(tiles_pixels).flatten(2).transpose(1, 2)
        x = self.pre_tile_positional_embedding(x.view(-1, tiles, x.shape[1], x.shape[2]), ids)
        cls = self.class_embedding.to(x.dtype).expand(*x.shape[:2], 1, -1)
        x = self.gated_positional_embedding(torch.cat([cls, x], dim=2), ids)
        return self.layernorm_pre(x)
