"""Logs a person can read: known third-party noise silenced once, progress as whole lines where
no terminal redraws it, and a line for each slow start-up stage."""

from __future__ import annotations

import os
import sys
import time
import warnings
from types import TracebackType

from tqdm import tqdm

# Warnings that say nothing about the run, each with why it is safe to drop. They are filtered
# by message, not by category or module: any other warning of the same library still shows.
KNOWN_NOISE = (
    # DeepSpeed's ZeRO calls torch's collectives under their deprecated names on every step
    # (4 lines per step and rank under ZeRO-3, Python's "once per place" rule does not hold
    # them back); the calls themselves are right.
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
)


def quiet_known_noise() -> None:
    """Drop KNOWN_NOISE in this process and the loader workers it forks."""
    for category, message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)


def say(text: str) -> None:
    """A start-up line from the first rank (before the process group exists: the launcher's RANK)."""
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        print(f"mmscale: {text}", file=sys.stderr, flush=True)


class LineProgress:
    """tqdm's interface as far as the trainer uses it, printing one whole line per `set_postfix`
    (each logging window): in a SLURM log, tqdm's carriage-return redraws run into one line
    with every warning printed between them."""

    def __init__(self, total: int, initial: int, unit: str, desc: str):
        self.total, self.n, self.unit, self.desc = total, initial, unit, desc
        self.started, self.first = time.monotonic(), initial

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: str) -> None:
        seconds = time.monotonic() - self.started
        rate = (self.n - self.first) / seconds if seconds else 0.0
        left = (self.total - self.n) / rate if rate else float("nan")
        fields = " ".join(f"{k}={v}" for k, v in values.items())
        print(f"{self.desc} {self.n}/{self.total} {self.unit} ({self.n / self.total:.0%}) {fields} "
              f"{rate:.3g} {self.unit}/s, eta {left / 60:.1f} min", file=sys.stderr, flush=True)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        pass


def progress(total: int, initial: int, unit: str, desc: str, enabled: bool) -> tqdm | LineProgress:
    """A tqdm bar on a terminal; whole lines anywhere else; nothing on other ranks."""
    if enabled and not sys.stderr.isatty():
        return LineProgress(total, initial, unit, desc)
    return tqdm(total=total, initial=initial, unit=unit, desc=desc, disable=not enabled, dynamic_ncols=True)
