"""Where a run's allocated time went: each attempt's phases, the steps each preemption lost, goodput.

An attempt is one start of `mmscale train` (a job's first start, each requeue, each rerun by
hand). Rank 0 charges every second of it to exactly one phase, from the launcher's start
(LAUNCHED_AT_VAR, which `mmscale submit`'s node task and slurm/train.sbatch set) or else its own
process start, and keeps the record in RUN_DIR/attempts/NNN.json, rewritten at every log line,
checkpoint and phase change, and at least every REWRITE_S seconds: an attempt that was killed
ends at its last rewrite.

    launch    the launcher's start to this process's (the node task, torchrun)
    startup   this process's start to the trainer's first line: imports, the recipe
    build     tokenizer, data loaders, process group, model, pretrained weights, engine, W&B
    resume    the newest checkpoint loaded, the data position restored (readers seek to it on
              their first batch, in train)
    train     the training steps, with their logging
    validate, eval, save
    stop      after the last save: loaders and W&B closed

Goodput is the share of the allocated rank-seconds (wall time x ranks: GPU-hours on GPUs) that
went into training steps the model still holds: steps up to the checkpoint the run would resume
from now (or its final one). A step trained after that checkpoint is lost to the next start,
which trains it again; an attempt's steps after the checkpoint the next attempt resumed from
are lost. Only this module's arithmetic decides what was kept (`account`); it needs no torch,
so `mmscale jobs` reads it on a login node.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from mmscale.utils.files import write_durably

PHASES = ("launch", "startup", "build", "resume", "train", "validate", "eval", "save", "stop")
ATTEMPTS_DIR = "attempts"
# Epoch seconds when the launcher started on this node: the allocation's time before our process.
LAUNCHED_AT_VAR = "MMSCALE_LAUNCHED_AT"
REWRITE_S = 30  # the longest a running attempt's record goes unwritten


@dataclass
class Attempt:
    number: int  # 1, 2, ... in the order of starts
    ranks: int
    launched_at: float  # epoch seconds
    updated_at: float  # the last rewrite: its end, for a finished or a killed attempt
    job: str | None  # SLURM job id and start ("123 start 2"), None outside SLURM
    resumed_from: int  # the step of the checkpoint it resumed from; 0 for a fresh start
    last_step: int  # the last step it trained
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    saved: list[tuple[int, float]] = field(default_factory=list)  # (step, its train seconds so far) per checkpoint
    ended: str | None = None  # why it ended (a kind of mmscale.monitor.alerts), None while running or if killed

    @property
    def wall_s(self) -> float:
        return sum(self.phases.values())

    @property
    def steps(self) -> str | None:
        """The steps it trained ("13-30"), None if none."""
        return f"{self.resumed_from + 1}-{self.last_step}" if self.last_step > self.resumed_from else None

    def train_s_at(self, step: int) -> float:
        """Train seconds of this attempt's steps up to `step`: exact at its checkpoints and its last
        step, else interpolated between them (a rollback to a checkpoint it did not write)."""
        points = [(self.resumed_from, 0.0), *self.saved, (self.last_step, self.phases["train"])]
        if step <= self.resumed_from:
            return 0.0
        if step >= self.last_step:  # with the loop's time after its last step: no step is lost there
            return self.phases["train"]
        for (s0, t0), (s1, t1) in zip(points, points[1:]):
            if s0 <= step <= s1:
                return t1 if s1 == s0 else t0 + (t1 - t0) * (step - s0) / (s1 - s0)
        return self.phases["train"]

    @classmethod
    def from_json(cls, text: str) -> Attempt:
        data = json.loads(text)
        data["saved"] = [tuple(point) for point in data["saved"]]
        data["phases"] = {**dict.fromkeys(PHASES, 0.0), **data["phases"]}
        return cls(**data)


@dataclass(frozen=True)
class Kept:
    """One attempt's training as the run keeps it."""

    attempt: Attempt
    kept_until: int  # the last of its steps the model still holds (resumed_from if none)
    kept_s: float  # their train seconds
    lost_steps: int  # steps it trained that a later start trained again (or would, if it started now)

    @property
    def lost_s(self) -> float:
        return self.attempt.phases["train"] - self.kept_s


