"""Starting a recipe's model from released weights: the local folders of `model.pretrained`.

Each folder's config.json must describe the architecture the recipe configures; a
difference is a UserError naming the key, before any weight is copied. Settings that do
not change the weights (image preprocessing, which layers feed the connector,
activation checkpointing) may differ.

A model built under `deepspeed.zero.Init` (ZeRO-3) is filled one module at a time: each
module's parameters are gathered whole on every rank, rank 0 copies the folder's tensors
into them, and its result is broadcast before they are partitioned again. Only rank 0
reads the tensors; the other ranks read the files' headers, so that every rank runs the
same checks and raises the same UserError.

What was loaded is reported (`Loaded`), so that a run whose frozen weights all come from
these folders can leave them out of its checkpoints (training.checkpoint) and a conversion
can read them back from here (`pretrained_weights`). The folders are read through the model
families' adapters (mmscale.models.hf).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from pydantic import BaseModel
from safetensors import safe_open
from torch import nn

from mmscale.config.model import ModelConfig
from mmscale.errors import UserError
from mmscale.models.cross_attention_vlm import CrossAttentionBlock, cross_attention_layer_indices
from mmscale.models.hf import LLAVA, MLLAMA, MOLMO2, adapter_for, llama, llava, molmo2
from mmscale.models.hf.folder import read_config, read_state_dict
from mmscale.models.initialise import gathered, is_partitioned

# Fields a recipe may set freely: they do not change which weights exist or their shapes.
FREE = {
    "vision": {
        "preset", "resize", "image_mean", "image_std", "feature_layers", "post_norm", "activation_checkpointing"
    },
    "tiled_vision": {"image_mean", "image_std", "activation_checkpointing"},
    "llm": {"activation_checkpointing", "vocab_size"},
}


def check_agrees(ours: BaseModel, theirs: BaseModel, key: str, folder: str | Path) -> None:
    """UserError listing every field of section `key` in which the recipe and the folder differ."""
    free = FREE.get(key.rsplit(".", 1)[-1], set())
    diffs = [
        f"{key}.{name}={getattr(ours, name)!r} but the folder has {getattr(theirs, name)!r}"
        for name in type(ours).model_fields
        if name not in free and _resolved(ours, name) != _resolved(theirs, name)
    ]
    if diffs:
        raise UserError(
            f"the recipe does not describe the weights in {folder}: {'; '.join(diffs[:6])}; set these keys "
            f"as {folder}/config.json has them"
        )


def _resolved(section: BaseModel, name: str) -> object:
    """A field's value as the model builds it: a vision tower's `intermediate_size: null` is 4 x
    hidden_size and an LLM's `head_dim: null` hidden_size / num_heads, which an exported
    config.json states explicitly (its own export must load back)."""
    if name == "intermediate_size" and hasattr(section, "mlp_size"):
        return section.mlp_size
    if name == "head_dim" and hasattr(section, "head_size"):
        return section.head_size
    return getattr(section, name)


@dataclass
class Loaded:
    """What `load_pretrained` copied, by parameter name in the model: the folder each parameter
    came from whole, and the rows of a vocabulary matrix that grew that no folder gave (their
    fresh initialisation, in the model's dtype at loading)."""

    folders: dict[str, str] = field(default_factory=dict)
    new_rows: dict[str, torch.Tensor] = field(default_factory=dict)


def load_pretrained(model: nn.Module, cfg: ModelConfig) -> Loaded:
    """Copy the weights of `cfg.pretrained`'s folders into `model` (built from `cfg`)."""
    loaded = Loaded()
    for folder, state in _loads(model, cfg, loaded):
        loaded.folders.update({name: folder for name in state if name not in loaded.new_rows})
    return loaded


def pretrained_weights(model: nn.Module, cfg: ModelConfig, names: Collection[str]) -> dict[str, torch.Tensor]:
    """The tensors `cfg.pretrained`'s folders give the parameters `names` of `model` (built from
    `cfg`, typically on the meta device, where the copies cost nothing), after the same checks
    as `load_pretrained`; a vocabulary matrix that grew without its new rows."""
    wanted = set(names)
    return {name: tensor for _, state in _loads(model, cfg, Loaded())
            for name, tensor in state.items() if name in wanted}


def _loads(model: nn.Module, cfg: ModelConfig, loaded: Loaded) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Each folder in turn, checked and copied into `model`: (folder, the tensors it gave, by
    parameter name in `model`); the rows of a matrix that grew go to `loaded.new_rows`."""
    sources = cfg.pretrained
    if sources.vlm is not None:
        load = {LLAVA: _load_llava, MLLAMA: _load_mllama, MOLMO2: _load_molmo2}[adapter_for(cfg)]
        yield sources.vlm, load(model, cfg, sources.vlm, loaded)
    if sources.vision is not None:
        yield sources.vision, _load_vision_tower(model, cfg, sources.vision, loaded)
    if sources.llm is not None:
        yield sources.llm, _load_llm(model, cfg, sources.llm, loaded)


def _load_llava(model: nn.Module, cfg: ModelConfig, folder: str, loaded: Loaded) -> dict[str, torch.Tensor]:
    theirs = LLAVA.config_from_hf(read_config(folder), Path(folder))
    for section in ("vision", "connector", "llm"):
        check_agrees(getattr(cfg, section), getattr(theirs, section), f"model.{section}", folder)
    # With the recipe's feature layers: the tower builds (and so loads) only the blocks they reach.
    state = LLAVA.state_dict_from_hf(_read_weights(folder, model), cfg)
    return _load_checked(model, _tied(state, cfg, prefix="language_model."), folder, loaded)


def _load_molmo2(model: nn.Module, cfg: ModelConfig, folder: str, loaded: Loaded) -> dict[str, torch.Tensor]:
    hf = molmo2.complete(read_config(folder))
    theirs = molmo2.config_from_hf(hf, *molmo2.processor_configs(Path(folder)))
    # The connector's intermediate_size: null is the LLM's, which the folder states.
    width = cfg.connector.intermediate_size or cfg.llm.intermediate_size
    ours = {"connector": cfg.connector.model_copy(update={"intermediate_size": width})}
    for section in ("vision", "connector", "crops", "llm"):
        check_agrees(ours.get(section, getattr(cfg, section)), getattr(theirs, section), f"model.{section}", folder)
    # The adapter was trained on these layers, in this order, of pixels normalised so; and the
    # image markers' embedding rows are the folder's only at its ids.
    for name, key in (("feature_layer_ids", "feature_layers"), ("image_mean", "image_mean"), ("image_std", "image_std")):
        if getattr(cfg.vision, name) != getattr(theirs.vision, name):
            raise UserError(f"model.vision.{key} is {list(getattr(cfg.vision, key))} but {folder} has "
                            f"{list(getattr(theirs.vision, key))}; set it as the folder has it")
    released = {"patch": hf["image_patch_id"], "start": hf["image_start_token_id"],
                "low-resolution start": hf["low_res_image_start_token_id"], "end": hf["image_end_token_id"]}
    ours_ids = dict(zip(("patch", "column", "start", "low-resolution start", "end"), model.tokens.markers))
    differ = [f"{k} {ours_ids[k]} vs {v}" for k, v in released.items() if ours_ids[k] != v]
    if differ:
        raise UserError(f"the tokenizer's image marker ids differ from {folder}'s ({', '.join(differ)}): train with "
                        "the folder's tokenizer, whose markers its embedding rows were trained for")
    if _reads_tensors(model):
        state = molmo2.folder_state_dict(folder, cfg)
    else:  # the shapes only (the configs agree): rank 0 reads and broadcasts the values
        state = {k: torch.empty(shape, device="meta") for k, shape in _parameter_shapes(model).items()}
    return _load_checked(model, state, folder, loaded)


def _load_mllama(model: nn.Module, cfg: ModelConfig, folder: str, loaded: Loaded) -> dict[str, torch.Tensor]:
    theirs = MLLAMA.config_from_hf(read_config(folder), Path(folder))
    for section in ("tiled_vision", "llm"):
        check_agrees(getattr(cfg, section), getattr(theirs, section), f"model.{section}", folder)
    ours_layers, their_layers = cross_attention_layer_indices(cfg), cross_attention_layer_indices(theirs)
    if ours_layers != their_layers:  # compared resolved: null means Llama 3.2's default positions
        raise UserError(
            f"model.cross_attention.layers resolves to {list(ours_layers)} but {folder} has {list(their_layers)}"
        )
    state = MLLAMA.state_dict_from_hf(_read_weights(folder, model), cfg)
    return _load_checked(model, state, folder, loaded)


def _load_vision_tower(model: nn.Module, cfg: ModelConfig, folder: str, loaded: Loaded) -> dict[str, torch.Tensor]:
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
    whole = "vision_config" in config  # a CLIPModel / SiglipModel, whose text half is left out
    state = {}
    for key, tensor in _read_weights(folder, model).items():
        # transformers 4 saved a vision model's weights under "vision_model.", transformers 5 without it.
        name = key.removeprefix("vision_model.")
        if (name != key or not whole) and not llava.unbuilt(name, cfg.vision):
            state[name] = tensor
    return _load_checked(model.vision_tower, state, folder, loaded, prefix="vision_tower.")


def _load_llm(model: nn.Module, cfg: ModelConfig, folder: str, loaded: Loaded) -> dict[str, torch.Tensor]:
    """A Llama-, Qwen2- or Qwen3ForCausalLM folder into the LLM (decoder), or into the self-attention layers and
    embeddings of a cross-attention model, whose cross-attention layers start fresh."""
    check_agrees(cfg.llm, llama.config_from_hf(read_config(folder)), "model.llm", folder)
    state = _tied(llama.state_dict_from_hf(_read_weights(folder, model)), cfg)
    lm = model.language_model
    # A VLM's vocabulary adds tokens to the LLM's (LLaVA: <image> and padding to 32064 over
    # Vicuna's 32000; Mllama: 8 rows): the released rows go first, the new ones keep their
    # fresh initialisation.
    own = _parameter_shapes(lm)
    grown = {key for key in (llama.EMBED, llama.HEAD) if key in state and _grows(state[key].shape, own[key], folder)}
    if cfg.arch == "decoder":
        return _load_checked(lm, state, folder, loaded, prefix="language_model.", grown=grown)
    self_layers = [i for i, layer in enumerate(lm.layers) if not isinstance(layer, CrossAttentionBlock)]
    renamed = {}
    for key, tensor in state.items():
        if key.startswith("layers."):
            index, rest = key.removeprefix("layers.").split(".", 1)
            key = f"layers.{self_layers[int(index)]}.{rest}"
        renamed[key] = tensor
    expected = {k for k in own if not _in_cross_layer(k, lm)}
    return _load_checked(lm, renamed, folder, loaded, prefix="language_model.", expected=expected, grown=grown)


def _tied(state: dict[str, torch.Tensor], cfg: ModelConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """A tied LLM's folder holds no lm_head (transformers leaves it out): it is the embedding."""
    head, embed = prefix + llama.HEAD, prefix + llama.EMBED
    if cfg.llm.tie_embeddings and head not in state and embed in state:
        return {**state, head: state[embed]}
    return state


def _grows(released: torch.Size, own: torch.Size, folder: str) -> bool:
    """Whether a vocabulary matrix of the folder has fewer rows than the model's (a vocabulary
    that grew); UserError if it does not fit at all."""
    if released[0] > own[0] or released[1:] != own[1:]:
        raise UserError(
            f"{folder}'s vocabulary matrix {tuple(released)} does not fit the model's {tuple(own)}; "
            "model.llm.vocab_size must be at least the folder's vocab_size"
        )
    return released != own


def _in_cross_layer(key: str, lm: nn.Module) -> bool:
    return key.startswith("layers.") and isinstance(lm.layers[int(key.split(".")[1])], CrossAttentionBlock)


def _load_checked(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    folder: str,
    loaded: Loaded,
    prefix: str = "",
    expected: set[str] | None = None,
    grown: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """Copy `state` into `module`'s parameters (named `prefix` + name in the model), after a
    UserError naming missing, unexpected and misshapen weights; returns `state` by parameter name
    in the model. The weights named in `grown` may have fewer rows: they fill the first rows, and
    the rows after them go to `loaded.new_rows`."""
    own = _parameter_shapes(module)
    expected = set(own) if expected is None else expected
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - set(own))
    misshapen = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k])}" for k in expected & set(state)
                 if k not in grown and state[k].shape != own[k]]
    if missing or unexpected or misshapen:
        raise UserError(
            f"the weights in {folder} do not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}, "
            f"shapes (folder vs model) {misshapen[:4]}"
        )
    new_rows = _copy(module, state)
    loaded.new_rows.update({prefix + name: rows for name, rows in new_rows.items()})
    return {prefix + name: tensor for name, tensor in state.items()}


