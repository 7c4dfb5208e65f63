"""Connectors map vision features to the LLM's embedding width (LLaVA's projector)."""

from __future__ import annotations

from torch import nn

from mmscale.config.schema import ConnectorConfig


def build_connector(cfg: ConnectorConfig, vision_dim: int, llm_dim: int) -> nn.Module:
    if cfg.type == "linear":  # LLaVA-1.0
        return nn.Linear(vision_dim, llm_dim)
    # LLaVA-1.5's "mlp2x_gelu", which clearly beat the linear projector in its ablations.
    return nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
