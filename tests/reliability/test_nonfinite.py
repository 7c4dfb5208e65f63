"""Scenario 4: NaN and Inf in the loss or in the gradients are skipped and counted, and
train.max_bad_steps of them in a row stop the run.

Each trial trains the tiny demo model for real (loader, DeepSpeed ZeRO-2, Trainer, metrics; one
gloo rank in this process) twice, poisoning seeded steps with seeded KINDS, for a seeded
max_bad_steps N:
- N - 1 poisoned steps in a row, then a clean one, then one more poisoned step: the run
  finishes; each poisoned step is counted in skipped_steps, logs no loss and leaves every weight
  as it was, and every other step changes the weights; the final weights are finite;
- N poisoned steps in a row: the run stops with the UserError naming them, having read no batch
  after the last, and the newest complete checkpoint (one is saved every step) is that of the
  step before it, holding the weights from before the streak.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator
from pathlib import Path

import deepspeed
import pytest
import torch

from mmscale.convert.trained import consolidate
from mmscale.data.tokenizer import load_tokenizer
from mmscale.demo.corpus import build_demo_dataset
from mmscale.errors import UserError
from mmscale.models import build_model
from mmscale.training.checkpoint import checkpoint_tag, newest_complete_checkpoint
from tests.helpers.in_process import tiny_recipe, train_in_process
from tests.helpers.processes import one_rank_world
from tests.helpers.recipes import TINY_DATA
from tests.reliability.trials import Trial, check, trials

CI_DEFAULT = 3
STEPS = 10
POISON = {"NaN": float("nan"), "Inf": float("inf")}
# Where the poison goes: "loss*" scales the loss (the poison flows into every gradient), "loss+"
# is added to it (its gradients stay finite: such steps were applied unnoticed before
# mmscale.training.engine.skip_if_not_finite), "gradient" replaces one element of one
# parameter's gradient (the loss stays finite).
KINDS = tuple((value, target) for target in ("loss*", "loss+", "gradient") for value in POISON)

Kind = tuple[str, str]
Weights = dict[str, torch.Tensor]


class Injector:
    """Poisons the loss or one parameter's gradient at the planned (1-based) steps, and keeps the
    weights before each step; used as the batches' tap, which tells it the coming step."""

    def __init__(self, engine: deepspeed.DeepSpeedEngine, plan: dict[int, Kind], parameter: str):
        self.module, self.plan = engine.module, plan
        self.step = 0
        self.weights: list[Weights] = []  # before step 1, 2, ...
        self.losses: dict[int, float] = {}  # the loss each step's backward started from
        self.poisoned: list[int] = []  # the steps whose poison took effect
        self.module.register_forward_hook(self._poison_loss)
        dict(self.module.named_parameters())[parameter].register_hook(self._poison_gradient)

    def __call__(self, index: int, batch: dict) -> None:
        self.weights.append(self.snapshot())
        self.step = index + 1

    def snapshot(self) -> Weights:
        return {name: p.detach().clone() for name, p in self.module.named_parameters()}

    def _poison_loss(self, module: torch.nn.Module, args: tuple, loss: torch.Tensor) -> torch.Tensor:
        value, target = self.plan.get(self.step, (None, None))
        if target == "loss*":
            loss = loss * POISON[value]
        elif target == "loss+":
            loss = loss + POISON[value]
        if target in ("loss*", "loss+"):
            self.poisoned.append(self.step)
        self.losses[self.step] = loss.item()
        return loss

    def _poison_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        value, target = self.plan.get(self.step, (None, None))
        if target != "gradient":
            return grad
        self.poisoned.append(self.step)
        grad = grad.clone()
        grad.view(-1)[0] = POISON[value]
        return grad


def run_trials(n: int, workdir: Path, seed: int) -> list[Trial]:
    demo = workdir / "demo"
    build_demo_dataset(demo, seed=0, **TINY_DATA)
    parameters = _parameter_names(demo)
    with one_rank_world():
        return [_trial(demo, parameters, workdir / f"trial_{i}", seed + i) for i in range(n)]


def _trial(demo: Path, parameters: list[str], folder: Path, seed: int) -> Trial:
    rng = random.Random(seed)
    limit = rng.randint(2, 3)  # train.max_bad_steps
    kinds = _kinds(rng)
    streak = rng.randint(2, STEPS - limit - 1)  # N - 1 in a row from here, a clean step, then one more
    survived = {step: next(kinds) for step in [*range(streak, streak + limit - 1), rng.randint(streak + limit, STEPS - 1)]}
    start = rng.randint(2, STEPS - limit + 1)  # N in a row from here
    stopped = {step: next(kinds) for step in range(start, start + limit)}
    parameter = rng.choice(parameters)
    what = (f"seed {seed}, max_bad_steps={limit}, gradient poison in {parameter}: {_plan(survived)} (run finishes); "
            f"{_plan(stopped)} (run stops)")
    overrides = (f"train.steps={STEPS}", f"train.max_bad_steps={limit}")
    problems = _survives(demo, folder / "finishes", survived, parameter, overrides)
    problems += _stops(demo, folder / "stops", stopped, parameter, (*overrides, "train.checkpoint_every=1"))
    lost = f"the batches of the {len(survived) + limit} poisoned steps (skipped, by design)"
    return Trial(not problems, what, "; ".join(problems) or lost)