@dataclass(frozen=True)
class Accounting:
    attempts: list[Kept]

    @property
    def allocated_rank_s(self) -> float:
        return sum(k.attempt.wall_s * k.attempt.ranks for k in self.attempts)

    @property
    def goodput(self) -> float | None:
        allocated = self.allocated_rank_s
        return sum(k.kept_s * k.attempt.ranks for k in self.attempts) / allocated if allocated else None

    def rank_hours(self) -> dict[str, float]:
        """Allocated rank-hours by phase, the train phase split into kept and lost."""
        hours: dict[str, float] = {}
        for k in self.attempts:
            for phase, seconds in k.attempt.phases.items():
                split = {"train_kept": k.kept_s, "train_lost": k.lost_s} if phase == "train" else {phase: seconds}
                for name, s in split.items():
                    hours[name] = hours.get(name, 0.0) + s * k.attempt.ranks / 3600
        return hours


def account(attempts: list[Attempt]) -> Accounting:
    """What of each attempt's training the run keeps, walking back from the newest attempt: it keeps
    its steps up to its newest checkpoint; each earlier one, its steps up to where the next resumed
    (no later than where any later attempt resumed: a rollback loses everything after it)."""
    kept: list[Kept] = []
    horizon: int | None = None  # no step after it is kept
    for attempt in reversed(attempts):
        newest = max((step for step, _ in attempt.saved), default=attempt.resumed_from)
        until = newest if horizon is None else min(horizon, attempt.last_step)
        until = max(until, attempt.resumed_from)
        kept.append(Kept(attempt, until, attempt.train_s_at(until), attempt.last_step - until))
        horizon = attempt.resumed_from if horizon is None else min(horizon, attempt.resumed_from)
    return Accounting(kept[::-1])


def _attempt_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("[0-9]*.json"), key=lambda p: int(p.stem)) if folder.is_dir() else []


