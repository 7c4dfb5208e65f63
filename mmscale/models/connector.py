"""Connectors map vision features to the LLM's embedding width (LLaVA's projector).

Layer names follow `transformers`' LlavaMultiModalProjector (`linear_1`, `linear_2`), so
LLaVA weights load by a prefix rename.

Two connectors shrink each image 4x by pooling 2x2 patch neighbourhoods:
- "pool_mlp" concatenates the four features (InternVL's pixel shuffle, Qwen2-VL's patch
  merger) before the MLP: no parameters of its own, nothing lost (the MLP sees all four
  patches and learns how to mix them), and a pure reshape that costs nothing to run;
- "molmo" is Molmo's: multi-head attention over the four patches, queried by their mean,
  then a SwiGLU projector as wide as the LLM's MLP (114M parameters at Molmo-7B's sizes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmscale.config.schema import POOL_WINDOW, ConnectorConfig, ModelConfig


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

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(images, side*side, in_dim) -> (images, (side/window)^2, width)."""
        images, _, dim = features.shape
        groups = merge_patches(features)  # (images, cells, window^2 * dim)
        cells = groups.shape[1]
        patches = groups.view(images * cells, POOL_WINDOW**2, dim)

        def split(x: torch.Tensor) -> torch.Tensor:  # (n, length, width) -> (n, heads, length, head_dim)
            return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

        query = split(self.wq(patches.mean(dim=1, keepdim=True)))
        pooled = F.scaled_dot_product_attention(query, split(self.wk(patches)), split(self.wv(patches)))
        return self.wo(pooled.transpose(1, 2).reshape(images, cells, -1))


class MolmoConnector(nn.Module):
    """Attention pooling into the vision width, then Molmo's SwiGLU projector
    (w2(silu(w1 x) * w3 x)) into the LLM width."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        vision, llm = cfg.vision, cfg.llm
        self.pool = AttentionPool(vision.feature_size, vision.hidden_size, vision.num_heads)
        self.w1 = nn.Linear(vision.hidden_size, llm.intermediate_size, bias=cfg.connector.bias)
        self.w3 = nn.Linear(vision.hidden_size, llm.intermediate_size, bias=cfg.connector.bias)
        self.w2 = nn.Linear(llm.intermediate_size, llm.hidden_size, bias=cfg.connector.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.pool(features)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def build_connector(cfg: ModelConfig) -> nn.Module:
    if cfg.connector.type == "molmo":
        return MolmoConnector(cfg)
    return Connector(cfg.connector, cfg.vision.feature_size, cfg.llm.hidden_size)
