"""Starting a recipe's model from released weights: the local folders of `model.pretrained`.

Each folder's config.json must describe the architecture the recipe configures; a
difference is a UserError naming the key, before any weight is copied. Settings that do
not change the weights (image preprocessing, which layers feed the connector,
activation checkpointing) may differ.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel
from torch import nn

from mmscale.config.schema import ModelConfig
from mmscale.convert import llava, mllama
from mmscale.convert.hf_folder import read_config, read_state_dict
from mmscale.convert.llama import llm_config_from_hf, llm_state_dict_from_hf, load_llm_state
from mmscale.errors import UserError
from mmscale.models.cross_attention_vlm import CrossAttentionBlock, cross_attention_layer_indices

# Fields a recipe may set freely: they do not change which weights exist or their shapes.
FREE = {
    "vision": {"resize", "image_mean", "image_std", "feature_layers", "post_norm"},
    "tiled_vision": {"image_mean", "image_std"},
    "llm": {"activation_checkpointing", "vocab_size"},
}


def check_agrees(ours: BaseModel, theirs: BaseModel, key: str, folder: str | Path) -> None:
    """UserError listing every field of section `key` in which the recipe and the folder differ."""
    free = FREE.get(key.rsplit(".", 1)[-1], set())
    diffs = [
        f"{key}.{name}={getattr(ours, name)!r} but the folder has {getattr(theirs, name)!r}"
        for name in type(ours).model_fields
        if name not in free and getattr(ours, name) != getattr(theirs, name)
    ]
    if diffs:
        raise UserError(
            f"the recipe does not describe the weights in {folder}: {'; '.join(diffs[:6])}; set these keys "
            f"as {folder}/config.json has them"
        )


def load_pretrained(model: nn.Module, cfg: ModelConfig) -> None:
    """Copy the weights of `cfg.pretrained`'s folders into `model` (built from `cfg`)."""
    sources = cfg.pretrained
    if sources.vlm is not None:
        (_load_llava if cfg.arch == "decoder" else _load_mllama)(model, cfg, sources.vlm)
    if sources.vision is not None:
        _load_vision_tower(model, cfg, sources.vision)
    if sources.llm is not None:
        _load_llm(model, cfg, sources.llm)


def _load_llava(model: nn.Module, cfg: ModelConfig, folder: str) -> None:
    theirs = llava.model_config_from_hf(read_config(folder))
    for section in ("vision", "connector", "llm"):
        check_agrees(getattr(cfg, section), getattr(theirs, section), f"model.{section}", folder)
    # With the recipe's feature layers: the tower builds (and so loads) only the blocks they reach.
    llava.load_decoder_vlm_state(model, llava.decoder_vlm_state_dict_from_hf(read_state_dict(folder), cfg))


def _load_mllama(model: nn.Module, cfg: ModelConfig, folder: str) -> None:
    theirs = mllama.model_config_from_hf(read_config(folder))
    for section in ("tiled_vision", "llm"):
        check_agrees(getattr(cfg, section), getattr(theirs, section), f"model.{section}", folder)
    ours_layers, their_layers = cross_attention_layer_indices(cfg), cross_attention_layer_indices(theirs)
    if ours_layers != their_layers:  # compared resolved: null means Llama 3.2's default positions
        raise UserError(
            f"model.cross_attention.layers resolves to {list(ours_layers)} but {folder} has {list(their_layers)}"
        )
    state = mllama.state_dict_from_hf(read_state_dict(folder))
    _load_checked(model, state, folder)


def _load_vision_tower(model: nn.Module, cfg: ModelConfig, folder: str) -> None:
    """A CLIPVisionModel / SiglipVisionModel folder, or a CLIPModel / SiglipModel one (its text half is ignored)."""
    config = read_config(folder)
    vision = config.get("vision_config", config)
    if vision.get("model_type") not in llava.FAMILIES:
        raise UserError(f"{folder} is not a CLIP or SigLIP vision model (model_type {vision.get('model_type')!r})")
    family = llava.FAMILIES[vision["model_type"]]
    # Fill the fields that released configs leave at transformers' defaults.
    complete = llava.complete({"vision_config": vision, "vision_feature_select_strategy": llava.STRATEGY[family]})
    theirs = llava.vision_config_from_hf(complete["vision_config"], list(cfg.vision.feature_layers), llava.STRATEGY[family])
    check_agrees(cfg.vision, theirs, "model.vision", folder)
    state = {}
    for key, tensor in read_state_dict(folder).items():
        name = key.removeprefix("vision_model.")
        if key.startswith("vision_model.") and not llava.unbuilt(name, cfg.vision):
            state[name] = tensor
    _load_checked(model.vision_tower, state, folder)


def _load_llm(model: nn.Module, cfg: ModelConfig, folder: str) -> None:
    """A LlamaForCausalLM folder into the LLM (decoder), or into the self-attention layers and
    embeddings of a cross-attention model, whose cross-attention layers start fresh."""
    check_agrees(cfg.llm, llm_config_from_hf(read_config(folder)), "model.llm", folder)
    state = llm_state_dict_from_hf(read_state_dict(folder))
    lm = model.language_model
    # A VLM's vocabulary adds tokens to the LLM's (LLaVA: <image> and padding to 32064 over
    # Vicuna's 32000; Mllama: 8 rows): the released rows go first, the new ones keep their
    # fresh initialisation.
    own = lm.state_dict()
    for key in ("embed_tokens.weight", "lm_head.weight"):
        if key in state:
            state[key] = _grown(state[key], own[key], folder)
    if cfg.arch == "decoder":
        load_llm_state(lm, state)
        return
    self_layers = [i for i, layer in enumerate(lm.layers) if not isinstance(layer, CrossAttentionBlock)]
    renamed = {}
    for key, tensor in state.items():
        if key.startswith("layers."):
            index, rest = key.removeprefix("layers.").split(".", 1)
            key = f"layers.{self_layers[int(index)]}.{rest}"
        renamed[key] = tensor
    expected = {k for k in lm.state_dict() if not _in_cross_layer(k, lm)}
    _load_checked(lm, renamed, folder, expected=expected)


def _grown(released: torch.Tensor, own: torch.Tensor, folder: str) -> torch.Tensor:
    """`released` rows on top of the model's own `own` rows, for a vocabulary that grew."""
    if released.shape[0] > own.shape[0] or released.shape[1:] != own.shape[1:]:
        raise UserError(
            f"{folder}'s vocabulary matrix {tuple(released.shape)} does not fit the model's {tuple(own.shape)}; "
            "model.llm.vocab_size must be at least the folder's vocab_size"
        )
    grown = own.detach().clone()
    grown[: released.shape[0]] = released
    return grown


def _in_cross_layer(key: str, lm: nn.Module) -> bool:
    return key.startswith("layers.") and isinstance(lm.layers[int(key.split(".")[1])], CrossAttentionBlock)


def _load_checked(module: nn.Module, state: dict[str, torch.Tensor], folder: str, expected: set[str] | None = None) -> None:
    """load_state_dict with a UserError that names missing, unexpected and misshapen weights."""
    own = module.state_dict()
    expected = set(own) if expected is None else expected
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - set(own))
    misshapen = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in expected & set(state)
                 if state[k].shape != own[k].shape]
    if missing or unexpected or misshapen:
        raise UserError(
            f"the weights in {folder} do not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}, "
            f"shapes (folder vs model) {misshapen[:4]}"
        )
    module.load_state_dict(state, strict=False)
