"""The adapter between `Molmo2VLM` and transformers' Molmo2ForConditionalGeneration (`MOLMO2`):
config, weights and model inputs, both directions.

The weight maps work on transformers' in-memory names (`model.vision_tower.layers.0.self_attn.q_proj`,
...). Its `save_pretrained` writes Molmo2's original checkpoint layout (fused `att_proj`, `wte`
split in two) through a conversion table of its own, so folders are read and written through
transformers (`from_pretrained`, `save_pretrained`) rather than by reading safetensors here: one
definition of that layout, kept by the library that owns it.

Differences of form, converted here:
- the tower's patch embedding is a Linear over patches flattened as (row, column, channel);
  ours is CLIP/SigLIP's Conv2d, (channel, row, column): the same weights, permuted;
- transformers counts the adapter's `vision_feature_layer` from the first block (0 is block
  1's output, -1 the last); ours count hidden states, 0 being the embeddings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from pydantic import ValidationError
from transformers import AutoTokenizer, Molmo2Config, Molmo2ForConditionalGeneration

from mmscale.config.model import POOL_WINDOW, ConnectorConfig, CropsConfig, DecoderModelConfig, LLMConfig, ModelConfig
from mmscale.config.towers import SIGLIP_MEAN_STD, VisionConfig
from mmscale.data.multicrop import COLUMN, END, LOW_RES_START, PATCH, START, ImageTokenIds
from mmscale.errors import UserError
from mmscale.models.hf.adapter import Adapter
from mmscale.models.hf.folder import read_config

PATCH_EMBED = "vision_tower.embeddings.patch_embedding.weight"
# transformers' in-memory names <-> ours, as prefixes (every tensor's but the patch embedding's
# weight, which also changes shape); `{}` stands for a block number or a q/k/v/o letter. One
# table serves both directions: `_rename` takes the longest prefix that matches, so o_proj's rule
# goes before its block's and lm_head's before the language model's.
_PREFIXES = (
    ("model.vision_tower.patch_embedding.", "vision_tower.embeddings.patch_embedding."),
    ("model.vision_tower.positional_embedding", "vision_tower.embeddings.position_embedding.weight"),
    ("model.vision_tower.layers.{}.self_attn.o_proj.", "vision_tower.encoder.layers.{}.self_attn.out_proj."),
    ("model.vision_tower.layers.", "vision_tower.encoder.layers."),
    ("model.multi_modal_projector.image_pooling_2d.{}_proj.", "connector.pool.w{}."),
    ("model.multi_modal_projector.image_projector.gate_proj.", "connector.w1."),
    ("model.multi_modal_projector.image_projector.up_proj.", "connector.w3."),
    ("model.multi_modal_projector.image_projector.down_proj.", "connector.w2."),
    ("model.language_model.", "language_model."),
    ("lm_head.", "language_model.lm_head."),
)


def _rename(key: str, to_ours: bool) -> str | None:
    """`key` with its prefix renamed (transformers' to ours, or back), or None if no rule has it."""
    rules = sorted(((theirs, ours) if to_ours else (ours, theirs) for theirs, ours in _PREFIXES),
                   key=lambda rule: -len(rule[0]))
    for source, target in rules:
        match = re.match(re.escape(source).replace(r"\{\}", r"([0-9]+|[qkvo])"), key)
        if match:
            return target.format(*match.groups()) + key[match.end():]
    return None


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], cfg: DecoderModelConfig) -> dict[str, torch.Tensor]:
    """Our `Molmo2VLM` tensors for transformers' in-memory Molmo2 state dict; tower blocks past
    the deepest feature layer (never built here) are dropped."""
    state, unknown = {}, []
    for key, tensor in hf_state.items():
        ours = _rename(key, to_ours=True)
        if ours is None:
            unknown.append(key)
            continue
        block = re.match(r"vision_tower\.encoder\.layers\.(\d+)\.", ours)
        if block and int(block.group(1)) >= cfg.vision.depth:
            continue
        if ours == PATCH_EMBED:  # (dim, row * col * channel) -> Conv2d's (dim, channel, row, col)
            patch = cfg.vision.patch_size
            tensor = tensor.view(tensor.shape[0], patch, patch, 3).permute(0, 3, 1, 2)
        state[ours] = tensor
    if unknown:
        raise UserError(f"weights mmscale's Molmo2 does not have (unsupported checkpoint?): {sorted(unknown)[:8]}")
    return state


