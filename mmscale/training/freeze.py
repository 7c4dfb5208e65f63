"""What trains: `train.trainable` names model parts, the rest is frozen (requires_grad=False).

Frozen parameters get no gradient and are left out of the optimizer, so they stay
bit-identical for the whole run (and cost no optimizer memory under ZeRO). When they all come
from `model.pretrained`'s folders, every start of the run loads them again, so checkpoints
need not hold them (`FrozenWeights`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmscale.config.model import PretrainedConfig
from mmscale.config.schema import ALIGNMENT_PART, MODEL_PARTS
from mmscale.models.cross_attention_vlm import CrossAttentionBlock
from mmscale.models.hf.folder import folder_fingerprint
from mmscale.models.initialise import gathered
from mmscale.models.pretrained import Loaded

# Top-level modules of both VLMs, by the part they belong to; a cross-attention model's
# CrossAttentionBlocks inside `language_model` are the part "cross_attention". VIRAL's
# projector (mmscale.alignment.AlignedVLM) is a part of its own.
TOP_LEVEL = {
    "vision_tower": "vision_tower", "connector": "connector", "language_model": "llm", ALIGNMENT_PART: ALIGNMENT_PART,
}


def model_parts(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The model's parameters grouped by MODEL_PARTS (a tied weight is listed once)."""
    cross = {id(p) for m in model.modules() if isinstance(m, CrossAttentionBlock) for p in m.parameters()}
    parts: dict[str, list[nn.Parameter]] = {part: [] for part in (*MODEL_PARTS, ALIGNMENT_PART)}
    for name, param in model.named_parameters():
        parts["cross_attention" if id(param) in cross else TOP_LEVEL[name.split(".")[0]]].append(param)
    return {part: params for part, params in parts.items() if params}


def freeze(model: nn.Module, trainable: tuple[str, ...]) -> None:
    """requires_grad on the parameters of the `trainable` parts, off everywhere else."""
    for part, params in model_parts(model).items():
        for param in params:
            param.requires_grad_(part in trainable)


@dataclass(frozen=True)
class FrozenWeights:
    """A run's frozen parameters when `model.pretrained`'s folders give every one of them (a
    vocabulary matrix that grew: all but its new rows). Checkpoints leave them out (an 8B frozen
    LLM is 16 GB per checkpoint) and keep what no folder holds: the new rows,
    and the folders' fingerprints, which resuming and converting check."""

    names: frozenset[str]
    new_rows: dict[str, torch.Tensor]  # fp32, as initialised
    folders: dict[str, dict[str, str]]  # folder -> file -> size:crc32; computed on rank 0 only


def frozen_from_pretrained(
    model: nn.Module, loaded: Loaded, pretrained: PretrainedConfig, fingerprint: bool
) -> FrozenWeights | None:
    """The model's frozen weights (after `freeze`) if the folders gave them all; None if some
    are frozen as initialised (they are then saved with every checkpoint). The folders are read
    through for their fingerprint where `fingerprint` (one rank does)."""
    # A tied weight under each of its names: the output layer of a tied LLM has the embedding's new rows.
    names = {name for name, param in model.named_parameters(remove_duplicate=False) if not param.requires_grad}
    if not names or not names <= loaded.folders.keys() | loaded.new_rows.keys():
        return None
    return FrozenWeights(
        frozenset(names), {name: rows for name, rows in loaded.new_rows.items() if name in names},
        {folder: folder_fingerprint(folder) for folder in pretrained.folders} if fingerprint else {},
    )


def restore_new_rows(model: nn.Module, new_rows: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's new vocabulary rows back (a rebuild draws the same ones from the run's
    seed, unless torch or the device changed how)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, rows in new_rows.items():
            param = params[name]
            with gathered([param]):
                param[param.shape[0] - rows.shape[0]:].copy_(rows)


def parameter_table(model: nn.Module) -> str:
    """Trainable and frozen parameters per part, as a small text table."""
    lines = [f"{'part':<16}{'trainable':>12}{'frozen':>12}"]
    totals = [0, 0]
    for part, params in model_parts(model).items():
        counts = [0, 0]
        for param in params:
            # ZeRO-3 leaves empty placeholders in the module; ds_numel keeps the true size.
            counts[0 if param.requires_grad else 1] += getattr(param, "ds_numel", param.numel())
        totals = [a + b for a, b in zip(totals, counts)]
        lines.append(f"{part:<16}{_millions(counts[0]):>12}{_millions(counts[1]):>12}")
    lines.append(f"{'total':<16}{_millions(totals[0]):>12}{_millions(totals[1]):>12}")
    return "\n".join(lines)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n else "-"
