"""How long a run trains: optimizer steps, or samples over all ranks (train.samples or train.epochs)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from mmscale.config import Recipe
from mmscale.data.shards import manifest_samples, resolve_shards
from mmscale.errors import UserError


@dataclass(frozen=True)
class Budget:
    unit: Literal["steps", "samples"]
    total: int

    def done(self, steps: int, samples: int) -> float:
        """Fraction of the budget used after `steps` optimizer steps that consumed `samples` samples."""
        return (steps if self.unit == "steps" else samples) / self.total


def training_budget(recipe: Recipe) -> Budget:
    train = recipe.train
    if train.steps is not None:
        return Budget("steps", train.steps)
    if train.samples is not None:
        return Budget("samples", train.samples)
    if not isinstance(recipe.data.train, str):
        raise UserError(
            "train.epochs needs a single data.train source: an epoch of a weighted mixture is not defined; "
            "set train.samples instead"
        )
    size = manifest_samples(resolve_shards(recipe.data.train, "data.train"), "data.train")
    return Budget("samples", math.ceil(train.epochs * size))
