"""When to stop and when to save, decided alike on every rank.

A cluster asks a job to stop before it kills it: SLURM sends SIGUSR2 some time before the
time limit (with `#SBATCH --signal=USR2@120`) and SIGTERM on preemption or scancel, then
SIGKILL after its KillWait. `StopSignals` turns those signals into a flag that the training
loop reads between steps, `agree` makes every rank stop after the same step (a signal may
reach only some ranks, or reach them during different steps), and `SaveClock` asks for a
checkpoint every so many minutes of wall-clock time, by rank 0's clock.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Self

import torch
import torch.distributed as dist

Handler = Callable[[int, FrameType | None], object] | int | None


class StopSignals:
    """Record SIGTERM and SIGUSR2 as a request to stop after the current step.

    The handler only sets a flag: Python runs it in the main thread between two bytecodes,
    which may be inside a collective, a file write or a DataLoader's queue read, where I/O or
    an exception would leave the run half-done. Create it in the main thread, before the
    DataLoader workers start: forked workers inherit it, so a signal sent to the whole
    process group (as SLURM does) does not kill them under the step that is to be saved.
    Close it (or leave its `with` block) to restore the handlers it replaced.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS):
        self.received: signal.Signals | None = None  # the last stop signal received
        self._previous: dict[signal.Signals, Handler] = {sig: signal.signal(sig, self._record) for sig in signals}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def requested(self) -> bool:
        """Whether a stop signal reached this process (this rank only: see `agree`)."""
        return self.received is not None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            # None: the handler was set outside Python; the default is the closest we can restore.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


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
