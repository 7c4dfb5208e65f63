"""The adapter between `DecoderVLM` and transformers' LlavaForConditionalGeneration (`LLAVA`),
and the part-level reader of its CLIP/SigLIP tower's config (`model.pretrained.vision` folders).

Config and weights, both directions. Our module names are transformers' (the tower's are
CLIPVisionModel's / SiglipVisionModel's, the connector's LlavaMultiModalProjector's, the
LLM's LlamaModel's), so the weight map only moves prefixes. Weights of the tower that our
model never builds (blocks after the deepest feature layer, a `post_layernorm` the
features skip, SigLIP's pooling head) are dropped on import.

LLaVA's features are hidden states without the final LayerNorm, with CLIP's class token
dropped ("default" select strategy) or every SigLIP token kept ("full"); other layouts
are rejected with the setting named rather than imported approximately.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from pydantic import ValidationError
from transformers import LlavaConfig

from mmscale.config.model import ConnectorConfig, DecoderModelConfig, ModelConfig
from mmscale.config.towers import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN_STD, VisionConfig
from mmscale.errors import UserError
from mmscale.models.decoder_vlm import DecoderVLM
from mmscale.models.hf import llama
from mmscale.models.hf.adapter import Adapter
from mmscale.models.hf.folder import as_fp32, listed, read_config, read_state_dict, weight_problems

# transformers 5's in-memory key layout, which the import normalises every layout to.
VISION, PROJECTOR = "model.vision_tower.", "model.multi_modal_projector."
LLM, HEAD = "model.language_model.", "lm_head."
# Released checkpoints (transformers 4.x: "vision_tower.vision_model.", "language_model.model.")
# and transformers 5's save_pretrained ("vision_tower.") -> the in-memory layout, in order.
_RENAMES = (
    (re.compile(r"^language_model\.lm_head\."), HEAD),
    (re.compile(r"^language_model\.model\."), LLM),
    (re.compile(r"^(vision_tower|multi_modal_projector)\."), r"model.\1."),
    (re.compile(r"^model\.vision_tower\.vision_model\."), VISION),
)
FAMILIES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# LLaVA's select strategy for the features our tower produces: CLIP's class token dropped,
# SigLIP's tokens (all patches) kept.
STRATEGY = {"clip": "default", "siglip": "full"}


def complete(hf_config: dict) -> dict:
    # Released configs list only what differs from transformers' defaults (llava-1.5's
    # text_config has no hidden_size); LlavaConfig fills in the defaults transformers loads with.
    try:
        return LlavaConfig.from_dict(hf_config).to_dict()
    except (ValueError, TypeError, StrictDataclassError) as e:
        raise UserError(f"the LLaVA config.json is not one transformers can read: {str(e)[:300]}") from e


def vision_config_from_hf(vision: dict, feature_layer: int | list[int], strategy: str) -> VisionConfig:
    family = FAMILIES.get(vision["model_type"])
    if family is None:
        raise UserError(
            f"vision_config.model_type '{vision['model_type']}' is not supported; mmscale imports "
            f"{' and '.join(FAMILIES)} towers"
        )
    problems = []
    if strategy != STRATEGY[family]:
        problems.append(
            f"vision_feature_select_strategy '{strategy}' with a {family} tower (supported: '{STRATEGY[family]}', "
            "patch tokens only: mmscale never passes CLIP's class token on, and SigLIP has none to drop)"
        )
    if vision["hidden_act"] not in _ACTIVATIONS:
        problems.append(f"vision_config.hidden_act '{vision['hidden_act']}' (supported: {', '.join(_ACTIVATIONS)})")
    if vision.get("num_channels", 3) != 3:
        problems.append(f"vision_config.num_channels={vision['num_channels']} (RGB only)")
    if problems:
        raise UserError("the LLaVA config uses settings mmscale does not support: " + "; ".join(problems))
    layers = (feature_layer,) if isinstance(feature_layer, int) else tuple(feature_layer)
    mean, std = (CLIP_MEAN, CLIP_STD) if family == "clip" else (SIGLIP_MEAN_STD, SIGLIP_MEAN_STD)
    return VisionConfig(
        preset=None,
        family=family,
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        hidden_size=vision["hidden_size"],
        num_layers=vision["num_hidden_layers"],
        num_heads=vision["num_attention_heads"],
        intermediate_size=vision["intermediate_size"],
        activation=_ACTIVATIONS[vision["hidden_act"]],
        layer_norm_eps=vision["layer_norm_eps"],
        feature_layers=layers,
        post_norm=False,
        image_mean=mean,
        image_std=std,
    )


def config_from_hf(hf_config: dict) -> DecoderModelConfig:
    """Our model config for a LlavaForConditionalGeneration config.json (Llama text model)."""
    hf = complete(hf_config)
    if hf["projector_hidden_act"] != "gelu":
        raise UserError(
            f"projector_hidden_act '{hf['projector_hidden_act']}' is not supported (only 'gelu', as in LLaVA-1.5)"
        )
    # LlavaConfig keeps the tie flag at the top level; the text config's copy may be stale.
    text = {**hf["text_config"], "tie_word_embeddings": hf["tie_word_embeddings"]}
    try:
        return DecoderModelConfig(
            vision=vision_config_from_hf(
                hf["vision_config"], hf["vision_feature_layer"], hf["vision_feature_select_strategy"]
            ),
            connector=ConnectorConfig(type="mlp", bias=hf["multimodal_projector_bias"]),
            llm=llama.config_from_hf(text),
        )
    except ValidationError as e:
        raise UserError(f"the LLaVA config does not fit mmscale's model config: {e}") from e


def image_token_id_from_hf(hf_config: dict) -> int:
    hf = complete(hf_config)
    token, vocab = hf["image_token_index"], hf["text_config"]["vocab_size"]
    if not 0 <= token < vocab:
        raise UserError(f"image_token_index={token} lies outside the text model's vocabulary of {vocab}")
    return token


def problems(cfg: ModelConfig) -> list[str]:
    """What of `cfg` LLaVA cannot express."""
    if cfg.arch != "decoder":  # a cross-attention model has no tower or connector to compare
        return [f"model.arch={cfg.arch} (LLaVA is the decoder arch)"]
    found = []
    if cfg.connector.type != "mlp":
        found.append(f"model.connector.type={cfg.connector.type} (LLaVA's projector is the mlp)")
    if cfg.vision.post_norm:
        found.append("model.vision.post_norm=true (LLaVA's features skip the final LayerNorm)")
    return found


def config_to_hf(cfg: ModelConfig, vocab_size: int, image_token_id: int, token_ids: dict | None = None) -> dict:
    """A LlavaForConditionalGeneration config.json for our model; the inverse of `config_from_hf`.

    `token_ids`: the tokenizer's bos/eos/pad_token_id, for the text config (transformers'
    defaults are Llama 2's).

    The tower is described as built: `depth` blocks, the feature layers counted from 0.
    """
    vision, unexpressed = cfg.vision, problems(cfg)
    if unexpressed:
        raise UserError("the model cannot be written as LLaVA: " + "; ".join(unexpressed))
    layers = list(vision.feature_layer_ids)
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": vision_config_to_hf(vision),
        "text_config": {**llama.config_to_hf(cfg.llm, vocab_size), **(token_ids or {})},
        "image_token_index": image_token_id,
        "image_seq_length": cfg.image_tokens,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": cfg.connector.bias,
        "vision_feature_layer": layers[0] if len(layers) == 1 else layers,
        "vision_feature_select_strategy": STRATEGY[vision.family],
        "tie_word_embeddings": cfg.llm.tie_embeddings,
    }


def vision_config_to_hf(vision: VisionConfig) -> dict:
    """The CLIPVisionConfig / SiglipVisionConfig of our tower, as built: `depth` blocks, no pooling head."""
    vision_config = {
        "model_type": "clip_vision_model" if vision.family == "clip" else "siglip_vision_model",
        "hidden_size": vision.hidden_size,
        "intermediate_size": vision.mlp_size,
        "num_hidden_layers": vision.depth,
        "num_attention_heads": vision.num_heads,
        "num_channels": 3,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "hidden_act": _HF_ACTIVATIONS[vision.activation],
        "layer_norm_eps": vision.layer_norm_eps,
    }
    if vision.family == "siglip":
        vision_config["vision_use_head"] = False
    return vision_config


def canonical(key: str) -> str:
    """A LLaVA weight name of any transformers layout in transformers 5's in-memory layout."""
    for pattern, target in _RENAMES:
        key = pattern.sub(target, key)
    return key