def _parameter_shapes(module: nn.Module) -> dict[str, torch.Size]:
    """Every parameter's full shape by name (a tied one under each of its names), also under ZeRO-3."""
    return {name: getattr(p, "ds_shape", p.shape) for name, p in module.named_parameters(remove_duplicate=False)}


def _copy(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state`'s tensors into `module`'s parameters of the same names; a tensor with fewer rows
    fills the first rows, and the parameter's other rows are returned (a copy, on every rank).

    One submodule at a time, so under ZeRO-3 at most one submodule's parameters are whole
    (the largest: the embedding table); rank 0, the only one that read the tensors, copies.
    """
    writes, new_rows = _reads_tensors(module), {}
    with torch.no_grad():
        for prefix, sub in module.named_modules():
            targets = [(k, state[k], p) for k, p in sub.named_parameters(prefix=prefix, recurse=False) if k in state]
            if not targets:
                continue
            with gathered(p for _, _, p in targets):
                for name, tensor, param in targets:
                    if tensor.shape != param.shape and not param.is_meta:  # gathered: on every rank
                        new_rows[name] = param[tensor.shape[0]:].detach().cpu().clone()
                    if writes:
                        (param if tensor.shape == param.shape else param[: tensor.shape[0]]).copy_(tensor)
    return new_rows


def _reads_tensors(model: nn.Module) -> bool:
    # Without ZeRO-3 partitioning every rank holds, so loads, the whole model.
    return not any(is_partitioned(p) for p in model.parameters()) or dist.get_rank() == 0


def _read_weights(folder: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """The folder's tensors; for a ZeRO-3 model on ranks other than 0, shape-only (meta)
    tensors from the files' headers: enough for the checks, and rank 0 broadcasts the values."""
    if _reads_tensors(model):
        return read_state_dict(folder)
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return read_state_dict(folder)  # raises rank 0's UserError for a folder without weights
    shapes = {}
    for file in files:
        with safe_open(file, framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                shapes[key] = torch.empty(weights.get_slice(key).get_shape(), device="meta")
    return shapes
