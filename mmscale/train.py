"""`mmscale train`: the whole run, as a table of contents."""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from mmscale.alignment import with_alignment
from mmscale.alignment.cache import check_teacher_cache
from mmscale.config import Recipe
from mmscale.data.loader import build_dataloader
from mmscale.data.tokenizer import recipe_tokenizer
from mmscale.errors import UserError
from mmscale.eval.in_loop import InLoopEval
from mmscale.launch.ending import StopSignals
from mmscale.models import build_model, vocab_size_for
from mmscale.models.attention import set_kernel, unavailable
from mmscale.models.pretrained import load_pretrained
from mmscale.monitor.console import quiet_known_noise, say
from mmscale.monitor.timeline import Timeline, attempt_line
from mmscale.plan import Cluster, make_plan, report
from mmscale.training import Trainer, build_engine, init_distributed, shutdown_distributed
from mmscale.training.budget import training_budget
from mmscale.training.engine import deepspeed_config, use_bf16
from mmscale.training.freeze import FrozenWeights, freeze, frozen_from_pretrained
from mmscale.training.run_dir import prepare_run_dir
from mmscale.training.tracking import Tracker


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def print_plan(recipe: Recipe, world: int, tokenizer: PreTrainedTokenizerBase) -> None:
    """The memory and speed plan of this run on these GPUs (mmscale plan), before anything heavy."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count()))
    memory_gb = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1e9
    cluster = Cluster(max(1, world // per_node), per_node, memory_gb)
    try:
        print(report(make_plan(recipe, cluster, vocab_size_for(recipe.model, tokenizer))), flush=True)
    except Exception as e:  # a plan is advice: a bug in it must not stop a run that may well fit
        print(f"warning: no plan for this run ({type(e).__name__}: {e}); training goes on", file=sys.stderr, flush=True)


def check_attention_kernel(recipe: Recipe) -> None:
    """Refuse a `model.attention` kernel that cannot train this model here, before anything heavy."""
    model = recipe.model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if use_bf16(recipe.train) else torch.float32
    why = unavailable(model.attention, device, dtype, model.self_attention_head_dims)
    if why:
        raise UserError(f"model.attention={model.attention} cannot train here: {why}. "
                        "Set model.attention=auto to take the fastest kernel that can.")


def build_training_engine(
    recipe: Recipe, tokenizer: PreTrainedTokenizerBase, engine_config: dict, rank: int
) -> tuple[deepspeed.DeepSpeedEngine, FrozenWeights | None]:
    """The model, with its pretrained weights and its frozen parts, in a DeepSpeed engine; and the
    frozen weights that the checkpoints leave out (every start reloads them from model.pretrained)."""
    seed_everything(recipe.run.seed)  # same initial weights on every rank
    # Under ZeRO-3 each module is partitioned as soon as it is built, so no rank ever holds
    # the whole model; the weights are those of a normal build (mmscale.models.initialise).
    # Loading gathers what it writes by itself and freezing only flips requires_grad, so both
    # stay outside the context (whose tensor-creation overrides would also catch loading's).
    say("building the model" + (" (ZeRO-3: partitioned as it is built)" if recipe.train.zero_stage == 3 else ""))
    with deepspeed.zero.Init(config_dict_or_path=engine_config, enabled=recipe.train.zero_stage == 3):
        model = build_model(recipe.model, tokenizer)
    # Training alone runs the recipe's kernel: eval and convert of its checkpoints may run elsewhere.
    set_kernel(model, recipe.model.attention)
    if recipe.model.pretrained.folders:
        say("loading the pretrained weights (model.pretrained)")
    loaded = load_pretrained(model, recipe.model)
    # VIRAL: the projector joins the model (DeepSpeed partitions it on initialize); the teacher stays outside.
    model = with_alignment(model, recipe.model)
    freeze(model, recipe.trainable_parts)
    frozen = frozen_from_pretrained(model, loaded, recipe.model.pretrained, fingerprint=rank == 0)
    del loaded
    say("starting the DeepSpeed engine")
    return build_engine(model, recipe.train), frozen


def train(recipe: Recipe, stop: StopSignals | None = None, timeline: Timeline | None = None) -> Path:
    """Train `recipe`; returns the run directory. `stop`: the stop signals caught since the
    process started (else the trainer catches them from its loop on); `timeline`: this attempt's
    clock since the process started (else from now on).

    Bad input (precision and ZeRO stage, attention kernel, tokenizer, shard paths, too few shards
    for the ranks) fails before the run directory or the model is made.
    """
    timeline = timeline or Timeline(started_at=time.time())
    timeline.switch("build")
    quiet_known_noise()
    # Also refuses what DeepSpeed cannot do for us on this machine (ZeRO-1 in bf16: training.engine).
    deepspeed_config(recipe.train)
    check_attention_kernel(recipe)
    tokenizer = recipe_tokenizer(recipe)
    budget = training_budget(recipe)
    # VIRAL targets cached in the train shards: their teacher must be the recipe's.
    teacher_width = check_teacher_cache(recipe)

    # Nothing on an error path waits for other ranks: a failing rank must exit at once, not wait
    # in a barrier for peers that will never come; the others then fail on the collective timeout.
    say("joining the other ranks (a first start on CPU also builds DeepSpeed's communication op)")
    rank, world = init_distributed(recipe.train.dist_timeout_s)
    if rank == 0 and torch.cuda.is_available():
        print_plan(recipe, world, tokenizer)
    # train.global_batch_size fixes the step's rows on any number of GPUs: accumulation makes up the rest.
    recipe = recipe.model_copy(update={"train": recipe.train.for_world(world)})
    engine_config = deepspeed_config(recipe.train)

    def loader(split: str):
        return build_dataloader(
            recipe.data, recipe.model, tokenizer, split=split, batch_size=recipe.train.micro_batch_size,
            seed=recipe.run.seed,
            teacher_width=teacher_width if split == "train" else None,  # validation has no alignment loss
        )

    say("reading the shard lists")
    train_loader = loader("train")
    val_loader = loader("val") if recipe.data.val else None
    run_dir = Path(recipe.run.dir)
    prepare_run_dir(run_dir, recipe)
    timeline.attach(run_dir, rank, world)  # a start that fails from here on is on the run's record too
    try:
        engine, frozen = build_training_engine(recipe, tokenizer, engine_config, rank)
        evaluator = InLoopEval(recipe, tokenizer) if recipe.train.eval_every else None
        # Closing the tracker touches only rank 0's own files and never waits on other ranks; so does
        # the attempt's last record, written however the run ends.
        with Tracker(recipe, run_dir, dist.get_rank()) as tracker:
            Trainer(recipe, engine, train_loader, val_loader, run_dir, budget, tracker, evaluator, frozen,
                    timeline).train(stop)
    except BaseException:
        if timeline.attempt.ended is None:  # it failed before the trainer could say why
            timeline.end("error")
        raise
    finally:
        timeline.write()
        if timeline.path is not None:  # rank 0: the attempt's record, for a reader of the log
            print(f"mmscale: {attempt_line(timeline.accounting().attempts[-1])}", flush=True)
    shutdown_distributed()
    return run_dir