def state_dict_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' in-memory Molmo2 names for our state dict; the inverse of `state_dict_from_hf`."""
    out = {}
    for key, tensor in state.items():
        if key == PATCH_EMBED:
            tensor = tensor.permute(0, 2, 3, 1).reshape(tensor.shape[0], -1)
        out[_rename(key, to_ours=False)] = tensor
    return out


def _unsupported(hf: dict) -> list[str]:
    vision, adapter, text = hf["vision_config"], hf["adapter_config"], hf["text_config"]
    problems = []
    side = vision["image_size"]
    if side[0] != side[1]:
        problems.append(f"vision_config.image_size {side} (square crops only, as Molmo2's processor cuts them)")
    if vision["num_position_embeddings"] != (side[0] // vision["patch_size"]) ** 2:
        problems.append(f"vision_config.num_position_embeddings={vision['num_position_embeddings']} (one per patch)")
    if adapter["num_attention_heads"] != vision["num_attention_heads"]:
        problems.append("adapter_config.num_attention_heads differs from the tower's (our pooling uses the tower's)")
    for name, part in (("vision_config", vision), ("adapter_config", adapter)):
        if part["num_key_value_heads"] != part["num_attention_heads"]:
            problems.append(f"{name}.num_key_value_heads={part['num_key_value_heads']} (as many as query heads)")
        if part["head_dim"] * part["num_attention_heads"] != vision["hidden_size"]:
            problems.append(f"{name}.head_dim * num_attention_heads != the tower's hidden_size {vision['hidden_size']}")
        if not part["attention_bias"]:
            problems.append(f"{name}.attention_bias=false (our attention has biases)")
    if vision["hidden_act"] != "gelu_pytorch_tanh":
        problems.append(f"vision_config.hidden_act '{vision['hidden_act']}' (only gelu_pytorch_tanh)")
    if adapter["hidden_size"] != vision["hidden_size"]:
        problems.append("adapter_config.hidden_size differs from the tower's")
    if adapter["hidden_act"] != "silu" or adapter["mlp_bias"]:
        problems.append("adapter_config: hidden_act must be silu and mlp_bias false")
    if adapter["text_hidden_size"] != text["hidden_size"]:
        problems.append("adapter_config.text_hidden_size differs from text_config.hidden_size")
    rope = text.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"text_config rope type '{rope['rope_type']}' (only the default)")
    if text["hidden_act"] != "silu" or text.get("attention_dropout"):
        problems.append("text_config: hidden_act must be silu, attention_dropout 0")
    if hf["tie_word_embeddings"] or text.get("tie_word_embeddings"):
        problems.append("tie_word_embeddings=true (the embedding table is longer than the output layer)")
    return problems


