"""The weights of a training run, read back from one of its DeepSpeed checkpoints.

DeepSpeed's own consolidation (`zero_to_fp32`) assembles the fp32 master weights from the
ranks' ZeRO-1/2/3 shards (the trainable parameters) and the model-state files (frozen ones,
in the dtype they trained in);
we add what it does not check: that the checkpoint is a complete, committed one
(training.checkpoint's marker), and that its weights are exactly those of the run's recipe.
A checkpoint that left its frozen weights out gets them back from the recipe's
`model.pretrained` folders, after checking that those are the bytes the run trained with.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mmscale.config import Recipe, load_recipe
from mmscale.errors import UserError
from mmscale.models.hf.folder import fingerprint_change, folder_fingerprint
from mmscale.models.pretrained import pretrained_weights
from mmscale.training.checkpoint import (
    FROZEN_FROM,
    MARKER,
    NEW_ROWS,
    STARTED_IN,
    STEP_DIR,
    checkpoint_dir,
    checkpoint_problem,
    checkpoint_tag,
    checksum_problem,
    newest_complete_checkpoint,
)

# Weights that exist only for training: VIRAL's projector from LLM hidden states to the
# teacher's features. A released model has no use for them.
TRAINING_ONLY_PREFIXES = ("alignment_head.",)


def find_checkpoint(path: Path, step: int | None) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) for a run directory (its newest complete
    checkpoint, or step `step`) or a checkpoint directory; UserError if it is not complete."""
    if STEP_DIR.fullmatch(path.name) and path.parent.name == "checkpoints":
        run_dir, chosen = path.parent.parent, path
        if step is not None and checkpoint_tag(step) != path.name:
            raise UserError(f"--step {step} disagrees with the checkpoint {path}; give one or the other")
    elif (path / "recipe.yaml").is_file():
        run_dir = path
        if step is None:
            chosen = newest_complete_checkpoint(path)
            if chosen is None:
                raise UserError(f"run {path} has no checkpoint yet; train until one is saved (train.checkpoint_every)")
        else:
            chosen = checkpoint_dir(path) / checkpoint_tag(step)
    elif path.name.startswith(".tmp-"):
        raise UserError(f"{path} is a save that never finished (a .tmp- directory); convert a step_ directory instead")
    else:
        raise UserError(
            f"{path} is neither a run directory (with recipe.yaml) nor a checkpoint directory "
            "(runs/NAME/checkpoints/step_N)"
        )
    problem = checkpoint_problem(chosen) or checksum_problem(chosen)
    if problem is not None:
        raise UserError(f"checkpoint {chosen} {problem}; convert another step (--step) or a complete checkpoint")
    return run_dir, chosen