def unbuilt(name: str, vision: VisionConfig) -> bool:
    """Whether a tower weight belongs to a part our tower does not build."""
    block = re.match(r"encoder\.layers\.(\d+)\.", name)
    if block:
        return int(block[1]) >= vision.depth
    return name.startswith("head.") or (name.startswith("post_layernorm.") and not vision.post_norm)


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], cfg: DecoderModelConfig) -> dict[str, torch.Tensor]:
    """Our `DecoderVLM` tensors out of a LLaVA state dict in any of transformers' layouts.

    UserError for keys that belong to none of tower, projector and language model.
    """
    hf_state = {canonical(k): v for k, v in hf_state.items()}
    llm = llama.state_dict_from_hf(hf_state, prefix=LLM, head_prefix="")
    state = {"language_model." + k: v for k, v in llm.items()}
    stray = []
    for key, tensor in hf_state.items():
        if key.startswith(VISION):
            name = key.removeprefix(VISION)
            if not unbuilt(name, cfg.vision):
                state["vision_tower." + name] = tensor
        elif key.startswith(PROJECTOR):
            state["connector." + key.removeprefix(PROJECTOR)] = tensor
        elif not key.startswith((LLM, HEAD)):
            stray.append(key)
    if stray:
        raise UserError(f"weights that are not part of a LLaVA model (another architecture?): {listed(sorted(stray))}")
    return state


