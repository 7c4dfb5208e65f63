"""A stop signal (SIGUSR2: SLURM's time-limit warning) wherever it lands ends the run with
exit 0 and loses nothing: during validation or the in-loop eval it saves at once; during the
model build or the resume it exits before training, and the next start resumes.

Each run is the real `mmscale train`; the signal is sent by the process itself from inside the
phase under test (the phase's function wrapped to send it first), so it lands there every time."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from mmscale.training.checkpoint import checkpoint_dir
from tests.helpers.processes import subprocess_env
from tests.helpers.recipes import RECIPE, REPO

# `python -c WRAPPED PHASE ARGS...`: PHASE's function sends SIGUSR2 to the process, then runs.
WRAPPED = """
import os, signal, sys
import mmscale.train, mmscale.training.trainer as trainer
from mmscale.cli import main

phase, argv = sys.argv[1], sys.argv[2:]
owner = mmscale.train if phase == "build_model" else trainer.Trainer
original = getattr(owner, phase)

def signalled(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGUSR2)
    return original(*args, **kwargs)

setattr(owner, phase, signalled)
main(argv)
"""


def _train(overrides: list[str], phase: str | None = None) -> str:
    command = [sys.executable, "-c", WRAPPED, phase] if phase else [sys.executable, "-m", "mmscale"]
    proc = subprocess.run([*command, "train", RECIPE, *overrides], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    return log


def _steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in checkpoint_dir(run_dir).glob("step_*"))


def test_a_stop_signal_in_any_phase_exits_0_and_loses_nothing(tiny_overrides):
    run_dir = Path(tiny_overrides[-1].split("=", 1)[1])
    overrides = [*tiny_overrides, "train.steps=6", "train.log_every=1", "train.val_every=2", "train.checkpoint_every=0",
                 "train.eval_every=3", "train.eval_samples=4"]

    # During validation at step 2: validated, then saved at once (no step 3), then stopped.
    log = _train(overrides, "validate")
    assert _steps(run_dir) == [1, 2] and _checkpoints(run_dir) == ["step_0000002"]
    assert re.search(r"step 2: checkpoint \S+ \([0-9.]+ GB in [0-9.]+ s\)", log)
    assert re.search(r"step 2: stopped by a signal, checkpoint committed [0-9.]+ s after it", log)

    # During the resume: it exits before training; the checkpoint stays the newest.
    log = _train(overrides, "resume")
    assert "stopped by a signal before step 3" in log
    assert _steps(run_dir) == [1, 2] and _checkpoints(run_dir) == ["step_0000002"]

    # During the in-loop eval at step 3: saved at once.
    log = _train(overrides, "evaluate")
    assert "resumed from step 2" in log and _checkpoints(run_dir) == ["step_0000002", "step_0000003"]
    assert _steps(run_dir)[-1] == 3 and "step 3: stopped by a signal" in log

    # A plain start finishes the run from there.
    log = _train(overrides)
    assert "resumed from step 3" in log and _steps(run_dir)[-3:] == [4, 5, 6]


def test_a_stop_signal_during_the_model_build_exits_0_before_anything_is_saved(tiny_overrides):
    run_dir = Path(tiny_overrides[-1].split("=", 1)[1])
    log = _train([*tiny_overrides, "train.steps=4"], "build_model")
    assert "stopped by a signal before step 1" in log
    assert _steps(run_dir) == [] and _checkpoints(run_dir) == []


def test_a_stop_lead_shorter_than_a_step_and_two_saves_is_named_with_the_delay_to_ask_for(monkeypatch):
    from mmscale.launch.ending import STOP_LEAD_VAR, short_stop_lead

    monkeypatch.delenv(STOP_LEAD_VAR, raising=False)
    assert short_stop_lead(10, 40) is None  # the lead is unknown: nothing to compare
    monkeypatch.setenv(STOP_LEAD_VAR, "120")
    assert short_stop_lead(10, 40) is None  # 10 + 2 x 40 + 30 = 120 fits
    monkeypatch.setenv(STOP_LEAD_VAR, "119")
    assert "comes 119 s before its time limit, and a stop needs about 120 s" in short_stop_lead(10, 40)
    assert "--signal-delay 120 (or sbatch --signal=B:USR2@120" in short_stop_lead(10, 40)
