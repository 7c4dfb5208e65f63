"""The part-level adapter between `LlamaLM` and transformers' Llama, Qwen2 and Qwen3 causal LMs:
config and weights, both directions (`model.pretrained.llm` folders, and the LLM inside the
LLaVA and Mllama adapters). Qwen2 is Llama with q/k/v biases (`qkv_bias`), Qwen3 Llama with a per-head
q/k RMSNorm (`qk_norm`) and a head width of its own (`head_dim`).

Our parameter names are transformers' LlamaModel names (and Qwen's q_norm / k_norm), so the weight map only moves a
prefix: "model." for the body and "" for `lm_head` in LlamaForCausalLM, and other prefixes
for models that embed a Llama (LLaVA's "model.language_model." in transformers 5). Tied
checkpoints carry no lm_head tensor; it is the embedding.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from pydantic import ValidationError

from mmscale.config.model import LLMConfig, RopeScalingConfig
from mmscale.errors import UserError
from mmscale.models.hf.folder import listed, read_config, read_state_dict, weight_problems
from mmscale.models.llama import LlamaLM

HEAD = "lm_head.weight"
EMBED = "embed_tokens.weight"
_BLOCK_PARAMS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "input_layernorm",
    "post_attention_layernorm",
)
_LLM_KEY = re.compile(
    rf"({re.escape(EMBED)}|norm\.weight|{re.escape(HEAD)}"
    rf"|layers\.\d+\.({'|'.join(re.escape(p) for p in _BLOCK_PARAMS)})\.weight"
    rf"|layers\.\d+\.self_attn\.[qkv]_proj\.bias|layers\.\d+\.self_attn\.[qk]_norm\.weight)"
)
# transformers' causal-LM classes of the families `LlamaLM` expresses, by model_type.
CAUSAL_LM = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Buffers some older checkpoints saved; we recompute RoPE from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _rope_from_hf(text_config: dict) -> tuple[float, RopeScalingConfig | None, list[str]]:
    # transformers 5 keeps RoPE in `rope_parameters`; 4.x in top-level `rope_theta` plus
    # an optional `rope_scaling` whose type key was "type" before it became "rope_type".
    rope = dict(text_config.get("rope_parameters") or text_config.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", text_config.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    problems = []
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor={rope['partial_rotary_factor']} (RoPE on part of each head)")
    if kind == "default":
        return theta, None, problems
    if kind != "llama3":
        return theta, None, problems + [f"rope type '{kind}' (only the default and 'llama3' are supported)"]
    scaling = RopeScalingConfig(
        factor=rope["factor"],
        low_freq_factor=rope["low_freq_factor"],
        high_freq_factor=rope["high_freq_factor"],
        original_max_position_embeddings=rope.get(
            "original_max_position_embeddings", text_config.get("max_position_embeddings", 8192)
        ),
    )
    return theta, scaling, problems


def _unsupported(text_config: dict) -> list[str]:
    problems = []
    kind = text_config.get("model_type", "llama")
    if kind not in CAUSAL_LM:
        problems.append(f"model_type '{kind}' (only {', '.join(CAUSAL_LM)})")
    if text_config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act '{text_config['hidden_act']}' (only 'silu')")
    if text_config.get("mlp_bias"):
        problems.append("mlp_bias=true (our MLP has no bias)")
    if text_config.get("attention_bias") and kind != "qwen2":  # Llama's and Qwen3's flag biases o_proj too;
        # Qwen2 ignores it (its q/k/v biases are always there)
        problems.append("attention_bias=true (biases on all four attention projections; "
                        "Qwen2's q/k/v biases are supported)")
    if _sliding(text_config):
        problems.append("sliding-window attention layers (every layer attends to the whole sequence here)")
    if text_config.get("attention_dropout", 0.0):
        problems.append(f"attention_dropout={text_config['attention_dropout']} (no dropout)")
    return problems


def _sliding(text_config: dict) -> bool:
    """Whether transformers' Qwen2/Qwen3 would build sliding-window layers from this config: its
    layer_types, or (configs without them) use_sliding_window from layer max_window_layers on."""
    if text_config.get("layer_types"):
        return "sliding_attention" in text_config["layer_types"]
    return bool(text_config.get("use_sliding_window")) and \
        text_config.get("max_window_layers", 28) < text_config.get("num_hidden_layers", 0)


def config_from_hf(text_config: dict) -> LLMConfig:
    """Our LLMConfig for a transformers Llama, Qwen2 or Qwen3 config dict (config.json, or LLaVA's
    text_config)."""
    try:
        hidden, heads = text_config["hidden_size"], text_config["num_attention_heads"]
        theta, scaling, rope_problems = _rope_from_hf(text_config)
        kind = text_config.get("model_type", "llama")
        head_dim = text_config.get("head_dim", 128 if kind == "qwen3" else None)  # transformers' Qwen3 default
        cfg = LLMConfig(
            head_dim=head_dim if head_dim is not None and head_dim * heads != hidden else None,
            qkv_bias=kind == "qwen2",
            qk_norm=kind == "qwen3",
            hidden_size=hidden,
            num_layers=text_config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=text_config.get("num_key_value_heads") or heads,
            intermediate_size=text_config["intermediate_size"],
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=text_config.get("rms_norm_eps", 1e-6),
            tie_embeddings=text_config.get("tie_word_embeddings", False),
            vocab_size=text_config.get("vocab_size", 32000),
        )
    except KeyError as e:
        raise UserError(f"the Llama config has no {e.args[0]!r}; is it a transformers LlamaConfig?") from e
    except ValidationError as e:
        raise UserError(f"the Llama config does not fit mmscale's model.llm: {e}") from e
    problems = _unsupported(text_config) + rope_problems
    if problems:
        raise UserError("the LLM's config uses features mmscale does not support: " + "; ".join(problems))
    return cfg


def hf_model_type(cfg: LLMConfig) -> str:
    """The transformers family of `cfg` (ModelConfig refuses both at once outside Molmo2): llama, qwen2
    (q/k/v biases) or qwen3 (q/k norm)."""
    return "qwen2" if cfg.qkv_bias else "qwen3" if cfg.qk_norm else "llama"


def config_to_hf(cfg: LLMConfig, vocab_size: int) -> dict:
    """The LlamaConfig fields (transformers 5 layout) of our config; the inverse of `config_from_hf`."""
    rope: dict = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope = {**rope, "rope_type": "llama3", **cfg.rope_scaling.model_dump()}
    return {
        "model_type": hf_model_type(cfg),
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_size,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_embeddings,
        "vocab_size": vocab_size,
    }


def state_dict_from_hf(
    hf_state: dict[str, torch.Tensor], prefix: str = "model.", head_prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Our `LlamaLM` tensors out of a transformers state dict.

    Takes the keys under `prefix` (the LlamaModel body) and `head_prefix + "lm_head.weight"`;
    keys outside both (a vision tower, say) are left alone. No lm_head in the result means
    a tied checkpoint. Raises UserError for keys under `prefix` that are no Llama weight.
    """
    state = {}
    for key, tensor in hf_state.items():
        if key == head_prefix + HEAD:
            state[HEAD] = tensor
        elif key.startswith(prefix) and not key.endswith(_IGNORED_SUFFIXES):
            state[key.removeprefix(prefix)] = tensor
    if EMBED not in state and not any(k.startswith("layers.") for k in state):
        raise UserError(
            f"no Llama weights under the prefix '{prefix}'; the checkpoint's keys look like {listed(sorted(hf_state))}"
        )
    unexpected = sorted(prefix + k for k in state if k != HEAD and not _LLM_KEY.fullmatch(k))
    if unexpected:
        raise UserError(f"weights mmscale's Llama does not have (unsupported checkpoint?): {listed(unexpected)}")
    return state


