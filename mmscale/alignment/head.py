"""VIRAL's projector and loss: L_VRA = -(1/N) sum_i cos(P(h_i), y_i) over the N image tokens of
the optimizer step (mmscale.models.loss normalises the sum)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AlignmentHead(nn.Module):
    """LLM width -> teacher width: three Linear layers with SiLU between (VIRAL's projector,
    4096 -> 2048 -> 2048 -> 768 for a 7B LLM and DINOv2-B)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)
        self.linear_3 = nn.Linear(hidden, out_dim)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_3(self.act(self.linear_2(self.act(self.linear_1(x)))))


def alignment_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-(sum of cosine similarities) of (N, dim) predictions and targets, in fp32."""
    return -F.cosine_similarity(predicted.float(), target.float(), dim=-1).sum()