def read_attempts(run_dir: Path) -> list[Attempt]:
    """The attempts recorded in RUN_DIR/attempts, oldest first; a file that cannot be read (edited
    by hand, from another version) is left out with a warning: accounting must never stop a run."""
    attempts = []
    for path in _attempt_files(run_dir / ATTEMPTS_DIR):
        try:
            attempts.append(Attempt.from_json(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as e:
            warnings.warn(f"{path} is not an attempt record ({type(e).__name__}: {e}); it is left out of the "
                          "accounting", stacklevel=2)
    return attempts


def process_started_at() -> float:
    return psutil.Process().create_time()


class Timeline:
    """Rank 0's clock of this attempt. Every rank keeps one (they switch phases together); only
    rank 0's is written, once `attach` names the run directory."""

    def __init__(self, started_at: float | None = None):
        """`started_at`: when the attempt began (epoch seconds); default: this process's start,
        and the launcher's before it (LAUNCHED_AT_VAR)."""
        now = time.time()
        process = started_at if started_at is not None else process_started_at()
        launched = float(os.environ.get(LAUNCHED_AT_VAR, process)) if started_at is None else process
        self.attempt = Attempt(0, 1, min(launched, process), now, slurm_job(), 0, 0)
        self.attempt.phases["launch"] = max(0.0, process - launched)
        self.current, self.since = "startup", process
        self.path: Path | None = None
        self.attached, self.write_failed = False, False
        self.earlier: list[Attempt] = []
        self.written_at = now

    def _charge(self) -> None:
        now = time.time()
        self.attempt.phases[self.current] += now - self.since
        self.since = self.attempt.updated_at = now

    def switch(self, phase: str) -> str:
        """Charge the time so far to the current phase and start `phase`; returns the previous one."""
        self._charge()
        previous, self.current = self.current, phase
        return previous

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """`name` for the block, then back to the phase it interrupted; written on both sides."""
        previous = self.switch(name)
        self.write()
        try:
            yield
        finally:
            self.switch(previous)
            self.write()

    def attach(self, run_dir: Path, rank: int, ranks: int) -> None:
        """Give the attempt its number and file (rank 0): RUN_DIR/attempts/NNN.json, after the
        newest there. Once: a later call (the trainer's, after train.py's) changes nothing."""
        if self.attached:
            return
        self.attached, self.attempt.ranks = True, ranks
        if rank != 0:
            return
        folder = run_dir / ATTEMPTS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        self.earlier = read_attempts(run_dir)  # the run's attempts before this one, which no longer change
        self.attempt.number = max((int(p.stem) for p in _attempt_files(folder)), default=0) + 1
        self.path = folder / f"{self.attempt.number:03d}.json"
        self.write()

    def resumed(self, step: int) -> None:
        self.attempt.resumed_from = self.attempt.last_step = step

    def stepped(self, step: int) -> None:
        """`step` is done. The record is rewritten at each log line anyway; also every REWRITE_S, so
        that a killed attempt's record misses at most that much of its time and steps."""
        self.attempt.last_step = step
        if time.time() - self.written_at > REWRITE_S:
            self.write()

    def saved(self, step: int) -> None:
        self._charge()
        self.attempt.saved.append((step, self.attempt.phases["train"]))

    def end(self, why: str) -> None:
        self.attempt.ended = why
        self.write()

    def write(self) -> None:
        """Rewrite the attempt's file (rank 0), atomically; without fsync: a rewrite lost in a
        machine crash costs the accounting a few seconds. A failed write (a full disk, which
        the checkpoints report themselves) is warned about once and never costs the run."""
        self._charge()
        if self.path is None:
            return
        self.written_at = time.time()
        try:
            write_durably(self.path, json.dumps(asdict(self.attempt)) + "\n", sync=False)
        except OSError as e:
            if not self.write_failed:
                warnings.warn(f"the attempt's time record {self.path} could not be written ({e}); "
                              "training goes on", stacklevel=2)
            self.write_failed = True

    def accounting(self) -> Accounting:
        """The run's accounting with this attempt as it stands now (complete on rank 0, after `attach`)."""
        self._charge()
        return account([*self.earlier, self.attempt])


def slurm_job() -> str | None:
    job = os.environ.get("SLURM_JOB_ID")
    return f"{job} start {int(os.environ.get('SLURM_RESTART_COUNT', '0')) + 1}" if job else None


def metrics(accounting: Accounting) -> dict:
    """The metrics record's share: goodput and the allocated rank-hours by phase, all attempts so far."""
    return {"goodput": accounting.goodput, "rank_hours": accounting.rank_hours()}


def _seconds(value: float) -> str:
    return f"{value:.1f}" if value < 600 else f"{value / 60:.0f}m" if value < 36000 else f"{value / 3600:.0f}h"


def attempts_table(accounting: Accounting) -> str:
    """`mmscale jobs`: one line per attempt (seconds of wall time per phase), then the run's goodput."""
    shown = [p for p in PHASES if p != "train"]
    head = f"{'attempt':>7}  {'job':<14} {'ranks':>5} {'steps':>11} {'lost':>5}  {'train':>7} {'kept':>7}"
    lines = [head + "".join(f" {p:>8}" for p in shown) + f" {'wall':>8}  ended"]
    for k in accounting.attempts:
        a = k.attempt
        lines.append(
            f"{a.number:>7}  {a.job or '-':<14} {a.ranks:>5} {a.steps or '-':>11} {k.lost_steps:>5}  "
            f"{_seconds(a.phases['train']):>7} {_seconds(k.kept_s):>7}"
            + "".join(f" {_seconds(a.phases[p]):>8}" for p in shown)
            + f" {_seconds(a.wall_s):>8}  {a.ended or 'running, or killed'}"
        )
    goodput = accounting.goodput
    hours = accounting.allocated_rank_s / 3600
    lines.append(f"goodput {goodput:.1%} of {hours:.3g} allocated rank-hours" if goodput is not None else "goodput: -")
    return "\n".join(lines)


def attempt_line(kept: Kept) -> str:
    """The one line an attempt prints when it ends (its record, for a reader of the log)."""
    a = kept.attempt
    phases = ", ".join(f"{p} {a.phases[p]:.2f}" for p in PHASES)
    steps = f"steps {a.steps}" if a.steps else "no steps"
    return (f"attempt {a.number}: {a.wall_s:.2f} s x {a.ranks} ranks; {steps}, kept to {kept.kept_until} "
            f"({kept.kept_s:.2f} s of train); seconds: {phases}")