def crops_from_hf(image_processor: dict, processor: dict | None = None, vision: dict | None = None) -> CropsConfig:
    """model.crops for a Molmo2 image processor's config and its processor's (processor_config.json),
    missing keys taking transformers' defaults; UserError for a layout mmscale does not cut (checked
    against the tower's `vision` config where given)."""
    processor = processor or {}
    columns = processor.get("image_use_col_tokens", True)
    overview_columns = processor.get("use_single_crop_col_tokens")  # None: as the crops' view
    problems = []
    if not processor.get("use_single_crop_start_token", True):
        problems.append("use_single_crop_start_token=false (the overview starts with <low_res_im_start> here)")
    if list(image_processor.get("pooling_size", [POOL_WINDOW, POOL_WINDOW])) != [POOL_WINDOW, POOL_WINDOW]:
        problems.append(f"pooling_size={image_processor['pooling_size']} (only {POOL_WINDOW}x{POOL_WINDOW})")
    size = image_processor.get("size", {})
    if vision is not None and (image_processor.get("patch_size", vision["patch_size"]) != vision["patch_size"]
                               or size.get("height", vision["image_size"][0]) != vision["image_size"][0]
                               or size.get("width", vision["image_size"][1]) != vision["image_size"][1]):
        problems.append("the image processor's size or patch_size differs from the tower's")
    if problems:
        raise UserError("the Molmo2 processor config uses settings mmscale does not support: " + "; ".join(problems))
    return CropsConfig(
        max_crops=image_processor.get("max_crops", 8),
        overlap_margins=tuple(image_processor.get("overlap_margins", (4, 4))),
        column_tokens=columns,
        overview_column_tokens=columns if overview_columns is None else overview_columns,
    )


