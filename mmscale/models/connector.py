"""Connectors map vision features to the LLM's embedding width (LLaVA's projector).

Layer names follow `transformers`' LlavaMultiModalProjector (`linear_1`, `linear_2`), so
LLaVA weights load by a prefix rename.

Two connectors shrink each image 4x by pooling 2x2 patch neighbourhoods:
- "pool_mlp" concatenates the four features (InternVL's pixel shuffle, Qwen2-VL's patch
  merger) before the MLP: no parameters of its own, nothing lost (the MLP sees all four
  patches and learns how to mix them), and a pure reshape that costs nothing to run;
- "molmo" is Molmo's: multi-head attention over the four patches, queried by their mean,
  then a SwiGLU projector as wide as the LLM's MLP (114M parameters at Molmo-7B's sizes).

"molmo2" (Molmo2's adapter) is the same pooling and projector over windows listed by index
(`image_pooling`, from mmscale.data.multicrop): the overlapping crops' kept patches form one
grid whose edge windows are partly padding (-1), left out of the mean and the attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmscale.config.model import POOL_WINDOW, ConnectorConfig, DecoderModelConfig


def merge_patches(features: torch.Tensor, window: int = POOL_WINDOW) -> torch.Tensor:
    """(images, side*side, dim) row-major patches -> (images, (side/window)^2, window^2 * dim).

    Each output token is its window x window neighbourhood's features concatenated in
    row-major order (top-left, top-right, bottom-left, bottom-right for 2x2); the output
    tokens are again row-major over the coarser grid.
    """
    images, tokens, dim = features.shape
    side = math.isqrt(tokens)
    if side * side != tokens or side % window:
        raise ValueError(f"cannot merge {window}x{window} patches of a {tokens}-patch image: needs an even square grid")
    cells = side // window
    grid = features.view(images, cells, window, cells, window, dim)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(images, cells * cells, window * window * dim)


class Connector(nn.Module):
    def __init__(self, cfg: ConnectorConfig, vision_dim: int, llm_dim: int):
        super().__init__()
        self.pool = cfg.type == "pool_mlp"
        in_dim = vision_dim * POOL_WINDOW**2 if self.pool else vision_dim
        self.linear_1 = nn.Linear(in_dim, llm_dim, bias=cfg.bias)
        if cfg.type == "linear":  # LLaVA-1.0
            self.act, self.linear_2 = None, None
        else:
            # LLaVA-1.5's "mlp2x_gelu", which clearly beat the linear projector in its ablations.
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(llm_dim, llm_dim, bias=cfg.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(images, patches, vision_dim) -> (images, image tokens, llm_dim)."""
        if self.pool:
            features = merge_patches(features)
        x = self.linear_1(features)
        if self.linear_2 is not None:
            x = self.linear_2(self.act(x))
        return x


class AttentionPool(nn.Module):
    """Molmo's "attention-meanq" pooling: each window x window neighbourhood becomes one
    token, the output of multi-head attention whose single query is the neighbourhood's mean
    and whose keys and values are its patches. Layer names and biases are Molmo's."""

    def __init__(self, in_dim: int, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention pooling width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.wq = nn.Linear(in_dim, width)
        self.wk = nn.Linear(in_dim, width)
        self.wv = nn.Linear(in_dim, width)
        self.wo = nn.Linear(width, width)

    def forward(self, patches: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """(windows, window patches, in_dim) -> (windows, width): one token per window, its query the
        mean of its `valid` (windows, window patches) patches (all, if None), which alone it attends to."""

        def split(x: torch.Tensor) -> torch.Tensor:  # (n, length, width) -> (n, heads, length, head_dim)
            return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

        if valid is None:
            mean, mask = patches.mean(dim=1, keepdim=True), None
        else:
            kept = valid.to(patches.dtype)[..., None]
            mean = (patches * kept).sum(dim=1, keepdim=True) / kept.sum(dim=1, keepdim=True).clamp(min=1)
            mask = valid[:, None, None, :]
        query = split(self.wq(mean))
        pooled = F.scaled_dot_product_attention(query, split(self.wk(patches)), split(self.wv(patches)), attn_mask=mask)
        return self.wo(pooled.transpose(1, 2).reshape(patches.shape[0], -1))


class MolmoConnector(nn.Module):
    """Attention pooling into the vision width, then Molmo's SwiGLU projector
    (w2(silu(w1 x) * w3 x)) into the LLM width."""

    def __init__(self, cfg: DecoderModelConfig):
        super().__init__()
        vision, llm = cfg.vision, cfg.llm
        width = cfg.connector.intermediate_size or llm.intermediate_size
        self.pool = AttentionPool(vision.feature_size, vision.hidden_size, vision.num_heads)
        self.w1 = nn.Linear(vision.hidden_size, width, bias=cfg.connector.bias)
        self.w3 = nn.Linear(vision.hidden_size, width, bias=cfg.connector.bias)
        self.w2 = nn.Linear(width, llm.hidden_size, bias=cfg.connector.bias)

    def forward(self, features: torch.Tensor, image_pooling: torch.Tensor | None = None) -> torch.Tensor:
        """(images, patches, feature_size) -> (images, image tokens, llm width); or, with Molmo2's
        `image_pooling` (tokens, window patches) indices into the flattened patches (-1: none),
        (tokens, llm width)."""
        if image_pooling is None:
            images, _, dim = features.shape
            windows = merge_patches(features)  # (images, cells, window^2 * dim)
            x = self.pool(windows.view(-1, POOL_WINDOW**2, dim)).view(images, windows.shape[1], -1)
        else:
            flat = features.reshape(-1, features.shape[-1])
            x = self.pool(flat[image_pooling.clamp(min=0)], image_pooling >= 0)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def build_connector(cfg: DecoderModelConfig) -> nn.Module:
    if cfg.connector.type in ("molmo", "molmo2"):
        return MolmoConnector(cfg)
    return Connector(cfg.connector, cfg.vision.feature_size, cfg.llm.hidden_size)
