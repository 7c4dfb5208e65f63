"""The one place attention is computed, so kernels can be swapped without touching models.

PyTorch SDPA for now; it picks the flash or memory-efficient kernel on CUDA by itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """q: (batch, heads, seq, dim); k, v: (batch, kv_heads, seq, dim) with heads % kv_heads == 0.

    Right-padded batches need no mask under causal attention: real tokens never see the
    padding that follows them, and padded positions carry no loss.
    """
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])
