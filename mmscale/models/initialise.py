"""Weight initialisation that stays correct when a model is built under `deepspeed.zero.Init`.

zero.Init partitions a module's parameters as soon as that module's own `__init__`
returns. A parent that initialises its children afterwards (Llama's N(0, 0.02) over every
Linear, a zeroed bias) would then write into empty partitions and silently keep PyTorch's
defaults. Such code runs inside `gathered`: the parameters are whole while it runs, rank
0's result is broadcast and partitioned again on exit. Every rank draws the same numbers
from the same seed in the same order as a normal build does, so one seed gives the same
weights with and without zero.Init. Without partitioned parameters both are plain calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext

from torch import nn


def is_partitioned(param: nn.Parameter) -> bool:
    """Whether ZeRO-3 holds `param` as partitions (its `.data` may then be empty)."""
    return hasattr(param, "ds_id")


def gathered(params: Iterable[nn.Parameter]) -> AbstractContextManager:
    """A context in which the ZeRO-3 partitioned `params` are whole on every rank; what rank 0
    writes into them is kept. A no-op for parameters that are not partitioned."""
    params = list(params)
    if not any(is_partitioned(p) for p in params):
        return nullcontext()
    # Imported here, not at the top: partitioned parameters mean DeepSpeed is loaded already,
    # and the models must stay importable without paying for it (export, conversion, tests).
    from deepspeed.runtime.zero import GatheredParameters

    return GatheredParameters(params, modifier_rank=0)


def init_modules(root: nn.Module, init: Callable[[nn.Module], None]) -> None:
    """`root.apply(init)` (children first, the same order, so the same random draws), with
    each module's own parameters gathered while `init` runs on it: at most one module's
    parameters are whole at a time."""
    for child in root.children():
        init_modules(child, init)
    with gathered(root.parameters(recurse=False)):
        init(root)
