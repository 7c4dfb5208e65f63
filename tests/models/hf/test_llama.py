"""Importing transformers' Llama, Qwen2 and Qwen3: same logits as transformers, padded and
packed, and clear errors for what we cannot load."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from mmscale.models.hf.llama import (
    config_from_hf,
    config_to_hf,
    state_dict_from_hf,
    state_dict_to_hf,
    load_llama,
    load_llm_state,
)
from mmscale.errors import UserError
from mmscale.models.llama import LlamaLM

VOCAB = 128
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": VOCAB,
    "max_position_embeddings": 256,
}
# original_max_position_embeddings=64 puts the 8 frequencies of a 16-wide head in all
# three bands of the llama3 scaling (kept, blended, slowed).
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
# (family, config overrides): Qwen3's heads are 32 wide, not hidden_size / heads = 16, as
# Qwen3-4B's are 128 against 2560 / 32 = 80.
VARIANTS = {
    "tied": ("llama", {"tie_word_embeddings": True}),
    "untied": ("llama", {"tie_word_embeddings": False}),
    "llama3_rope": ("llama", {"tie_word_embeddings": False, "rope_parameters": LLAMA3_ROPE}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {"tie_word_embeddings": False, "head_dim": 32}),
}
LENGTHS = (7, 12, 4)  # samples of different lengths


def _hf_model(family: str = "llama", **overrides) -> PreTrainedModel:
    torch.manual_seed(0)
    config_class, model_class = FAMILIES[family]
    model = model_class(config_class(**TINY, **overrides)).eval()
    with torch.no_grad():  # non-trivial norms and biases (transformers starts them at 1 and 0), so a
        for name, p in model.named_parameters():  # swapped, dropped or misplaced one would show
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


@pytest.fixture(params=list(VARIANTS))
def saved(request, tmp_path) -> tuple[PreTrainedModel, LlamaLM]:
    family, overrides = VARIANTS[request.param]
    hf = _hf_model(family, **overrides)
    hf.save_pretrained(tmp_path / request.param)
    return hf, load_llama(tmp_path / request.param).eval()


def _samples() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in LENGTHS]


def _hf_logits(hf: LlamaForCausalLM, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).logits


def _our_logits(model: LlamaLM, ids, positions, segments=None) -> torch.Tensor:
    with torch.no_grad():
        return model(model.embed_tokens(ids), positions, segments)


def test_config_and_tying_follow_the_checkpoint(saved):
    hf, ours = saved
    assert ours.cfg.num_kv_heads == 2 and ours.cfg.vocab_size == VOCAB
    assert (ours.cfg.qkv_bias, ours.cfg.qk_norm) == (hf.config.model_type == "qwen2", hf.config.model_type == "qwen3")
    assert ours.cfg.head_size == (getattr(hf.config, "head_dim", None) or TINY["hidden_size"] // 4)
    assert ours.cfg.head_size == (32 if hf.config.model_type == "qwen3" else 16)
    assert ours.cfg.rms_norm_eps == hf.config.rms_norm_eps
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == hf.config.tie_word_embeddings
    assert (ours.cfg.rope_scaling is not None) == (hf.config.rope_parameters["rope_type"] == "llama3")


def test_padded_batch_logits_equal_transformers(saved):
    hf, ours = saved
    samples = _samples()
    longest = max(LENGTHS)
    ids = torch.zeros(len(samples), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sample in enumerate(samples):  # right padding
        ids[row, : len(sample)], mask[row, : len(sample)] = sample, 1
    expected = _hf_logits(hf, ids, mask)
    got = _our_logits(ours, ids, torch.arange(longest).expand_as(ids))
    real = mask.bool()
    diff = (got[real] - expected[real]).abs().max().item()
    print(f"padded batch, max abs logit diff vs transformers: {diff:.2e}")
    assert diff <= 1e-5


def test_packed_row_logits_equal_transformers_per_sample(saved):
    hf, ours = saved
    samples = _samples()
    pad = 3
    ids = torch.cat(samples + [torch.zeros(pad, dtype=torch.long)])[None]
    positions = torch.cat([torch.arange(n) for n in LENGTHS] + [torch.zeros(pad, dtype=torch.long)])[None]
    segments = torch.cat(
        [torch.full((n,), i + 1) for i, n in enumerate(LENGTHS)] + [torch.zeros(pad, dtype=torch.long)]
    )
    packed = _our_logits(ours, ids, positions, segments[None])
    diffs, start = [], 0
    for sample in samples:
        alone = _hf_logits(hf, sample[None])
        diffs.append((packed[:, start : start + len(sample)] - alone).abs().max().item())
        start += len(sample)
    print(f"packed row, max abs logit diff vs transformers per sample: {[f'{d:.2e}' for d in diffs]}")
    assert max(diffs) <= 1e-5


def test_export_loads_into_transformers_with_the_same_logits(saved):
    hf, ours = saved
    fields = config_to_hf(ours.cfg, VOCAB)
    assert fields["model_type"] == hf.config.model_type
    config_class, model_class = FAMILIES[fields["model_type"]]
    config = config_class(**fields)
    exported = model_class(config).eval()
    state = state_dict_to_hf(ours.state_dict(), ours.cfg.tie_embeddings)
    missing, unexpected = exported.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if ours.cfg.tie_embeddings else set())
    ids = _samples()[1][None]
    assert torch.equal(_hf_logits(exported, ids), _hf_logits(hf, ids))
    assert config_from_hf(config.to_dict()) == ours.cfg


@pytest.mark.parametrize("family, dropped", [("qwen2", "qkv_bias"), ("qwen3", "qk_norm")])
def test_without_qwens_biases_or_qk_norm_the_logits_differ(family, dropped):
    """Negative controls of the parity tests: the same weights in a model without Qwen2's q/k/v
    biases, or without Qwen3's q/k norm, are far from transformers' logits."""
    hf = _hf_model(family, tie_word_embeddings=False)
    cfg = config_from_hf(hf.config.to_dict())
    model = LlamaLM(cfg.model_copy(update={dropped: False}), VOCAB).eval()
    state = {k: v for k, v in state_dict_from_hf(hf.state_dict()).items() if "bias" not in k and "_norm." not in k}
    load_llm_state(model, state)
    ids = _samples()[1][None]
    diff = (_our_logits(model, ids, torch.arange(ids.shape[1])[None]) - _hf_logits(hf, ids)).abs().max().item()
    print(f"{family} without {dropped}: max abs logit diff {diff:.2e}")
    assert diff > 1e-2


def test_llava_style_prefixes_take_only_the_language_model():
    hf = _hf_model()
    state = {f"model.language_model.{k.removeprefix('model.')}": v for k, v in hf.state_dict().items()}
    state["model.vision_tower.patch.weight"] = torch.zeros(1)  # another module's weights: left alone
    ours = state_dict_from_hf(state, prefix="model.language_model.")
    assert set(ours) == {k.removeprefix("model.") for k in hf.state_dict()}
    model = LlamaLM(config_from_hf(hf.config.to_dict()), VOCAB)
    load_llm_state(model, ours)
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)


def test_missing_and_unexpected_keys_are_named():
    hf = _hf_model()
    model = LlamaLM(config_from_hf(hf.config.to_dict()), VOCAB)
    state = state_dict_from_hf(hf.state_dict())
    del state["layers.1.mlp.up_proj.weight"]
    with pytest.raises(UserError, match=r"missing layers\.1\.mlp\.up_proj\.weight"):
        load_llm_state(model, state)
    with pytest.raises(UserError, match=r"model\.layers\.0\.self_attn\.o_proj\.bias"):
        state_dict_from_hf({**hf.state_dict(), "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)})
    with pytest.raises(UserError, match=r"not in the model layers\.0\.self_attn\.q_proj\.bias"):  # a Llama has none
        load_llm_state(model, {**state, "layers.0.self_attn.q_proj.bias": torch.zeros(64)})
    with pytest.raises(UserError, match="no Llama weights under the prefix 'model.language_model.'"):
        state_dict_from_hf(hf.state_dict(), prefix="model.language_model.")


def test_untied_config_without_lm_head_weights_is_an_error():
    hf = _hf_model(tie_word_embeddings=False)
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    model = LlamaLM(config_from_hf(hf.config.to_dict()), VOCAB)
    with pytest.raises(UserError, match="lm_head.weight"):
        load_llm_state(model, state_dict_from_hf(state))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"model_type": "mistral"}, "model_type 'mistral'"),
        ({"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 1}, "sliding-window"),
        ({"model_type": "qwen3", "layer_types": ["full_attention", "sliding_attention"]}, "sliding-window"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "rope type 'yarn'"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_features_are_user_errors(change, named):
    config = LlamaConfig(**TINY).to_dict() | change
    with pytest.raises(UserError, match=named):
        config_from_hf(config)


def test_qwen_configs_are_read_as_transformers_reads_them():
    """Qwen3's head_dim defaults to 128 when a config.json leaves it out; Qwen2 ignores
    attention_bias; sliding windows that build no sliding layer are no obstacle."""
    qwen3 = LlamaConfig(**TINY).to_dict() | {"model_type": "qwen3"}
    del qwen3["head_dim"]
    assert config_from_hf(qwen3).head_size == 128
    qwen2 = LlamaConfig(**TINY).to_dict() | {"model_type": "qwen2", "attention_bias": True, "use_sliding_window": True}
    assert config_from_hf(qwen2).qkv_bias  # max_window_layers 28 > 2 layers: none slides


def test_transformers_4_rope_layout_is_read():
    # 4.x: rope_theta at the top, scaling under rope_scaling with its kind under "type".
    old = LlamaConfig(**TINY).to_dict()
    del old["rope_parameters"]
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k not in ("rope_type", "rope_theta")}
    old |= {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **scaling}}
    cfg = config_from_hf(old)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling is not None and cfg.rope_scaling.original_max_position_embeddings == 64


def test_a_folder_of_another_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["MistralForCausalLM"], "model_type": "mistral"}')
    with pytest.raises(UserError, match="not one of LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        load_llama(tmp_path)
