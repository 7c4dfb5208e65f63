"""Connectors map vision features to the LLM's embedding width (LLaVA's projector).

Layer names follow `transformers`' LlavaMultiModalProjector (`linear_1`, `linear_2`), so
LLaVA weights load by a prefix rename.

The "pool_mlp" connector shrinks each image 4x before the MLP. Molmo pools 2x2 patch
neighbourhoods with a learned attention step; we instead concatenate the four features
(InternVL's pixel shuffle, Qwen2-VL's patch merger): it has no parameters of its own,
loses nothing (the MLP sees all four patches and learns how to mix them), and is a pure
reshape that costs nothing to run.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmscale.config.schema import POOL_WINDOW, ConnectorConfig


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