def config_from_hf(
    hf: dict, image_processor: dict | None = None, processor: dict | None = None
) -> DecoderModelConfig:
    """Our model config for a Molmo2ForConditionalGeneration config.json (as `to_dict` writes it) and
    its image processor's and processor's configs."""
    unsupported = _unsupported(hf)
    if unsupported:
        raise UserError("the Molmo2 config uses settings mmscale does not support: " + "; ".join(unsupported))
    vision, adapter, text = hf["vision_config"], hf["adapter_config"], hf["text_config"]
    layers = vision["num_hidden_layers"]
    # transformers: i >= 0 is block i's output, hidden state i + 1; negative ones index the same list.
    feature_layers = tuple(i + 1 if i >= 0 else i for i in adapter["vision_feature_layer"])
    try:
        return DecoderModelConfig(
            vision=VisionConfig(
                preset=None, family="siglip", image_size=vision["image_size"][0], patch_size=vision["patch_size"],
                hidden_size=vision["hidden_size"], num_layers=layers, num_heads=vision["num_attention_heads"],
                intermediate_size=vision["intermediate_size"], activation="gelu_tanh",
                layer_norm_eps=vision["layer_norm_eps"], feature_layers=feature_layers, post_norm=False,
                image_mean=tuple((image_processor or {}).get("image_mean", SIGLIP_MEAN_STD)),
                image_std=tuple((image_processor or {}).get("image_std", SIGLIP_MEAN_STD)),
            ),
            connector=ConnectorConfig(type="molmo2", bias=False, intermediate_size=adapter["intermediate_size"]),
            crops=crops_from_hf(image_processor or {}, processor, vision),
            llm=LLMConfig(
                hidden_size=text["hidden_size"], num_layers=text["num_hidden_layers"],
                num_heads=text["num_attention_heads"], num_kv_heads=text["num_key_value_heads"],
                head_dim=text["head_dim"], intermediate_size=text["intermediate_size"],
                rope_theta=float((text.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
                rms_norm_eps=text["rms_norm_eps"], tie_embeddings=False, vocab_size=text["vocab_size"],
                additional_vocab_size=text["additional_vocab_size"], qkv_bias=text["attention_bias"],
                qk_norm=True, qk_norm_over="head" if text["qk_norm_type"] == "qwen3" else "projection",
                norm_after=text["norm_after"],
            ),
        )
    except ValidationError as e:
        raise UserError(f"the Molmo2 config does not fit mmscale's model config: {e}") from e


def image_token_ids_from_hf(hf: dict, column_id: int) -> ImageTokenIds:
    """The image layout's ids: the config's, and `<im_col>`'s, which only the tokenizer knows."""
    return ImageTokenIds.of({PATCH: hf["image_patch_id"], COLUMN: column_id, START: hf["image_start_token_id"],
                             LOW_RES_START: hf["low_res_image_start_token_id"], END: hf["image_end_token_id"]})


def problems(cfg: DecoderModelConfig) -> list[str]:
    """What of `cfg` Molmo2 cannot express."""
    if 0 in cfg.vision.feature_layer_ids:
        return ["model.vision.feature_layers naming hidden state 0 (the embedding output): Molmo2's "
                "vision_feature_layer counts block outputs only"]
    return []


def config_to_hf(
    cfg: DecoderModelConfig, vocab_size: int, tokens: ImageTokenIds, token_ids: dict | None = None
) -> dict:
    """A Molmo2ForConditionalGeneration config dict for our model; the inverse of `config_from_hf`.
    `token_ids`: the tokenizer's bos/eos/pad_token_id, for the text config."""
    vision, llm = cfg.vision, cfg.llm
    unexpressed = problems(cfg)
    if unexpressed:
        raise UserError("the model cannot be written as Molmo2: " + "; ".join(unexpressed))
    heads, head_dim = vision.num_heads, vision.hidden_size // vision.num_heads
    patch, column, start, low_res_start, end = tokens.markers
    return {
        "model_type": "molmo2",
        "architectures": ["Molmo2ForConditionalGeneration"],
        "vision_config": {
            "hidden_size": vision.hidden_size, "intermediate_size": vision.mlp_size, "num_hidden_layers": vision.depth,
            "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": head_dim,
            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": vision.layer_norm_eps,
            "image_size": [vision.image_size, vision.image_size], "patch_size": vision.patch_size,
            "num_position_embeddings": vision.num_patches, "attention_bias": True,
        },
        "adapter_config": {
            "vision_feature_layer": [i - 1 for i in vision.feature_layer_ids],
            "hidden_size": vision.hidden_size, "num_attention_heads": heads, "num_key_value_heads": heads,
            "head_dim": head_dim, "attention_bias": True, "hidden_act": "silu",
            "intermediate_size": cfg.connector.intermediate_size or llm.intermediate_size,
            "text_hidden_size": llm.hidden_size, "mlp_bias": False,
        },
        "text_config": {
            "hidden_size": llm.hidden_size, "num_attention_heads": llm.num_heads,
            "num_key_value_heads": llm.num_kv_heads,
            "head_dim": llm.head_size, "vocab_size": vocab_size, "additional_vocab_size": llm.additional_vocab_size,
            "attention_bias": llm.qkv_bias, "qk_norm_type": "qwen3" if llm.qk_norm_over == "head" else "olmo",
            "num_hidden_layers": llm.num_layers, "intermediate_size": llm.intermediate_size, "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": llm.rope_theta},
            "rms_norm_eps": llm.rms_norm_eps, "norm_after": llm.norm_after, "tie_word_embeddings": False,
            **(token_ids or {}),
        },
        "image_start_token_id": start, "low_res_image_start_token_id": low_res_start, "image_end_token_id": end,
        "image_patch_id": patch, "tie_word_embeddings": False,
        # Video is not trained here; its frame markers point at the image ones.
        "frame_start_token_id": start, "frame_end_token_id": end,
    }


def complete(hf_config: dict) -> dict:
    """A config.json with transformers' defaults filled in (and its legacy layout read)."""
    return Molmo2Config.from_dict(hf_config).to_dict()


def processor_configs(folder: Path) -> tuple[dict | None, dict | None]:
    """The folder's image processor config and processor config, where it has them: in
    processor_config.json (transformers 5) or preprocessor_config.json (older releases). Any
    family's: LLaVA's and Mllama's evaluation reads theirs here too."""
    processor_file, image_file = folder / "processor_config.json", folder / "preprocessor_config.json"
    processor = json.loads(processor_file.read_text()) if processor_file.is_file() else None
    image_processor = (processor or {}).get("image_processor")
    if image_processor is None and image_file.is_file():
        image_processor = json.loads(image_file.read_text())
    return image_processor, processor


def crops_to_hf(crops: torch.Tensor, patch: int) -> torch.Tensor:
    """Our (crops, 3, size, size) pixels -> transformers' (crops, patches, patch * patch * 3)."""
    n, channels, size, _ = crops.shape
    side = size // patch
    grid = crops.permute(0, 2, 3, 1).reshape(n, side, patch, side, patch, channels).transpose(2, 3)
    return grid.reshape(n, side * side, patch * patch * channels)


def inputs_to_hf(inputs: dict[str, torch.Tensor], cfg: ModelConfig, tokens: ImageTokenIds) -> dict:
    """transformers' Molmo2 inputs for ours (with the per-image `image_grids`, `image_num_crops` and
    `image_token_pooling` that the probe and the eval prompts carry): patches flattened its way,
    and the token types that make image tokens attend both ways (padding: none)."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": crops_to_hf(inputs["pixel_values"], cfg.vision.patch_size),
        **{k: inputs[k] for k in ("image_token_pooling", "image_grids", "image_num_crops")},
        "mm_token_type_ids": torch.isin(ids, torch.tensor(tokens.markers)).long() * mask,
    }


def read_folder(
    folder: str, column_id: int | None = None, fp32: bool = True
) -> tuple[DecoderModelConfig, ImageTokenIds, dict[str, torch.Tensor]]:
    """Our config, image token ids and state dict (fp32, or the folder's dtype) of a
    Molmo2ForConditionalGeneration folder.

    `column_id`: the id of `<im_col>`, which the config does not hold; None reads it from the
    folder's tokenizer.
    """
    hf = read_config(folder)
    image_processor, processor = processor_configs(Path(folder))
    cfg = config_from_hf(complete(hf), image_processor, processor)
    if column_id is None:
        if not (Path(folder) / "tokenizer_config.json").is_file():
            raise UserError(f"{folder} has no tokenizer: Molmo2's <im_col> id is only there; add the release's "
                            "tokenizer files")
        column_id = AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(COLUMN)
    state = folder_state_dict(folder, cfg, torch.float32 if fp32 else "auto")
    return cfg, image_token_ids_from_hf(hf, column_id), state


def folder_state_dict(
    folder: str | Path, cfg: DecoderModelConfig, dtype: torch.dtype | str = "auto"
) -> dict[str, torch.Tensor]:
    """Our state dict of a Molmo2 folder in `dtype` ("auto": as stored), read by transformers (see
    the module docstring).

    transformers splits the checkpoint's fused projections (q/k/v, gate/up) into views of one
    tensor; those are copied, since safetensors saves only tensors that own their storage.
    """
    model, info = Molmo2ForConditionalGeneration.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    # transformers fills weights a folder lacks with random ones, and only warns: here that is an error.
    problems = {k: sorted(v)[:4] for k, v in info.items() if k in ("missing_keys", "unexpected_keys") and v}
    if problems:
        raise UserError(f"{folder} does not hold a complete Molmo2 model: {problems}; are its files complete?")
    state = state_dict_from_hf(model.state_dict(), cfg)
    del model
    return {k: v if v.untyped_storage().nbytes() == v.numel() * v.element_size() else v.clone()
            for k, v in state.items()}


class Molmo2Adapter(Adapter):
    name, model_type = "Molmo2", "molmo2"
    model_class_name, config_class_name = "Molmo2ForConditionalGeneration", "Molmo2Config"

    def config_from_hf(self, hf_config: dict, folder: Path | None = None) -> ModelConfig:
        """With transformers' defaults filled in, and the processor configs of `folder` (None:
        transformers' defaults for them too)."""
        return config_from_hf(complete(hf_config), *(processor_configs(folder) if folder else (None, None)))

    def config_to_hf(self, cfg: ModelConfig, vocab_size: int, image_token_id: ImageTokenIds,
                     token_ids: dict | None = None) -> dict:
        return config_to_hf(cfg, vocab_size, image_token_id, token_ids)

    def state_dict_from_hf(self, hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        return state_dict_from_hf(hf_state, cfg)

    def state_dict_to_hf(self, state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        return state_dict_to_hf(state)

    def problems(self, cfg: ModelConfig) -> list[str]:
        return problems(cfg)


MOLMO2 = Molmo2Adapter()