def consolidate(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The weights of a ZeRO checkpoint of any stage, gathered from every rank's files: the trained
    parameters' fp32 master weights and the frozen ones in the dtype they trained in (bf16 in a
    bf16 run; `export.load_weights` makes them one dtype)."""
    # Deferred: importing DeepSpeed costs seconds, and the import adapters do not need it.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name))
    except Exception as e:  # unreadable bytes surface as any of ValueError, RuntimeError, UnpicklingError, EOFError...
        raise UserError(
            f"checkpoint {checkpoint} cannot be consolidated ({type(e).__name__}: {str(e)[:300]}): its files "
            "may be damaged or written by another DeepSpeed version, or memory ran out; convert another "
            "step (--step), or with the DeepSpeed version that trained it"
        ) from e


def with_frozen_weights(
    state: dict[str, torch.Tensor], model: nn.Module, recipe: Recipe, checkpoint: Path, marker: dict
) -> dict[str, torch.Tensor]:
    """`state` (a consolidated checkpoint) completed with the frozen weights its run left out:
    read from the recipe's model.pretrained folders and rounded to the run's dtype as it trained
    with them, and the new vocabulary rows from the checkpoint itself. `model`: the run's model,
    on the meta device."""
    recorded = marker.get(FROZEN_FROM)
    if not recorded:
        return state
    at = run_paths(checkpoint)
    recorded = {at(folder): files for folder, files in recorded.items()}
    where = f"checkpoint {checkpoint} holds no frozen weights: they are read from the run's model.pretrained folders"
    absent = [folder for folder in recorded if not Path(folder).is_dir()]
    if absent:
        raise UserError(f"{where}, and {absent[0]} does not exist here; run from the directory the run was started in")
    change = fingerprint_change(recorded, {folder: folder_fingerprint(folder) for folder in recorded})
    if change is not None:
        raise UserError(f"{where}, and {change}; put back the folders the run trained with")
    missing = set(model.state_dict()) - set(state)
    new_rows = _new_rows(checkpoint)
    dtype = torch.bfloat16 if marker.get("dtype") == "bf16" else torch.float32
    for name, tensor in pretrained_weights(model, recipe.model, missing).items():
        rows = [tensor, new_rows[name]] if name in new_rows else [tensor]
        state[name] = torch.cat([t.to(dtype) for t in rows])
    return state


def _new_rows(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The frozen weights' new vocabulary rows, from the client state in rank 0's model-states
    file (memory-mapped: the file also holds the 16-bit trained weights)."""
    files = sorted(checkpoint.glob("*model_states.pt"))
    if not files:
        return {}
    return torch.load(files[0], map_location="cpu", mmap=True, weights_only=False).get(NEW_ROWS, {})


def split_training_only(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """The model's weights, and the names of the training-only ones left out of them."""
    training_only = tuple(sorted(k for k in state if k.startswith(TRAINING_ONLY_PREFIXES)))
    return {k: v for k, v in state.items() if k not in training_only}, training_only


def load_run_recipe(run_dir: Path, checkpoint: Path | None = None) -> Recipe:
    """The run's recipe; with `checkpoint`, its relative paths (data, tokenizer, model.pretrained
    folders, VIRAL's teacher) made absolute against the directory of the start that saved it, where
    the checkpoint says (those saved before it did resolve against the current directory)."""
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} has no recipe.yaml; is it a run directory written by `mmscale train`?")
    recipe = load_recipe(path, dumped=True)
    if checkpoint is None:
        return recipe
    at = run_paths(checkpoint)
    data, pretrained = recipe.data, recipe.model.pretrained
    train = at(data.train) if isinstance(data.train, str) else [
        source.model_copy(update={"shards": at(source.shards)}) for source in data.train]
    data = data.model_copy(update={"train": train, "val": at(data.val), "eval": at(data.eval),
                                   "tokenizer": at(data.tokenizer)})
    pretrained = pretrained.model_copy(update={k: at(getattr(pretrained, k)) for k in ("vlm", "vision", "llm")})
    update: dict[str, object] = {"pretrained": pretrained}
    if recipe.model.arch == "decoder":
        update["alignment"] = recipe.model.alignment.model_copy(update={"teacher": at(recipe.model.alignment.teacher)})
    model = recipe.model.model_copy(update=update)
    return recipe.model_copy(update={"data": data, "model": model})


def run_paths(checkpoint: Path) -> Callable[[str | None], str | None]:
    """A path of the run's recipe as seen from here: relative ones joined to the working directory
    of the start that saved `checkpoint`; absolute ones, URLs and pipes as they are."""
    started_in = json.loads((checkpoint / MARKER).read_text()).get(STARTED_IN)
    start = Path(started_in) if started_in else None

    def at(path: str | None) -> str | None:
        if path is None or start is None or "://" in path or path.startswith("pipe:") or Path(path).is_absolute():
            return path
        return str(start / path)

    return at


def final_metrics(run_dir: Path, step: int) -> dict[str, float]:
    """The last training loss and validation loss logged at or before `step` (metrics.jsonl)."""
    path, found = run_dir / "metrics.jsonl", {}
    if not path.is_file():
        return found
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a crash
            continue
        if record.get("step", step + 1) <= step:
            found.update({k: record[k] for k in ("loss", "val_loss") if k in record})
    return found

