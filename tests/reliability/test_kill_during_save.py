"""SIGKILL at random moments while checkpoints are written: the newest complete one always loads.

A saver process trains nothing: it changes the demo model's weights and saves, step after
step (keeping the newest 2, so pruning runs too), as fast as it can, printing each committed
step. The parent kills it at a random moment; most kills land inside a save (writing shards,
fsyncing, committing or pruning), since saving is all the saver does.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mmscale.training.checkpoint import TMP_PREFIX, checkpoint_dir, load_latest_checkpoint, save_checkpoint
from tests.helpers.checkpoints import demo_engine, fingerprint
from tests.helpers.processes import one_rank_world, subprocess_env
from tests.helpers.recipes import REPO
from tests.reliability.trials import Trial, check, trials

SAVER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from mmscale.training import checkpoint, init_distributed
    from tests.helpers.checkpoints import demo_engine, fingerprint

    init_distributed(timeout_s=60)
    engine, model = demo_engine(seed=1)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3)
        checkpoint.save_checkpoint(engine, Path(sys.argv[1]), step, {"step": step, "fingerprint": fingerprint(model)},
                                   keep=2)
        print(f"SAVED {step}", flush=True)
    """
)


def _kill_at_random(run_dir: Path, rng: random.Random) -> tuple[int, float, bool]:
    """Start a saver, kill it at a random moment after its first save; (last step it reported
    committed, the delay, whether a save was in progress)."""
    log = run_dir.parent / f"{run_dir.name}.stderr"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as stderr:
        saver = subprocess.Popen([sys.executable, "-c", SAVER, str(run_dir)], cwd=REPO, env=subprocess_env(),
                                 stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        lines = []
        while not (lines and lines[-1].startswith("SAVED")) and saver.poll() is None:
            lines.append(saver.stdout.readline())
        assert lines and lines[-1].startswith("SAVED"), log.read_text()[-3000:]
        delay = rng.uniform(0.0, 2.0)
        time.sleep(delay)
        saver.send_signal(signal.SIGKILL)
        rest, _ = saver.communicate(timeout=60)
    finally:
        saver.kill()
        saver.wait()
    lines += rest.splitlines()
    reported = [int(line.split()[1]) for line in lines if line.startswith("SAVED")]
    in_progress = any(checkpoint_dir(run_dir).glob(TMP_PREFIX + "*"))
    return reported[-1], delay, in_progress


def run_trials(n: int, workdir: Path, seed: int) -> list[Trial]:
    rng = random.Random(seed)
    results = []
    with one_rank_world():
        engine, model = demo_engine(seed=2)
        for trial in range(n):
            run_dir = workdir / f"trial{trial}"
            reported, delay, in_progress = _kill_at_random(run_dir, rng)
            what = f"SIGKILL {delay:.2f} s after the first save, {'during a save' if in_progress else 'between saves'}"
            restored = load_latest_checkpoint(engine, run_dir)
            step = restored.client_state["step"]
            # The newest committed checkpoint: the one last reported, or one committed just before
            # the kill whose report never got out.
            if step not in (reported, reported + 1):
                results.append(Trial(False, what, f"resumed at step {step}, but step {reported} was committed"))
            elif fingerprint(model) != restored.client_state["fingerprint"]:
                results.append(Trial(False, what, f"step {step} loaded weights other than those it saved"))
            else:
                save_checkpoint(engine, run_dir, step + 1, {"step": step + 1})  # and saving goes on
                lost = "the save in progress" if in_progress else ""
                results.append(Trial(True, what + f"; resumed at step {step}", lost))
    return results


@pytest.mark.reliability
def test_a_kill_at_any_moment_of_saving_leaves_the_newest_complete_checkpoint_loadable(tmp_path):
    results = run_trials(trials(3), tmp_path, seed=0)
    check(results)
