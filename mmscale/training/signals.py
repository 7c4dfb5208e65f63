"""When to stop and when to save, decided alike on every rank.

`mmscale.launch.ending.StopSignals` turns the cluster's stop signals into a flag, from the
first line of `mmscale train`; `agree` makes every rank stop after the same step (a signal may
reach only some ranks, or reach them during different steps), and `SaveClock` asks for a
checkpoint every so many minutes of wall-clock time, by rank 0's clock.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


def agree(flag: bool, device: torch.device | str) -> bool:
    """Collective: True on every rank if `flag` is True on any (one all-reduce, max, of one number).

    `device` is the engine's: an NCCL process group reduces only CUDA tensors.
    """
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class SaveClock:
    """Says "save now" once `minutes` of wall-clock time passed since it was (re)started.

    Hosts' clocks drift and each rank ends a step at its own instant, so only rank 0's clock
    counts and `due` broadcasts its answer: one one-number collective per call, which costs
    tens of microseconds next to a training step, so the trainer can ask after every step and
    save within one step of the deadline. With `minutes` 0 the clock is off and `due` costs
    nothing (no collective), on every rank alike since all read the same recipe.
    """

    def __init__(self, minutes: float, device: torch.device | str):
        self.interval_s = minutes * 60
        self.device = device
        self.restart()

    def restart(self) -> None:
        """Count the interval from now: call it after every checkpoint, whatever triggered it."""
        self.started = time.monotonic()

    def due(self) -> bool:
        """Collective (unless off): whether rank 0's interval has passed."""
        if not self.interval_s:
            return False
        value = torch.tensor([float(time.monotonic() - self.started >= self.interval_s)], device=self.device)
        dist.broadcast(value, src=0)
        return bool(value.item())
