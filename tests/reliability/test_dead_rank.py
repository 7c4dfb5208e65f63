"""One rank of a 2-rank run killed (SIGKILL) or hung (SIGSTOP) mid-training: the other exits
within a bounded time, with an error naming the failure, and never hangs.

The ranks are two processes with their own RANK, as on two nodes (no torchrun agent to tear
the group down): the survivor has only its collectives to notice with.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mmscale.monitor.timeline import read_attempts
from mmscale.training.distributed import free_port
from tests.helpers.processes import subprocess_env
from tests.helpers.recipes import REPO
from tests.reliability.runs import demo_data, jsonl, train_command
from tests.reliability.trials import Trial, check, trials

TIMEOUT_S = 20  # train.dist_timeout_s: how long a collective waits for a hung peer
GRACE_S = 30  # what exiting may take beyond it
OVERRIDES = ("train.steps=500", "train.checkpoint_every=0", "train.val_every=0", "train.log_sample_ids=true",
             f"train.dist_timeout_s={TIMEOUT_S}", "data.num_workers=1")


def _start_ranks(command: list[str], workdir: Path) -> list[subprocess.Popen]:
    port = str(free_port())
    ranks = []
    for rank in (0, 1):
        env = dict(subprocess_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        with open(workdir / f"rank{rank}.log", "w") as log:
            ranks.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    return ranks


def _trial(data: Path, workdir: Path, victim: int, how: signal.Signals, at_step: int) -> Trial:
    run_dir = workdir / "run"
    ranks = _start_ranks(train_command(data, run_dir, *OVERRIDES), workdir)
    survivor = 1 - victim
    what = f"{how.name} rank {victim} after step {at_step}"
    try:
        log = run_dir / "samples" / f"rank_{victim}.jsonl"
        while len(jsonl(log)) < at_step and all(r.poll() is None for r in ranks):
            time.sleep(0.02)
        os.killpg(ranks[victim].pid, how)
        hit = time.monotonic()
        try:
            code = ranks[survivor].wait(timeout=TIMEOUT_S + GRACE_S)
        except subprocess.TimeoutExpired:
            return Trial(False, what, f"rank {survivor} still running {TIMEOUT_S + GRACE_S} s later: it hangs")
        took = time.monotonic() - hit
    finally:
        for rank in ranks:
            if rank.poll() is None:
                os.killpg(rank.pid, signal.SIGKILL)
            rank.wait()
    said = (workdir / f"rank{survivor}.log").read_text()
    if code == 0 or f"rank {survivor} lost contact with the other ranks" not in said:
        return Trial(False, what, f"rank {survivor} exited {code} without naming the lost peer")
    # Rank 0 reports the end: one line, and the attempt's record (read by `mmscale jobs`).
    if survivor == 0 and ("mmscale: run stopped: a rank was lost after step" not in said
                          or [a.ended for a in read_attempts(run_dir)] != ["lost_rank"]):
        return Trial(False, what, "rank 0 did not report the lost rank as the run's end")
    return Trial(True, what + f"; rank {survivor} exited {code} after {took:.1f} s", "the steps since the last checkpoint")


def run_trials(n: int, workdir: Path, seed: int) -> list[Trial]:
    data = demo_data(workdir)
    rng = random.Random(seed)
    kinds = (signal.SIGKILL, signal.SIGSTOP)
    results = []
    for trial in range(n):
        folder = workdir / f"trial{trial}"
        folder.mkdir(parents=True)
        results.append(_trial(data, folder, rng.randint(0, 1), kinds[trial % 2], rng.randint(2, 8)))
    return results


@pytest.mark.slow
@pytest.mark.reliability
def test_a_dead_or_hung_rank_ends_the_other_with_a_named_error(tmp_path):
    results = run_trials(max(2, trials(2)), tmp_path, seed=0)  # a killed and a hung rank
    check(results)