def _parameter_names(demo: Path) -> list[str]:
    """The tiny model's parameters: the optimizer updates all of them, and each gets a gradient every step."""
    recipe = tiny_recipe(demo, demo / "unused")
    return [name for name, _ in build_model(recipe.model, load_tokenizer(recipe.data.tokenizer)).named_parameters()]


def _kinds(rng: random.Random) -> Iterator[Kind]:
    """Every kind in turn from a seeded one, so that a trial's 4 to 6 poisoned steps cover most of them."""
    first = rng.randrange(len(KINDS))
    return itertools.cycle(KINDS[first:] + KINDS[:first])


def _plan(plan: dict[int, Kind]) -> str:
    return ", ".join(f"step {step} {value} {target}" for step, (value, target) in sorted(plan.items()))


def _train(
    demo: Path, run_dir: Path, plan: dict[int, Kind], parameter: str, overrides: tuple
) -> tuple[Injector, list[dict], UserError | None]:
    """Train with `plan`'s poison; the injector, the metrics records, and the error that stopped the run."""
    made: list[Injector] = []

    def inject(engine: deepspeed.DeepSpeedEngine) -> Injector:
        made.append(Injector(engine, plan, parameter))
        return made[0]

    try:
        records = train_in_process(tiny_recipe(demo, run_dir, *overrides), inject)
    except UserError as error:
        return made[0], [], error
    return made[0], records, None


def _survives(demo: Path, run_dir: Path, plan: dict[int, Kind], parameter: str, overrides: tuple) -> list[str]:
    injector, records, error = _train(demo, run_dir, plan, parameter, overrides)
    if error is not None:
        return [f"finishing run: stopped ({error})"]
    weights = [*injector.weights, injector.snapshot()]  # before each step, and after the last
    problems = _poison_problems(injector, "finishing run")
    skipped = [r["skipped_steps"] for r in records]
    expected = [sum(bad <= step for bad in plan) for step in range(1, STEPS + 1)]
    if skipped != expected:
        problems.append(f"finishing run: skipped_steps {skipped}, expected {expected}")
    unchanged = [step for step in range(1, STEPS + 1) if _equal(weights[step - 1], weights[step])]
    if unchanged != sorted(plan):
        problems.append(f"finishing run: weights unchanged across steps {unchanged}, poisoned {sorted(plan)}")
    no_loss = [r["step"] for r in records if r["loss"] is None]
    if no_loss != sorted(plan) or not all(math.isfinite(r["loss"]) for r in records if r["loss"] is not None):
        problems.append(f"finishing run: losses {[r['loss'] for r in records]}")
    if not all(bool(w.isfinite().all()) for w in weights[-1].values()):
        problems.append("finishing run: non-finite final weights")
    return problems


def _stops(demo: Path, run_dir: Path, plan: dict[int, Kind], parameter: str, overrides: tuple) -> list[str]:
    injector, _, error = _train(demo, run_dir, plan, parameter, overrides)
    first, last = min(plan), max(plan)
    message = f"{len(plan)} optimizer steps in a row, the last at step {last}, had a non-finite"
    if error is None or message not in str(error):
        return [f"stopping run: expected the error '{message}...', got {error or 'none'}"]
    problems = _poison_problems(injector, "stopping run")
    if len(injector.weights) != last:
        problems.append(f"stopping run: read the batches of {len(injector.weights)} steps, the stop was at step {last}")
    if not _equal(injector.weights[first - 1], injector.snapshot()):
        problems.append("stopping run: the weights changed during the poisoned steps")
    newest = newest_complete_checkpoint(run_dir)
    if newest is None or newest.name != checkpoint_tag(last - 1):
        problems.append(f"stopping run: newest checkpoint {newest and newest.name}, expected {checkpoint_tag(last - 1)}")
    elif not _equal(injector.weights[first - 1], consolidate(newest)):
        problems.append(f"stopping run: checkpoint {newest.name} does not hold the weights from before step {first}")
    return problems


def _poison_problems(injector: Injector, run: str) -> list[str]:
    """The poison must have been applied where planned, and a poisoned gradient must come with a finite loss."""
    problems = []
    if injector.poisoned != sorted(injector.plan):
        problems.append(f"{run}: poison applied at steps {injector.poisoned}, planned {sorted(injector.plan)}")
    for step, (_, target) in injector.plan.items():
        if target == "gradient" and not math.isfinite(injector.losses.get(step, math.nan)):
            problems.append(f"{run}: step {step}: the loss of a poisoned gradient is {injector.losses.get(step)}")
    return problems


def _equal(a: Weights, b: Weights) -> bool:
    return all(torch.equal(tensor, b[name]) for name, tensor in a.items())


@pytest.mark.reliability
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run_after_max_bad_steps(tmp_path):
    results = run_trials(trials(CI_DEFAULT), tmp_path, seed=400)
    check(results)
