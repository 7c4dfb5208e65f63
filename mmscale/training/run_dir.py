"""The run directory across starts: the recipe it was started with, and what a later start may change.

    RUN_DIR/recipe.yaml     the fully resolved recipe of the run (its newest length, see below)
    RUN_DIR/checkpoints/    mmscale.training.checkpoint

A start in a directory that holds checkpoints resumes the run, so its recipe must be the
run's, up to MAY_CHANGE_ON_RESUME (how the run is watched and launched, and memory it trades for
compute), MAY_MOVE_ON_RESUME (paths, which move with a run to another cluster) and its length
(LENGTH_KEYS): a run may be extended, or shortened, when it resumes. Its learning-rate schedule
is a function of the fraction of the length done (training.engine.lr_ratio), so the decay then
stretches over the new length from the resumed step on: the rate steps up where the run is made
longer. recipe.yaml is rewritten with the new length, and the change is logged. A run may also
resume on another number of ranks or loader workers (training.checkpoint, data.elastic); with
train.global_batch_size, its accumulation then changes with the ranks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist
import yaml

from mmscale.config import Recipe, dump_recipe
from mmscale.config.load import earlier_model_section
from mmscale.errors import UserError
from mmscale.training.checkpoint import checkpoint_dir
from mmscale.training.tracking import flatten
from mmscale.utils.files import write_durably

log = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"

# Keys that change how a run is watched or launched, not what it computes: a resumed run
# may differ from its first start in these.
MAY_CHANGE_ON_RESUME = {
    "run.dir",
    "train.log_every",
    "train.val_every",
    "train.val_batches",
    "train.eval_every",
    "train.eval_samples",
    "train.eval_table_rows",
    "data.eval",
    "train.checkpoint_every",
    "train.checkpoint_keep",
    "train.checkpoint_every_minutes",
    "train.dist_timeout_s",
    "train.max_bad_steps",
    "train.on_save_error",
    "train.log_sample_ids",
    "model.attention",  # a kernel computes the same attention; the new machine may lack the old one's
    # Memory for compute: recomputing activations in the backward pass runs the same kernels on
    # the same inputs (not train.offload: a CPU optimizer is another implementation of the update).
    "model.llm.activation_checkpointing",
    "model.vision.activation_checkpointing",
    "model.tiled_vision.activation_checkpointing",
    # Only where the tower's numbers came from: the numbers themselves are compared key by key.
    "model.vision.preset",
    # A resume on another number of readers deals the rest of the epoch to them (data.elastic).
    "data.num_workers",
    *(f"run.wandb.{key}" for key in ("enabled", "project", "entity", "name", "tags", "mode")),
}
# Paths that move with a run to another cluster: a resume may name them elsewhere, but not add or
# drop them. What they hold is checked where it is read: model.pretrained's folders by their
# fingerprints (training.checkpoint), the shards by their names and order (data.stream).
MAY_MOVE_ON_RESUME = {
    "data.train", "data.val", "data.tokenizer",
    "model.pretrained.vlm", "model.pretrained.vision", "model.pretrained.llm", "model.alignment.teacher",
}
LENGTH_KEYS = {"train.steps", "train.samples", "train.epochs"}


def moved(old: object, new: object) -> bool:
    """Whether path `new` is `old` moved: both set, and a mixture (data.train's list of {shards,
    weight}) the same sources with the same weights."""
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(o.get("weight") == n.get("weight") for o, n in zip(old, new))
    return isinstance(old, str) and isinstance(new, str)


def prepare_run_dir(run_dir: Path, recipe: Recipe) -> None:
    """Create the run directory, or check that an existing one was made by the same recipe
    (up to MAY_CHANGE_ON_RESUME, moved MAY_MOVE_ON_RESUME paths and LENGTH_KEYS; a new length
    replaces the old in recipe.yaml).

    A directory without any checkpoint has nothing to protect: a start that failed before
    its first save (say, on a pretrained folder that did not match the recipe) may be
    started again with a corrected recipe, which replaces recipe.yaml.
    """
    saved = run_dir / RECIPE_FILE
    existed = saved.exists() and any(checkpoint_dir(run_dir).glob("step_*"))
    dist.barrier()  # every rank looks before rank 0 may write
    if existed:
        old_tree = yaml.safe_load(saved.read_text())
        old_tree["model"] = earlier_model_section(old_tree["model"])
        old = flatten(old_tree, sep=".")
        new = flatten(recipe.model_dump(mode="json"), sep=".")
        differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        # With train.global_batch_size, accumulation follows the number of ranks, which may change.
        derived = {"train.grad_accum"} if new.get("train.global_batch_size") is not None else set()
        changed = [k for k in differ if k not in MAY_CHANGE_ON_RESUME | LENGTH_KEYS | derived
                   and not (k in MAY_MOVE_ON_RESUME and moved(old.get(k), new.get(k)))]
        if changed:
            raise UserError(
                f"run directory {run_dir} belongs to a run with a different recipe "
                f"(differs in {', '.join(changed)}); choose another run.dir or remove the folder"
            )
        lengths = [k for k in differ if k in LENGTH_KEYS]
        moves = [k for k in differ if k in MAY_MOVE_ON_RESUME]
        if not lengths and not moves and not derived & set(differ):
            return
        if lengths and dist.get_rank() == 0:
            log.warning("the run's length changes: %s; the learning-rate decay stretches over the new length from "
                        "the resumed step on", ", ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in lengths))
        if moves and dist.get_rank() == 0:
            log.warning("the run's paths moved: %s", ", ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in moves))
    dist.barrier()  # every rank has read the old recipe.yaml
    if dist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_durably(saved, dump_recipe(recipe))
    dist.barrier()
