"""The one place attention is computed, so kernels can be swapped without touching models.

PyTorch SDPA for now; it picks the flash or memory-efficient kernel on CUDA by itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, segment_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """q: (batch, heads, seq, dim); k, v: (batch, kv_heads, seq, dim) with heads % kv_heads == 0.

    `segment_ids` (batch, seq) marks the samples packed into one row: a token attends only
    to earlier tokens of its own segment (a block-diagonal causal mask). Without it, rows
    are single right-padded samples, which need no mask under causal attention: real
    tokens never see the padding that follows them, and padded positions carry no loss.
    """
    gqa = k.shape[1] != q.shape[1]
    if segment_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    mask = segment_ids[:, :, None] == segment_ids[:, None, :]
    if causal:
        mask = mask.tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=gqa)
