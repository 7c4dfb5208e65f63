"""The plan's memory per GPU against two measured DeepSpeed steps on 2 gloo ranks (bf16, ZeRO-3,
activation checkpointing): within 15 %. benchmarks/memory.py runs more configurations."""

from __future__ import annotations

import pytest

from benchmarks.memory import COMMON, CONFIGS, IMAGE_TOKEN, VOCAB, WORLD
from mmscale.config import load_recipe
from mmscale.plan.measure import measure_ranks
from mmscale.plan.memory import plan_memory
from tests.helpers.recipes import REPO


@pytest.mark.parametrize("index", [1, 3], ids=lambda i: CONFIGS[i][0])
def test_plan_is_within_15_percent_of_a_measured_step(index):
    _, name, overrides = CONFIGS[index]
    path = REPO / "recipes" / f"{name}.yaml"
    overrides = [*COMMON, *overrides]
    planned = plan_memory(load_recipe(path, overrides), WORLD, VOCAB, IMAGE_TOKEN, bf16=True)
    measured = measure_ranks(path, overrides, WORLD, VOCAB, IMAGE_TOKEN)
    assert abs(planned.total - measured.peak) <= 0.15 * measured.peak, (planned, measured)
    assert abs(planned.states - measured.states) <= 0.25 * measured.states, (planned, measured)
