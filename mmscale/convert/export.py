"""`mmscale convert --to hf`: a training checkpoint (or an mmscale model folder) as a
transformers folder that loads with `from_pretrained`, checked by running it.

The weights go through the model family's adapter (mmscale.models.hf) into a transformers
model built on the meta device, and transformers' own `save_pretrained` writes them, so
the files have exactly the layout and sharding transformers writes. Every export is then
loaded back and compared with the mmscale model (verify.py); only a folder that passes is
moved to OUT. Until then it lives in a `.tmp-` sibling that any failure removes.
"""

from __future__ import annotations

import copy
import gc
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mmscale.config.model import ModelConfig
from mmscale.convert.release_files import write_generation_config, write_model_card, write_processor, written_whole
from mmscale.convert.trained import (
    consolidate,
    final_metrics,
    find_checkpoint,
    load_run_recipe,
    split_training_only,
    with_frozen_weights,
)
from mmscale.convert.verify import Verification, compare, computed_in_fp32, probe_inputs, run_ours, run_theirs
from mmscale.data.multicrop import ImageTokenIds
from mmscale.data.tokenizer import recipe_tokenizer
from mmscale.errors import UserError
from mmscale.models import build_vlm, image_token_ids_for, vocab_size_for
from mmscale.models.hf import adapter_for, molmo2
from mmscale.models.hf.folder import as_fp32, listed, weight_problems
from mmscale.training.checkpoint import MARKER

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MAX_SHARD_SIZE = "5GB"
NEW_TOKENS = 10  # greedy tokens compared


@dataclass
class Source:
    """An mmscale model with its weights, and what the release needs to know about it."""

    cfg: ModelConfig
    model: nn.Module  # fp32 throughout (see load_weights), eval mode
    image_token_id: int | ImageTokenIds  # Molmo2: its image layout's ids
    token_ids: dict[str, int | None]  # bos/eos/pad_token_id
    tokenizer: PreTrainedTokenizerBase | None
    facts: dict[str, str]  # for the model card: name, source, steps, metrics, recipe...
    training_only: tuple[str, ...] = ()
    # transformers-named tensors the mmscale model does not run (LLaVA tower blocks past the
    # feature layer...) and the vision config that describes them, carried from an import so
    # that a round trip loses nothing.
    hf_extra: dict[str, torch.Tensor] = field(default_factory=dict)
    hf_vision_config: dict | None = None
    # The export's default: what a run's model computed in (its bf16 or fp32 weights), or an import's own.
    dtype: str = "fp32"

    @property
    def vocab_size(self) -> int:
        return self.model.language_model.lm_head.weight.shape[0]


def token_ids_of(tokenizer: PreTrainedTokenizerBase) -> dict[str, int | None]:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: object) -> nn.Module:
    """`model` (built on the meta device) holding `state`'s tensors, all in fp32 (not copied where
    they are fp32 already, and others cast one by one in `state` itself: a large model's weights
    exist about once); UserError naming what does not fit.

    One dtype, whatever the source: DeepSpeed's consolidation of a bf16 run gives its trained
    parameters as fp32 master weights but its frozen ones as the bf16 they trained in, and a
    module with both would fail in its first forward. bf16 values are exact in fp32."""
    problems = weight_problems(model.state_dict(), state)
    if problems:
        raise UserError(f"{where} does not hold the weights of its model: " + "; ".join(problems))
    model.load_state_dict(as_fp32(state), strict=True, assign=True)
    tie = getattr(model.language_model, "tie_weights", None)  # the cross-attention LM never ties
    if tie is not None:
        tie()
    return model.eval()


def from_run(path: Path, step: int | None = None, tokenizer_path: str | None = None) -> Source:
    """The model of a training run's checkpoint (the newest complete one, or step `step`)."""
    run_dir, checkpoint = find_checkpoint(path, step)
    recipe = load_run_recipe(run_dir, checkpoint)
    tokenizer_dir = tokenizer_path or recipe.data.tokenizer
    if not Path(tokenizer_dir).exists():
        raise UserError(
            f"the run's tokenizer {tokenizer_dir} does not exist here; run from the directory the run was "
            "started in, or pass --tokenizer"
        )
    tokenizer = recipe_tokenizer(recipe, tokenizer_dir)
    image_tokens = image_token_ids_for(recipe.model, tokenizer)
    model = meta_model(recipe.model, vocab_size_for(recipe.model, tokenizer), image_tokens)
    marker = json.loads((checkpoint / MARKER).read_text())
    state, training_only = split_training_only(consolidate(checkpoint))
    state = with_frozen_weights(state, model, recipe, checkpoint, marker)
    metrics = final_metrics(run_dir, marker["step"])
    facts = {
        "name": recipe.run.name,
        "source": f"the checkpoint `{checkpoint}`",
        "steps": str(marker["step"]),
        "training data": str(recipe.data.train),
        "validation data": str(recipe.data.val),
        **{f"final {k.replace('_', ' ')}": f"{v:.4f}" for k, v in metrics.items()},
        "recipe": (run_dir / "recipe.yaml").read_text(),
    }
    return Source(recipe.model, load_weights(model, state, f"checkpoint {checkpoint}"), image_tokens,
                  token_ids_of(tokenizer), tokenizer, facts, training_only,
                  dtype=marker.get("dtype", "fp32"))  # older checkpoints do not say: their master weights


