"""The adapter between `CrossAttentionVLM` and transformers' MllamaForConditionalGeneration
(Llama 3.2 Vision), `MLLAMA`: the config mapping, the weight-name mapping both ways, and `load_mllama`. Weight names differ only by
prefix, because the modules reuse transformers' names below the top level.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import ValidationError

from mmscale.config.model import CrossAttentionConfig, CrossAttentionModelConfig, LLMConfig, ModelConfig, RopeScalingConfig
from mmscale.config.towers import TiledVisionConfig
from mmscale.errors import UserError
from mmscale.models.cross_attention_vlm import CrossAttentionVLM, cross_attention_layer_indices
from mmscale.models.hf import llama
from mmscale.models.hf.adapter import Adapter
from mmscale.models.hf.folder import as_fp32, read_config, read_state_dict

# (ours, transformers') weight-name prefixes, most specific first. Export writes the layout
# that save_pretrained writes (and released checkpoints use).
_PREFIXES = [
    ("language_model.lm_head.", "language_model.lm_head."),
    ("language_model.", "language_model.model."),
    ("vision_tower.", "vision_model."),
    ("connector.", "multi_modal_projector."),
]
# transformers 5 names the same weights differently in memory (model.state_dict()).
_IN_MEMORY_PREFIXES = [
    ("language_model.lm_head.", "lm_head."),
    ("language_model.", "model.language_model."),
    ("vision_tower.", "model.vision_model."),
    ("connector.", "model.multi_modal_projector."),
]
_DEFAULT_ASPECT_RATIOS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]


def _rename(name: str, pairs: list[tuple[str, str]]) -> str | None:
    for source, target in pairs:
        if name.startswith(source):
            return target + name[len(source):]
    return None


def state_dict_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' Mllama weight names (saved or in-memory layout) -> CrossAttentionVLM's.

    Names that belong to neither layout are kept as they are, so loading reports them.
    """
    inverse = [(hf, ours) for ours, hf in _PREFIXES] + [(hf, ours) for ours, hf in _IN_MEMORY_PREFIXES]
    # Longest prefix first: "language_model.model." before "language_model.".
    inverse.sort(key=lambda pair: -len(pair[0]))
    return {_rename(name, inverse) or name: tensor for name, tensor in hf_state.items()}


def state_dict_to_hf(state: dict[str, torch.Tensor], in_memory: bool = False) -> dict[str, torch.Tensor]:
    """CrossAttentionVLM's weight names -> the layout transformers' save_pretrained writes, or
    with `in_memory` the names of a MllamaForConditionalGeneration's own state_dict()."""
    renamed = {}
    for name, tensor in state.items():
        hf_name = _rename(name, _IN_MEMORY_PREFIXES if in_memory else _PREFIXES)
        if hf_name is None:
            raise ValueError(f"{name} is not a CrossAttentionVLM weight")
        renamed[hf_name] = tensor
    return renamed


def config_from_hf(hf_config: dict) -> CrossAttentionModelConfig:
    """The model config (arch "cross_attention") of a MllamaForConditionalGeneration config.json."""
    if hf_config.get("model_type") != "mllama":
        raise UserError(
            f"config.json has model_type={hf_config.get('model_type')!r}; "
            "expected 'mllama' (MllamaForConditionalGeneration)"
        )
    text, vision = hf_config.get("text_config") or {}, hf_config.get("vision_config") or {}
    try:
        return CrossAttentionModelConfig(
            llm=_llm_config(text),
            cross_attention=CrossAttentionConfig(layers=tuple(_cross_layers(text))),
            tiled_vision=_vision_config(vision),
        )
    except ValidationError as error:
        raise UserError(f"the Mllama config.json does not fit mmscale's model config: {error}") from error


def problems(cfg: ModelConfig) -> list[str]:
    """What of `cfg` Mllama cannot express."""
    return [] if cfg.arch == "cross_attention" else [f"model.arch={cfg.arch} (Mllama is the cross_attention arch)"]


def config_to_hf(cfg: ModelConfig, vocab_size: int, image_token_id: int, token_ids: dict | None = None) -> dict:
    """A MllamaForConditionalGeneration config.json for our model; the inverse of `config_from_hf`.

    `token_ids`: the tokenizer's bos/eos/pad_token_id (transformers' defaults are Llama 3's,
    which lie outside a smaller vocabulary)."""
    unexpressed = problems(cfg)
    if unexpressed:
        raise UserError("the model cannot be written as Mllama: " + "; ".join(unexpressed))
    vision, cross = cfg.tiled_vision, list(cross_attention_layer_indices(cfg))
    text = llama.config_to_hf(cfg.llm, vocab_size)
    text.update(model_type="mllama_text_model", num_hidden_layers=cfg.llm.num_layers + len(cross),
                cross_attention_layers=cross, **(token_ids or {}))
    del text["head_dim"]  # MllamaTextConfig derives it
    return {
        "architectures": ["MllamaForConditionalGeneration"],
        "model_type": "mllama",
        "image_token_index": image_token_id,
        "text_config": text,
        "vision_config": {
            "model_type": "mllama_vision_model",
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "hidden_size": vision.hidden_size,
            "num_hidden_layers": vision.num_layers,
            "num_global_layers": vision.num_global_layers,
            "attention_heads": vision.num_heads,
            "intermediate_size": vision.intermediate_size,
            "norm_eps": vision.norm_eps,
            "max_num_tiles": vision.max_num_tiles,
            "intermediate_layers_indices": list(vision.intermediate_layers),
            "vision_output_dim": vision.output_dim,
            "supported_aspect_ratios": [list(r) for r in vision.supported_aspect_ratios],
            "hidden_act": "gelu",
            "num_channels": 3,
        },
    }


