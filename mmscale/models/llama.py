"""A Llama-style decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU; with
Qwen2's q/k/v biases (`qkv_bias`), Qwen3's per-head or OLMo 2's whole-projection q/k RMSNorm
(`qk_norm`, `qk_norm_over`), OLMo 2's norms after the sublayers (`norm_after`) and Molmo2's
input-only embedding rows (`additional_vocab_size`) as options.

Parameter names follow `transformers`' LlamaModel, Qwen2Model and Qwen3Model (q_proj, q_norm,
gate_proj, input_layernorm, ...) so that weight import and export stay a rename-free mapping.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmscale.config.model import LLMConfig, RopeScalingConfig
from mmscale.models.attention import PackedLayout, attention, masked_attention, pack_layout
from mmscale.models.generate import KVCache, LayerCache
from mmscale.models.initialise import init_modules


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as Llama does: bf16 variance loses too much precision.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: LLMConfig, device: torch.device | None = None) -> torch.Tensor:
    """The (head_dim / 2,) rotation frequencies, in radians per position."""
    head_dim = cfg.head_size
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    if cfg.rope_scaling is not None:
        inv_freq = _llama3_scaled(inv_freq, cfg.rope_scaling)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, scaling: RopeScalingConfig) -> torch.Tensor:
    # Llama 3.1's long-context recipe, by full turns a frequency makes over the pretraining
    # context: above high_freq_factor turns (local word order) it stays as trained; below
    # low_freq_factor it is slowed by `factor`, so the longer context maps onto angles seen
    # in training; in between, the two blend linearly in turns.
    turns = scaling.original_max_position_embeddings * inv_freq / (2 * math.pi)
    keep = ((turns - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)).clamp(0, 1)
    return (1 - keep) * inv_freq / scaling.factor + keep * inv_freq


def rope_cos_sin(position_ids: torch.Tensor, cfg: LLMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables of shape (batch, 1, seq, head_dim) for the given positions."""
    inv_freq = rope_inv_freq(cfg, position_ids.device)
    angles = position_ids[..., None].float() * inv_freq  # (batch, seq, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # The "rotate half" layout of transformers' Llama (not the interleaved one of Meta's
    # original code), so imported weights need no permutation.
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    attention_kernel = "auto"  # which kernel computes it (mmscale.models.attention.set_kernel)

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.head_size
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.norm_heads = cfg.qk_norm_over == "head"
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim if self.norm_heads else cfg.num_heads * self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim if self.norm_heads else cfg.num_kv_heads * self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: PackedLayout | None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if not self.norm_heads:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(b, s, self.num_heads, self.head_dim), k.view(b, s, self.num_kv_heads, self.head_dim)
        if self.norm_heads:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = attention(q, k, v, causal=True, layout=layout, kernel=self.attention_kernel)
        else:
            k, v = cache.update(k, v)
            out = masked_attention(q, k, v, cache.mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.norm_after = cfg.norm_after

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: PackedLayout | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """x: (batch, seq, hidden); cos, sin: `rope_cos_sin` in x's dtype; layout: `pack_layout(segment_ids)`.

        All three are computed once per forward by the caller and shared by every block.
        While generating, `cache` holds this block's keys and values of the earlier tokens.
        """
        if self.norm_after:
            x = x + self.input_layernorm(self.self_attn(x, cos, sin, layout, cache))
            return x + self.post_attention_layernorm(self.mlp(x))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layout, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def _init_weights(module: nn.Module) -> None:
    # Llama's N(0, 0.02); PyTorch's N(0, 1) embedding default makes tied logits explode.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:  # Qwen2's q/k/v biases start at 0, as there
        nn.init.zeros_(module.bias)


class LlamaLM(nn.Module):
    """Decoder-only language model working on embeddings, so a VLM can splice images in."""

    # A VLM runs it through hidden_states and output, never forward (convert.verify.computed_in_fp32).
    entered_by_methods = True

    def __init__(self, cfg: LLMConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(vocab_size + cfg.additional_vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, vocab_size, bias=False)
        self.tie_weights()
        init_modules(self, _init_weights)

    def tie_weights(self) -> None:
        """Make lm_head share the embedding matrix if the config ties them; again after `to_empty`, which unties."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab) for embeddings (batch, seq, hidden).

        `segment_ids` (batch, seq) numbers the samples packed into each row (see
        `PackedLayout`), with `position_ids` restarting at 0 for each; None for rows of one
        right-padded sample each. With a `cache` (generation) the embeddings are the tokens
        after those already in it.
        """
        return self.output(self.hidden_states(inputs_embeds, position_ids, segment_ids, cache))

    def output(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm and output layer: logits (..., vocab) for hidden states (..., hidden).
        Both work position by position, so the loss runs them on its labelled positions only."""
        return self.lm_head(self.norm(hidden))

    def hidden_states(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        both_ways: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The last block's output (batch, seq, hidden), before the final norm; arguments as for `forward`,
        and `both_ways` (batch, seq) bool: tokens that see each other both ways (`PackedLayout`)."""
        cos, sin = rope_cos_sin(position_ids, self.cfg)
        cos, sin = cos.to(inputs_embeds.dtype), sin.to(inputs_embeds.dtype)
        layout = pack_layout(segment_ids, both_ways=both_ways)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            if cache is not None:
                x = layer(x, cos, sin, layout, cache.layer(i))
            else:
                x = self._run_block(layer, x, cos, sin, layout)
        return x

    def _run_block(
        self, layer: DecoderBlock, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: PackedLayout | None
    ) -> torch.Tensor:
        if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
            # Non-reentrant: the reentrant variant drops the block's parameter gradients when
            # its input needs no grad (e.g. trainable LLM over frozen embeddings).
            return checkpoint(layer, x, cos, sin, layout, use_reentrant=False)
        return layer(x, cos, sin, layout)