def state_dict_to_hf(state: dict[str, torch.Tensor], cfg: DecoderModelConfig) -> dict[str, torch.Tensor]:
    """transformers' keys (5.x in-memory layout) for our state dict; the inverse of the import.

    transformers' towers always hold a `post_layernorm`, which LLaVA never applies; a model
    without one gets an identity LayerNorm so the export loads without missing weights.
    """
    llm = {k.removeprefix("language_model."): v for k, v in state.items() if k.startswith("language_model.")}
    out = llama.state_dict_to_hf(llm, cfg.llm.tie_embeddings, prefix=LLM, head_prefix="")
    for key, tensor in state.items():
        if key.startswith("vision_tower."):
            out[VISION + key.removeprefix("vision_tower.")] = tensor
        elif key.startswith("connector."):
            out[PROJECTOR + key.removeprefix("connector.")] = tensor
    if not cfg.vision.post_norm:
        out[VISION + "post_layernorm.weight"] = torch.ones(cfg.vision.hidden_size)
        out[VISION + "post_layernorm.bias"] = torch.zeros(cfg.vision.hidden_size)
    return out


def load_decoder_vlm_state(model: DecoderVLM, state: dict[str, torch.Tensor], assign: bool = False) -> None:
    """Copy `state_dict_from_hf` tensors into `model` (`assign`: make them its
    parameters, as for a model built on the meta device); UserError names what does not fit."""
    llm = {k.removeprefix("language_model."): v for k, v in state.items() if k.startswith("language_model.")}
    rest = {k: v for k, v in state.items() if not k.startswith("language_model.")}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("language_model.")}
    problems = weight_problems(expected, rest)
    if problems:
        raise UserError("the LLaVA vision tower / projector weights do not fit the config: " + "; ".join(problems))
    llama.load_llm_state(model.language_model, llm, assign)
    model.load_state_dict(rest, strict=False, assign=assign)


def load_llava(folder: str | Path, fp32: bool = True) -> DecoderVLM:
    """A `DecoderVLM` with the weights of a local LlavaForConditionalGeneration folder: in fp32, or
    (`fp32=False`) in the dtypes the folder stores, which only an import that writes them out wants."""
    hf_config = read_config(folder)
    architectures = hf_config.get("architectures") or ["LlavaForConditionalGeneration"]
    if "LlavaForConditionalGeneration" not in architectures:
        raise UserError(
            f"{folder} holds a {', '.join(architectures)}, not a LlavaForConditionalGeneration; point at a LLaVA folder"
        )
    cfg = config_from_hf(hf_config)
    state = state_dict_from_hf(read_state_dict(folder), cfg)
    if fp32:
        state = as_fp32(state)
    # Built without the random init the weights overwrite anyway (minutes for 7B); the folder's
    # tensors become the parameters, not copied into allocated ones (the weights exist once).
    with torch.device("meta"):
        model = DecoderVLM(cfg, cfg.llm.vocab_size, image_token_id_from_hf(hf_config))
    load_decoder_vlm_state(model, state, assign=True)
    model.language_model.tie_weights()
    return model


class LlavaAdapter(Adapter):
    name, model_type = "LLaVA", "llava"
    model_class_name, config_class_name = "LlavaForConditionalGeneration", "LlavaConfig"

    def config_from_hf(self, hf_config: dict, folder: Path | None = None) -> ModelConfig:
        return config_from_hf(hf_config)  # config.json holds all of it

    def config_to_hf(self, cfg: ModelConfig, vocab_size: int, image_token_id: int,
                     token_ids: dict | None = None) -> dict:
        return config_to_hf(cfg, vocab_size, image_token_id, token_ids)

    def state_dict_from_hf(self, hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        return state_dict_from_hf(hf_state, cfg)

    def state_dict_to_hf(self, state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        return state_dict_to_hf(state, cfg)

    def problems(self, cfg: ModelConfig) -> list[str]:
        return problems(cfg)


LLAVA = LlavaAdapter()
