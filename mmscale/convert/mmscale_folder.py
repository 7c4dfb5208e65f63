"""`mmscale convert --from hf FOLDER --to mmscale OUT`: a released transformers model as an
mmscale model folder, through the same adapters (mmscale.models.hf) `model.pretrained` uses.

    OUT/mmscale_model.yaml     the model section of a recipe, vocabulary size, token ids, origin
    OUT/model.safetensors      the weights under mmscale's names (sharded, with an index, when large)
    OUT/hf_unused/             weights of FOLDER the mmscale model never runs (LLaVA's tower blocks
                               past the feature layer, its unused final LayerNorm, SigLIP's pooling
                               head), kept, with FOLDER's vision config that describes them, so that
                               `--to hf` writes them back and a round trip loses nothing
    OUT/tokenizer/             FOLDER's tokenizer, when it has one

`mmscale convert OUT --to hf` reads such a folder like a training checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from huggingface_hub import save_torch_state_dict
from pydantic import ValidationError
from transformers import AutoTokenizer

from mmscale.config.load import earlier_model_section
from mmscale.config.model import model_config_of
from mmscale.convert.export import DTYPES, Source, load_weights, meta_model
from mmscale.convert.release_files import check_absent, written_whole
from mmscale.data.multicrop import ImageTokenIds
from mmscale.errors import UserError
from mmscale.models.hf import LLAVA, MLLAMA, adapter_for_hf, llava, mllama, molmo2
from mmscale.models.hf.folder import read_config, read_state_dict, stored_float_dtypes, weight_problems

SPEC = "mmscale_model.yaml"
UNUSED = "hf_unused"
TOKENIZER = "tokenizer"
TIED_HEAD = "language_model.lm_head.weight"


def _import(folder: Path) -> tuple[torch.nn.Module, int | ImageTokenIds, dict, dict[str, torch.Tensor], dict | None]:
    """(model, image token id (Molmo2: its layout's ids), text config, unused tensors, FOLDER's
    vision config when it describes parts the model lacks)."""
    config = read_config(folder)
    adapter = adapter_for_hf(config, folder)
    # In the folder's own dtypes: written out as they are, never run.
    if adapter is LLAVA:
        model = llava.load_llava(folder, fp32=False)
        vision = model.cfg.vision

        def is_unused(name: str) -> bool:
            key = llava.canonical(name)
            return key.startswith(llava.VISION) and llava.unbuilt(key.removeprefix(llava.VISION), vision)

        unused = {llava.canonical(k): v for k, v in read_state_dict(folder, keep=is_unused).items()}
        hf = llava.complete(config)
        vision_config = hf["vision_config"] if unused else None
        return model, llava.image_token_id_from_hf(config), hf["text_config"], unused, vision_config
    if adapter is MLLAMA:
        return (mllama.load_mllama(folder, fp32=False), config["image_token_index"], config.get("text_config") or {},
                {}, None)
    cfg, tokens, state = molmo2.read_folder(str(folder), fp32=False)
    model = meta_model(cfg, cfg.llm.vocab_size, tokens)
    problems = weight_problems(model.state_dict(), state)
    if problems:
        raise UserError(f"{folder} does not hold the weights of its model: " + "; ".join(problems))
    model.load_state_dict(state, assign=True)
    return model, tokens, molmo2.complete(config)["text_config"], {}, None


def _stored_dtype(folder: Path) -> str:
    """The dtype most of a folder's floating-point weights have: a bf16 release stays bf16."""
    counts = stored_float_dtypes(folder)
    return "bf16" if counts and counts.most_common(1)[0][0] == "BF16" else "fp32"


def import_hf(folder: Path, out: Path) -> str:
    """Write the mmscale model folder of transformers folder `folder` to `out`; returns a summary."""
    check_absent(out)
    model, image_token_id, text, unused, hf_vision_config = _import(folder)
    dtype = _stored_dtype(folder)
    with written_whole(out) as tmp:
        state = {k: v.to(DTYPES[dtype]) for k, v in model.state_dict().items()}
        if model.cfg.llm.tie_embeddings:
            del state[TIED_HEAD]  # the embedding itself; tied again on load
        save_torch_state_dict(state, tmp)
        if unused:
            (tmp / UNUSED).mkdir()
            save_torch_state_dict(unused, tmp / UNUSED)
        if (folder / "tokenizer_config.json").is_file():
            AutoTokenizer.from_pretrained(folder, local_files_only=True).save_pretrained(tmp / TOKENIZER)
        spec = {
            "model": model.cfg.model_dump(mode="json"),
            "vocab_size": model.language_model.lm_head.weight.shape[0],
            # Molmo2's layout: its tokens' ids, IMAGE_MARKERS order.
            "image_token_id": (list(image_token_id.markers) if isinstance(image_token_id, ImageTokenIds)
                               else image_token_id),
            "token_ids": {k: text.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
            "dtype": dtype,
            "hf_vision_config": hf_vision_config,
            "source": str(folder),
        }
        (tmp / SPEC).write_text(yaml.safe_dump(spec, sort_keys=False))
    kept = f"; kept {len(unused)} weights the model does not run in {out / UNUSED}" if unused else ""
    return f"wrote {out} ({model.cfg.arch} model, {dtype}, {sum(t.numel() for t in state.values()):,} parameters){kept}"


def is_mmscale_folder(path: Path) -> bool:
    return (path / SPEC).is_file()


def from_mmscale_folder(folder: Path) -> Source:
    try:
        spec = yaml.safe_load((folder / SPEC).read_text())
        cfg = model_config_of(earlier_model_section(spec["model"]))
        image_tokens = spec["image_token_id"]
        if isinstance(image_tokens, list):
            image_tokens = ImageTokenIds(image_tokens[0], tuple(image_tokens))
        model = meta_model(cfg, spec["vocab_size"], image_tokens)
    except (ValidationError, KeyError, TypeError, yaml.YAMLError) as e:
        raise UserError(f"{folder / SPEC} does not describe an mmscale model ({type(e).__name__}: {e})") from e
    # Cast as read, and not mapped: a bf16 export then casts them back in place, one by one.
    state = read_state_dict(folder, dtype=torch.float32)  # before the tie: one fp32 embedding, not two
    if cfg.llm.tie_embeddings and "language_model.embed_tokens.weight" in state:
        state[TIED_HEAD] = state["language_model.embed_tokens.weight"]
    tokenizer = None
    if (folder / TOKENIZER).is_dir():
        tokenizer = AutoTokenizer.from_pretrained(folder / TOKENIZER, local_files_only=True)
        if not isinstance(image_tokens, ImageTokenIds):  # Molmo2's tokenizer names its own image token
            tokenizer.image_token = tokenizer.convert_ids_to_tokens(image_tokens)
    extra = read_state_dict(folder / UNUSED) if (folder / UNUSED).is_dir() else {}
    facts = {"name": folder.name, "source": f"the mmscale model folder `{folder}` (imported from `{spec['source']}`)"}
    return Source(cfg, load_weights(model, state, folder), image_tokens, spec["token_ids"], tokenizer,
                  facts, hf_extra=extra, hf_vision_config=spec["hf_vision_config"], dtype=spec["dtype"])