def _hf_model(source: Source, dtype: torch.dtype) -> PreTrainedModel:
    """The transformers model of `source` for saving: its weights shared with (or cast from)
    ours, its non-persistent buffers (rotary tables) left on the meta device, so it cannot run."""
    adapter = adapter_for(source.cfg)
    config_dict = adapter.config_to_hf(source.cfg, source.vocab_size, source.image_token_id, source.token_ids)
    if source.hf_vision_config is not None:
        config_dict["vision_config"] = source.hf_vision_config
    config = adapter.config_class.from_dict(config_dict)
    state = {**adapter.state_dict_to_hf(source.model.state_dict(), source.cfg), **source.hf_extra}
    with torch.device("meta"):
        model = adapter.model_class(config)
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if source.cfg.llm.tie_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        # The adapters are tested to cover every weight; so the extra weights of an import are off.
        raise UserError(
            f"the {adapter.name} export left weights unset {listed(sorted(set(result.missing_keys) - tied))} or "
            f"unused {listed(sorted(result.unexpected_keys))}; are the {source.facts['source']} files complete?"
        )
    model.tie_weights()
    return model.to(dtype).eval()


def _reference(source: Source, dtype: torch.dtype, in_place: bool) -> nn.Module:
    """The mmscale model as the export holds it: weights rounded to `dtype` (`in_place`: the
    source's own weights, which it gives up, rather than a copy of them), computed in fp32
    (`computed_in_fp32`), so that the comparison isolates the conversion from bf16 arithmetic."""
    if dtype == torch.float32 or in_place:  # in place: parameter by parameter, the weights exist once
        return source.model.to(dtype)
    rounded = copy.deepcopy(source.model)
    with torch.no_grad():
        for tensor in rounded.state_dict().values():
            tensor.copy_(tensor.to(dtype).float())
    return rounded


def verify_folder(source: Source, folder: Path, dtype: torch.dtype, release_source: bool = False) -> Verification:
    """Run the mmscale model, then the folder's, on the same probe and compare them. With
    `release_source` the source's weights are rounded in place and let go (moved to the meta
    device) before the folder loads: host memory holds about one model at a time, not two.
    Both compute in fp32 with the export's weights (a 16-bit export's kept 16-bit, see
    `computed_in_fp32`)."""
    special = {i for i in source.token_ids.values() if i is not None}
    inputs = probe_inputs(source.cfg, source.vocab_size, source.image_token_id, special)
    with computed_in_fp32(_reference(source, dtype, in_place=release_source)) as model:
        ours = run_ours(model, inputs, NEW_TOKENS, source.image_token_id)
    if release_source:
        source.model.to("meta")
        gc.collect()
    if isinstance(source.image_token_id, ImageTokenIds):
        inputs = molmo2.inputs_to_hf(inputs, source.cfg, source.image_token_id)
    theirs = adapter_for(source.cfg).model_class.from_pretrained(folder, dtype=dtype).eval()
    with computed_in_fp32(theirs):
        outputs = run_theirs(theirs, inputs, NEW_TOKENS, source.image_token_id)
    del theirs  # the comparison's fp64 temporaries need not share memory with a model
    gc.collect()  # generation leaves reference cycles that hold it
    return compare(ours, outputs)


def export_hf(
    source: Source, out: Path, dtype: str | None = None, max_abs_diff: float = 1e-4, max_kl: float = 1e-8,
    release_source: bool = False,
) -> Verification:
    """Write `source` to `out` as a transformers folder (in `dtype`, by default the source's) and
    verify it; UserError (and no `out`) if it cannot be expressed or does not compute what the
    mmscale model computes. `release_source`: `mmscale convert`'s way, the source model is used
    up by the verification (see `verify_folder`), so a release needs host memory for about one
    model at a time."""
    if any(p.is_meta for p in source.model.parameters()):
        raise ValueError("this Source was used up by an export with release_source=True: load it again")
    torch_dtype = DTYPES[dtype or source.dtype]
    with written_whole(out) as tmp:
        if release_source:  # the export's dtype in place, one tensor at a time: the saved model shares them
            source.model.to(torch_dtype)
        hf_model = _hf_model(source, torch_dtype)
        hf_model.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE)
        del hf_model
        if source.tokenizer is not None:
            write_processor(source.cfg, source.tokenizer, tmp)
        write_generation_config(tmp, source.token_ids)
        result = verify_folder(source, tmp, torch_dtype, release_source)
        problems = result.problems(max_abs_diff, max_kl)
        if problems:
            raise UserError(
                f"the {adapter_for(source.cfg).name} export does not compute what the mmscale model computes: "
                + "; ".join(problems) + f"; nothing was written to {out}"
            )
        report = {"dtype": dtype or source.dtype, **result.as_dict(),
                  "training_only_weights_excluded": list(source.training_only)}
        write_model_card(tmp, source.facts, report, source.training_only)
    return result


def describe(source: Source, result: Verification, out: Path, dtype: str | None) -> str:
    """The report `mmscale convert` prints."""
    family = adapter_for(source.cfg).name
    lines = [
        f"wrote {out} ({family}, {dtype or source.dtype}) from {source.facts['source']}",
        f"verified on {result.positions} positions: max abs image feature diff {result.feature_diff:.3g}, "
        f"max abs logit diff {result.max_abs_diff:.3g}, "
        f"mean KL {result.mean_kl:.3g}, greedy {len(result.tokens_ours)} tokens identical",
    ]
    if source.training_only:
        lines.append(f"left out {len(source.training_only)} training-only weights: {', '.join(source.training_only)}")
    return "\n".join(lines)


def meta_model(cfg: ModelConfig, vocab_size: int, image_token_id: int | ImageTokenIds) -> nn.Module:
    with torch.device("meta"):
        return build_vlm(cfg, vocab_size, image_token_id)
