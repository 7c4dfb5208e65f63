"""The Llama decoder: RoPE scaling and activation checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from mmscale.config.model import LLMConfig, RopeScalingConfig
from mmscale.models.llama import DecoderBlock, LlamaLM, rope_cos_sin, rope_inv_freq

TINY = {"hidden_size": 64, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128}
LLAMA31 = RopeScalingConfig(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)


def test_unscaled_rope_is_the_plain_geometric_series():
    cfg = LLMConfig(**TINY, rope_theta=10000.0)
    head_dim = 16
    expected = torch.tensor([10000.0 ** (-i / head_dim) for i in range(0, head_dim, 2)])
    assert torch.allclose(rope_inv_freq(cfg), expected, rtol=1e-6)


def test_llama3_scaling_keeps_fast_slows_slow_and_blends_between():
    plain = rope_inv_freq(LLMConfig(**TINY, rope_theta=10000.0))
    scaled = rope_inv_freq(LLMConfig(**TINY, rope_theta=10000.0, rope_scaling=LLAMA31))
    turns = LLAMA31.original_max_position_embeddings * plain / (2 * math.pi)
    fast, slow = turns > LLAMA31.high_freq_factor, turns < LLAMA31.low_freq_factor
    middle = ~fast & ~slow
    assert fast.any() and slow.any() and middle.any(), "the test config should exercise all three bands"
    assert torch.equal(scaled[fast], plain[fast])
    assert torch.allclose(scaled[slow], plain[slow] / LLAMA31.factor)
    assert ((scaled[middle] < plain[middle]) & (scaled[middle] > plain[middle] / LLAMA31.factor)).all()


def test_llama3_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, **LLAMA31.model_dump()},
    )
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    ours = rope_inv_freq(LLMConfig(**TINY, rope_theta=10000.0, rope_scaling=LLAMA31))
    assert torch.allclose(ours, expected, rtol=1e-6, atol=0)


def test_rope_tables_have_one_row_per_position():
    cos, sin = rope_cos_sin(torch.tensor([[0, 1, 2, 0]]), LLMConfig(**TINY))
    assert cos.shape == sin.shape == (1, 1, 4, 16)
    assert torch.equal(cos[0, 0, 0], cos[0, 0, 3]) and torch.equal(cos[0, 0, 0], torch.ones(16))


def test_rope_scaling_rejects_inverted_bands():
    with pytest.raises(ValidationError, match="high_freq_factor"):
        RopeScalingConfig(low_freq_factor=4.0, high_freq_factor=1.0)


def _loss_and_grads(checkpointing: bool, packed: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = LlamaLM(LLMConfig(**TINY, activation_checkpointing=checkpointing), vocab_size=80).train()
    ids = torch.randint(0, 80, (2, 12), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(12).expand(2, 12)
    segments = None
    if packed:
        positions = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12)
        segments = torch.cat([torch.ones(5), torch.full((7,), 2)]).long().expand(2, 12)
    logits = model(model.embed_tokens(ids), positions, segments)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True])
def test_activation_checkpointing_gives_identical_loss_and_gradients(packed):
    loss, grads = _loss_and_grads(checkpointing=False, packed=packed)
    loss_ckpt, grads_ckpt = _loss_and_grads(checkpointing=True, packed=packed)
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys()
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert torch.equal(grad, grads_ckpt[name]), name


def test_activation_checkpointing_recomputes_blocks_in_backward(monkeypatch):
    calls = []
    forward = DecoderBlock.forward

    def counting_forward(self, *args):
        calls.append(1)
        return forward(self, *args)

    # Patch the method, not a hook: checkpoint's recomputation bypasses module hooks.
    monkeypatch.setattr(DecoderBlock, "forward", counting_forward)
    model = LlamaLM(LLMConfig(**TINY, activation_checkpointing=True), vocab_size=80).train()
    embeds = torch.randn(1, 6, 64, requires_grad=True)
    model(embeds, torch.arange(6)[None]).sum().backward()
    assert len(calls) == 2 * TINY["num_layers"]  # each block ran again during backward
    calls.clear()
    with torch.no_grad():
        model.eval()(embeds, torch.arange(6)[None])
    assert len(calls) == TINY["num_layers"]


def test_tie_weights_shares_the_embedding():
    tied = LlamaLM(LLMConfig(**TINY, tie_embeddings=True), vocab_size=80)
    untied = LlamaLM(LLMConfig(**TINY, tie_embeddings=False), vocab_size=80)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight
