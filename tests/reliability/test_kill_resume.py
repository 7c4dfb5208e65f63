"""SIGKILL at a random step, then the same command again: the resumed run is the uninterrupted
run, loss for loss, and it consumes exactly its samples, step by step (nothing lost, nothing
repeated), with 2 loader workers whose positions the checkpoints hold."""

from __future__ import annotations

import os
import random
import re
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from mmscale.monitor.timeline import account, read_attempts
from tests.reliability.runs import demo_data, jsonl, last_by_step, run, start, train_command
from tests.reliability.trials import Trial, check, trials

STEPS = 10
OVERRIDES = (f"train.steps={STEPS}", "train.checkpoint_every=3", "train.log_every=1", "train.val_every=0",
             "train.log_sample_ids=true", "data.num_workers=2")


def _outcome(run_dir: Path) -> tuple[dict, dict]:
    """(step -> loss, step -> sample ids) as the run kept them."""
    return (last_by_step(jsonl(run_dir / "metrics.jsonl"), "loss"),
            last_by_step(jsonl(run_dir / "samples" / "rank_0.jsonl"), "ids"))


def _kill_at(command: list[str], run_dir: Path, step: int) -> int:
    """Run until its sample log shows `step`, then SIGKILL the run and its workers; the last step logged."""
    process = start(command, run_dir.parent / "killed.log")
    log = run_dir / "samples" / "rank_0.jsonl"
    while process.poll() is None and len(jsonl(log)) < step:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return len(jsonl(log))


def _accounting_problem(run_dir: Path, killed_after: int, resumed_from: int) -> str | None:
    """What the attempts' time accounting got wrong, if anything: the killed attempt ends at its last
    record (written after each step's log line, so the kill may come after the step's sample log and
    before its record) and loses the steps after the checkpoint the next start resumed from."""
    killed, resumed = account(read_attempts(run_dir)).attempts
    if killed.attempt.ended is not None or killed.attempt.last_step not in (killed_after - 1, killed_after):
        return f"the killed attempt's record: ended {killed.attempt.ended}, last step {killed.attempt.last_step}"
    if killed.lost_steps != killed.attempt.last_step - resumed_from or killed.kept_until != resumed_from:
        return f"the killed attempt kept steps to {killed.kept_until} and lost {killed.lost_steps}"
    if (resumed.attempt.ended, resumed.kept_until, resumed.lost_steps) != ("finished", STEPS, 0):
        return f"the resumed attempt: {resumed}"
    said = (f"attempt 1 ended without a record of why (killed) after step {killed.attempt.last_step}, so "
            f"{killed.lost_steps} of its steps are trained again")
    if said not in (run_dir.parent / "resumed.log").read_text():
        return f"the resumed start did not say: {said}"
    return None


def run_trials(n: int, workdir: Path, seed: int) -> list[Trial]:
    data = demo_data(workdir)
    reference_dir = workdir / "reference" / "run"
    assert run(train_command(data, reference_dir, *OVERRIDES), reference_dir.parent / "log") == 0
    losses, samples = _outcome(reference_dir)
    rng = random.Random(seed)
    results = []
    for trial in range(n):
        run_dir = workdir / f"trial{trial}" / "run"
        command = train_command(data, run_dir, *OVERRIDES)
        killed_after = _kill_at(command, run_dir, rng.randint(1, STEPS - 1))
        code = run(command, run_dir.parent / "resumed.log")
        got_losses, got_samples = _outcome(run_dir)
        consumed = Counter(i for ids in got_samples.values() for i in ids)
        expected = Counter(i for ids in samples.values() for i in ids)
        resumed_from = re.findall(r"resumed from step (\d+)", (run_dir.parent / "resumed.log").read_text())
        redone = killed_after - int(resumed_from[0]) if resumed_from else killed_after
        what = f"SIGKILL after step {killed_after}"
        if code != 0:
            results.append(Trial(False, what, f"the resumed run exited {code}"))
        elif got_losses != losses:
            differ = sorted(s for s in losses if got_losses.get(s) != losses[s])
            results.append(Trial(False, what, f"losses differ at steps {differ}"))
        elif got_samples != samples or consumed != expected:
            results.append(Trial(False, what, f"samples differ: lost {expected - consumed}, repeated {consumed - expected}"))
        elif (problem := _accounting_problem(run_dir, killed_after, int(resumed_from[0]) if resumed_from else 0)):
            results.append(Trial(False, what, problem))
        else:
            results.append(Trial(True, what, f"{redone} step(s) computed again, no sample lost or repeated"))
    return results


@pytest.mark.slow
@pytest.mark.reliability
def test_killed_runs_resume_into_the_uninterrupted_run(tmp_path):
    results = run_trials(trials(2), tmp_path, seed=0)
    check(results)
