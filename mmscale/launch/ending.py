"""How a rank ends: asked to by the cluster (`StopSignals`, from the first line of `mmscale
train`), and `leave`, which every `mmscale train` process calls last (mmscale.cli).

Light on purpose (no DeepSpeed or torch import): the signals must be caught before those
seconds-long imports, and a recipe error ends through `leave` too.

A cluster asks a job to stop before it kills it: SLURM sends SIGUSR2 some time before the
time limit (with `#SBATCH --signal=USR2@120`) and SIGTERM on preemption or scancel, then
SIGKILL after its KillWait.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import NoReturn, Self

Handler = Callable[[int, FrameType | None], object] | int | None

MIN_STOP_LEAD_S = 90  # slurm/train.sbatch's --signal=B:USR2@90
STOP_MARGIN_S = 30  # a stop's commit, the ranks' exit and the scheduler's own delay
# The job's stop lead, where the launcher knows it: `mmscale submit` sets it to its --signal-delay,
# slurm/train.sbatch to its --signal's.
STOP_LEAD_VAR = "MMSCALE_STOP_LEAD_S"


def stop_lead_needed(step_s: float, save_s: float) -> int:
    """Seconds between SIGUSR2 and the time limit that a stop needs: the step under way, the save
    (twice its time: a file system that every node writes at once may be slower than one save
    suggests) and a margin for the commit and exit; at least SLURM users' customary 90 s."""
    return max(MIN_STOP_LEAD_S, math.ceil(step_s + 2 * save_s + STOP_MARGIN_S))


def short_stop_lead(step_s: float, save_s: float) -> str | None:
    """What to change when the job's stop lead (STOP_LEAD_VAR) is shorter than a stop needs, or None."""
    lead, needed = os.environ.get(STOP_LEAD_VAR), stop_lead_needed(step_s, save_s)
    if lead is None or float(lead) >= needed:
        return None
    return (f"this job's stop signal comes {float(lead):.0f} s before its time limit, and a stop needs about "
            f"{needed} s (a {step_s:.0f} s step, twice this {save_s:.0f} s save, {STOP_MARGIN_S} s): a stop at the "
            f"time limit may be killed mid-save; submit with --signal-delay {needed} (or sbatch "
            f"--signal=B:USR2@{needed} --export=ALL,{STOP_LEAD_VAR}={needed})")


class StopSignals:
    """Record SIGTERM and SIGUSR2 as a request to stop (the trainer saves first, then stops; the
    launcher's node task lets torchrun's ranks stop, then decides whether to requeue).

    The handler only sets a flag: Python runs it in the main thread between two bytecodes,
    which may be inside a collective, a file write or a DataLoader's queue read, where I/O or
    an exception would leave the run half-done. Create it in the main thread, before the
    DataLoader workers start: forked workers inherit it, so a signal sent to the whole
    process group (as SLURM does) does not kill them under the step that is to be saved.
    Close it (or leave its `with` block) to restore the handlers it replaced.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS):
        self.received: set[signal.Signals] = set()  # every stop signal received
        self.received_at: float | None = None  # time.monotonic() of the first
        self._previous: dict[signal.Signals, Handler] = {sig: signal.signal(sig, self._record) for sig in signals}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received.add(signal.Signals(signum))
        if self.received_at is None:
            self.received_at = time.monotonic()

    def name(self) -> str:
        """The stop signals that reached this process; another rank's, if none did (`training.signals.agree`)."""
        if not self.received:
            return "a stop signal (on another rank)"
        return ", ".join(sorted(sig.name for sig in self.received))

    def requested(self) -> bool:
        """Whether a stop signal reached this process (this rank only: see training.signals.agree)."""
        return bool(self.received)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            # None: the handler was set outside Python; the default is the closest we can restore.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def leave(code: int) -> NoReturn:
    """End this process (a rank) with exit status `code`, skipping Python's finalization.

    About once in 60 multi-rank runs on a busy machine a rank aborted at exit with "terminate
    called without an active exception" (SIGABRT) after finishing its work. gloo's worker
    threads (ProcessGroupGloo's run loop) live as long as a reference to their group, and
    DeepSpeed keeps such references in its engine, its ZeRO optimizer and every ZeRO-3
    parameter, so destroy_process_group() cannot join them. A worker drops its finished work
    only after the waiting main thread has been released; when that frees tensors it takes the
    GIL, and if the main thread has meanwhile entered Py_FinalizeEx, Python ends the worker
    with pthread_exit inside a noexcept destructor: std::terminate. The backtrace:
    ProcessGroupGloo::runLoop -> ~AsyncWork -> TensorImpl::decref_pyobject ->
    gil_scoped_acquire -> take_gil -> PyThread_exit_thread. os._exit never finalizes, so no
    worker can meet it; what finalization would have done that matters here is done first:
    the trainer has closed its loaders, metrics file and W&B run by now.
    """
    if "wandb" in sys.modules:  # its service process, which wandb's atexit hook would stop
        try:
            sys.modules["wandb"].teardown(exit_code=code)
        except Exception:  # noqa: BLE001 - W&B's failures must never cost the exit status
            pass
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (a reader that went away) must not keep the process alive
            pass
    os._exit(code)
