"""Run directory and checkpoints.

    RUN_DIR/recipe.yaml              the fully resolved recipe the run was started with
    RUN_DIR/metrics.jsonl            one JSON line per logged step and per validation
    RUN_DIR/checkpoints/step_0000100 one DeepSpeed checkpoint (all ranks' shards)
    RUN_DIR/checkpoints/latest       DeepSpeed's pointer to the newest complete checkpoint
"""

from __future__ import annotations

from pathlib import Path

import deepspeed
import torch.distributed as dist
import yaml

from mmscale.config import Recipe, dump_recipe
from mmscale.errors import UserError


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Keys that change how a run is watched or launched, not what it computes: a resumed run
# may differ from its first start in these.
MAY_CHANGE_ON_RESUME = {
    "run.dir",
    "train.log_every",
    "train.val_every",
    "train.val_batches",
    "train.checkpoint_every",
    "train.dist_timeout_s",
}


def prepare_run_dir(run_dir: Path, recipe: Recipe) -> None:
    """Create the run directory, or check that an existing one was made by the same recipe
    (up to MAY_CHANGE_ON_RESUME)."""
    saved = run_dir / "recipe.yaml"
    existed = saved.exists()
    dist.barrier()  # every rank looks before rank 0 may write
    if existed:
        old = _flatten(yaml.safe_load(saved.read_text()))
        new = _flatten(recipe.model_dump(mode="json"))
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in MAY_CHANGE_ON_RESUME)
        if changed:
            raise UserError(
                f"run directory {run_dir} belongs to a run with a different recipe "
                f"(differs in {', '.join(changed)}); choose another run.dir or remove the folder"
            )
        return
    if dist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(dump_recipe(recipe))
    dist.barrier()


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(engine: deepspeed.DeepSpeedEngine, run_dir: Path, step: int, client_state: dict) -> Path:
    """Collective: every rank writes its shards; DeepSpeed moves `latest` only when all are done."""
    tag = f"step_{step:07d}"
    engine.save_checkpoint(str(checkpoint_dir(run_dir)), tag=tag, client_state=client_state)
    return checkpoint_dir(run_dir) / tag


def load_latest_checkpoint(engine: deepspeed.DeepSpeedEngine, run_dir: Path) -> dict | None:
    """Restore the newest checkpoint named by `latest`; returns its client state, or None if there is none."""
    if not (checkpoint_dir(run_dir) / "latest").is_file():
        return None
    path, client_state = engine.load_checkpoint(str(checkpoint_dir(run_dir)))
    if path is None:
        raise RuntimeError(f"{checkpoint_dir(run_dir)}/latest names a checkpoint that could not be loaded")
    return client_state