def _cross_layers(text: dict) -> list[int]:
    layers = text.get("cross_attention_layers")
    return [3, 8, 13, 18, 23, 28, 33, 38] if layers is None else layers  # transformers' default


def _require(section: str, key: str, value: object, supported: object) -> None:
    if value != supported:
        raise UserError(f"{section}.{key}={value!r} is not supported (only {supported!r})")


def _llm_config(text: dict) -> LLMConfig:
    _require("text_config", "hidden_act", text.get("hidden_act", "silu"), "silu")
    _require("text_config", "tie_word_embeddings", text.get("tie_word_embeddings", False), False)
    _require("text_config", "dropout", text.get("dropout", 0.0), 0.0)
    cross = _cross_layers(text)
    theta, scaling = _rope(text)
    return LLMConfig(
        hidden_size=text.get("hidden_size", 4096),
        num_layers=text.get("num_hidden_layers", 40) - len(cross),
        num_heads=text.get("num_attention_heads", 32),
        num_kv_heads=text.get("num_key_value_heads", 8),
        intermediate_size=text.get("intermediate_size", 14336),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=text.get("rms_norm_eps", 1e-5),
        tie_embeddings=False,
        vocab_size=text.get("vocab_size", 128256),
    )


def _rope(text: dict) -> tuple[float, RopeScalingConfig | None]:
    # transformers 5 writes rope_parameters; 4.x configs (the released ones) rope_theta and rope_scaling.
    legacy = {**(text.get("rope_scaling") or {}), "rope_theta": text.get("rope_theta", 500000.0)}
    params = text.get("rope_parameters") or legacy
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return params["rope_theta"], None
    if kind != "llama3":
        raise UserError(f"text_config rope_type={kind!r} is not supported (only 'default' and 'llama3')")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return params["rope_theta"], RopeScalingConfig(**{k: params[k] for k in keys if k in params})


def _vision_config(vision: dict) -> TiledVisionConfig:
    _require("vision_config", "hidden_act", vision.get("hidden_act", "gelu"), "gelu")
    _require("vision_config", "num_channels", vision.get("num_channels", 3), 3)
    num_layers = vision.get("num_hidden_layers", 32)
    # Python indexing into the layer outputs, so negative indices count from the end.
    kept = tuple(i % num_layers for i in vision.get("intermediate_layers_indices") or [3, 7, 15, 23, 30])
    hidden = vision.get("hidden_size", 1280)
    _require("vision_config", "vision_output_dim", vision.get("vision_output_dim", 7680), hidden * (1 + len(kept)))
    return TiledVisionConfig(
        image_size=_square(vision.get("image_size", 448), "image_size"),
        patch_size=_square(vision.get("patch_size", 14), "patch_size"),
        hidden_size=hidden,
        num_layers=num_layers,
        num_global_layers=vision.get("num_global_layers", 8),
        num_heads=vision.get("attention_heads", vision.get("num_attention_heads", 16)),
        intermediate_size=vision.get("intermediate_size", 5120),
        norm_eps=vision.get("norm_eps", 1e-5),
        max_num_tiles=vision.get("max_num_tiles", 4),
        intermediate_layers=kept,
        supported_aspect_ratios=tuple(map(tuple, vision.get("supported_aspect_ratios") or _DEFAULT_ASPECT_RATIOS)),
    )


def _square(size: int | list[int], key: str) -> int:
    if isinstance(size, int):
        return size
    if len(size) != 2 or size[0] != size[1]:
        raise UserError(f"vision_config.{key}={size} is not supported (only square tiles)")
    return size[0]


def load_mllama(folder: str | Path, fp32: bool = True) -> CrossAttentionVLM:
    """A CrossAttentionVLM with the weights of a local MllamaForConditionalGeneration folder, in fp32
    or (`fp32=False`) in the dtypes the folder stores."""
    cfg = config_from_hf(read_config(folder))
    # Built without the random initialisation the weights overwrite anyway (minutes for 11B); the
    # folder's tensors become the parameters, not copied into allocated ones.
    with torch.device("meta"):
        model = CrossAttentionVLM(cfg, vocab_size=cfg.llm.vocab_size)
    state = state_dict_from_hf(read_state_dict(folder))
    if fp32:
        state = as_fp32(state)
    _check_keys(folder, model.state_dict(), state)
    model.load_state_dict(state, assign=True)
    return model


def _check_keys(folder: str | Path, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    if missing or unexpected:
        raise UserError(
            f"{folder} does not match its config.json as a Mllama model: {len(missing)} missing weights "
            f"{missing[:5]}, {len(unexpected)} unexpected weights {unexpected[:5]} (names after mapping to mmscale's)"
        )
    wrong = [f"{k} {tuple(found[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if found[k].shape != v.shape]
    if wrong:
        raise UserError(f"{folder}: {len(wrong)} weights have shapes that do not fit config.json: {wrong[:5]}")


class MllamaAdapter(Adapter):
    name, model_type = "Mllama", "mllama"
    model_class_name, config_class_name = "MllamaForConditionalGeneration", "MllamaConfig"

    def config_from_hf(self, hf_config: dict, folder: Path | None = None) -> ModelConfig:
        return config_from_hf(hf_config)  # config.json holds all of it

    def config_to_hf(self, cfg: ModelConfig, vocab_size: int, image_token_id: int,
                     token_ids: dict | None = None) -> dict:
        return config_to_hf(cfg, vocab_size, image_token_id, token_ids)

    def state_dict_from_hf(self, hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        return state_dict_from_hf(hf_state)  # the names alone say where each weight goes

    def state_dict_to_hf(self, state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        return state_dict_to_hf(state, in_memory=True)

    def problems(self, cfg: ModelConfig) -> list[str]:
        return problems(cfg)


MLLAMA = MllamaAdapter()