def state_dict_to_hf(
    state: dict[str, torch.Tensor], tie_embeddings: bool, prefix: str = "model.", head_prefix: str = ""
) -> dict[str, torch.Tensor]:
    """transformers' keys for our `LlamaLM` state dict; the inverse of `state_dict_from_hf`.

    A tied model's lm_head is left out, as transformers saves it.
    """
    out = {prefix + k: v for k, v in state.items() if k != HEAD}
    if not tie_embeddings:
        out[head_prefix + HEAD] = state[HEAD]
    return out


def load_llm_state(model: LlamaLM, state: dict[str, torch.Tensor], assign: bool = False) -> None:
    """Copy `state_dict_from_hf` tensors into `model` (`assign`: make them its parameters, as
    for a model built on the meta device); UserError names missing, extra or misshapen keys."""
    if model.cfg.tie_embeddings and HEAD not in state and EMBED in state:
        state = {**state, HEAD: state[EMBED]}
    expected = model.state_dict()
    problems = weight_problems(expected, state)
    if HEAD in expected and HEAD not in state:
        problems.append("untied models need lm_head.weight; tied ones set tie_word_embeddings")
    if problems:
        raise UserError("the Llama weights do not fit the configured model: " + "; ".join(problems))
    model.load_state_dict(state, assign=assign)


def load_llama(folder: str | Path) -> LlamaLM:
    """A fp32 `LlamaLM` with the weights of a local Llama-, Qwen2- or Qwen3ForCausalLM folder
    (save_pretrained output)."""
    hf_config = read_config(folder)
    architectures = hf_config.get("architectures") or ["LlamaForCausalLM"]
    if not set(architectures) & set(CAUSAL_LM.values()):
        raise UserError(f"{folder} holds a {', '.join(architectures)}, not one of {', '.join(CAUSAL_LM.values())}; "
                        "point at such a folder")
    cfg = config_from_hf(hf_config)
    state = state_dict_from_hf(read_state_dict(folder))
    # Allocate without the random init the weights would overwrite anyway (minutes for 8B).
    with torch.device("meta"):
        model = LlamaLM(cfg, cfg.vocab_size)
    model.to_empty(device="cpu")
    model.tie_weights()
    load_llm_state(model, state)
    return model
