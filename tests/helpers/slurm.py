"""Jobs on the local SLURM cluster of the tests marked `slurm`: submitting, waiting, and reading what they
logged. Every job trains the tiny demo recipe on 2 nodes x 1 rank with ZeRO-2 over gloo."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from mmscale.launch.jobs import job_state, wait_for_job
from tests.helpers.processes import subprocess_env
from tests.helpers.recipes import RECIPE, REPO, TINY_OVERRIDES

# Long enough that a stop requested after step 3 lands mid-run (steps take 0.05-0.25 s here).
STEPS = 50

JOB_TIMEOUT_S = 150


def make_job_env(home: Path) -> dict[str, str]:
    """The environment jobs are submitted with (sbatch passes it on to the job); W&B offline, under `home`."""
    env = dict(subprocess_env(), MMSCALE_PYTHON=sys.executable, WANDB_MODE="offline", WANDB_SILENT="true")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        env[name] = str(home / "wandb_home" / name.lower())
    return env


def job_overrides(demo_data: Path, run_dir: Path, steps: int = STEPS, checkpoint_every: int = 25) -> list[str]:
    """The tiny demo recipe, logging every step (so every step's loss can be compared)."""
    return TINY_OVERRIDES + [
        f"data.train={demo_data / 'train'}", f"data.val={demo_data / 'val'}", f"data.tokenizer={demo_data / 'tokenizer'}",
        f"run.dir={run_dir}", f"train.steps={steps}", "train.log_every=1", "train.val_every=0",
        f"train.checkpoint_every={checkpoint_every}", "train.zero_stage=2",
    ]  # fmt: skip


def sbatch(args: list[str], env: dict[str, str], log_dir: Path) -> tuple[str, Path]:
    """Submit slurm/train.sbatch on 2 nodes; returns the job id and its log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    command = ["sbatch", "--parsable", "--nodes=2", "--time=10", f"--output={log_dir}/%x-%j.log",
               str(REPO / "slurm" / "train.sbatch"), RECIPE, *args]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True)
    job_id = proc.stdout.strip().split(";")[0]
    return job_id, log_dir / f"mmscale-{job_id}.log"


def wait_until_ended(job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> str:
    try:
        return wait_for_job(job_id, poll_s=0.5, timeout_s=timeout_s)
    except TimeoutError:
        subprocess.run(["scancel", job_id], check=False)
        raise


def wait_for_state(job_id: str, state: str, timeout_s: float = 60) -> None:
    end = time.monotonic() + timeout_s
    while job_state(job_id) != state:
        assert time.monotonic() < end, f"job {job_id} is {job_state(job_id)}, not {state}"
        time.sleep(0.2)


def wait_for_step(run_dir: Path, step: int, job_id: str, timeout_s: float = JOB_TIMEOUT_S) -> None:
    """Until metrics.jsonl logged `step` (the job is then mid-training)."""
    end = time.monotonic() + timeout_s
    while logged_steps(run_dir)[-1:] < [step]:
        state = job_state(job_id)
        # COMPLETING and REQUEUED: a requeued job on its way back (any job passes COMPLETING to its end state).
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "UNKNOWN", "COMPLETING", "REQUEUED") or time.monotonic() > end:
            raise AssertionError(f"job {job_id} is {state} and never logged step {step}")
        time.sleep(0.1)


def read_log(path: Path) -> str:
    # A progress bar cut off by a signal may leave half a UTF-8 character.
    return path.read_text(errors="replace")


def training_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if "loss" in r]


def logged_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in training_records(run_dir)]


def starts(job_id: str) -> list[str]:
    """The state of each start of a job, as accounting recorded them (REQUEUED, ..., COMPLETED)."""
    proc = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", job_id, "-o", "State"],
                          check=False, capture_output=True, text=True, timeout=30)  # fmt: skip
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def wandb_run_ids(run_dir: Path) -> list[str]:
    """The run id of each offline W&B run folder, one per start (offline-run-TIME-ID)."""
    return [p.name.rsplit("-", 1)[1] for p in sorted(run_dir.glob("wandb/offline-run-*"))]


def assert_resumed_exactly(run_dir: Path, log: str, reference: list[dict]) -> list[int]:
    """The run stopped mid-run after saving (once or more), each next start resumed from that
    checkpoint, and every step repeats the uninterrupted `reference` run exactly; returns the steps
    it resumed from."""
    resumed = [int(step) for step in re.findall(r"resumed from step (\d+)", log)]
    assert resumed and all(3 <= step < STEPS for step in resumed), log[-3000:]
    records = training_records(run_dir)
    # Each step once: a start logged up to the step it saved at its stop, the next one on from there.
    assert [r["step"] for r in records] == [r["step"] for r in reference] == list(range(1, STEPS + 1))
    for got, want in zip(records, reference):
        keys = ("loss", "lr", "grad_norm", "samples_seen", "tokens_seen")
        assert [got[k] for k in keys] == [want[k] for k in keys], f"step {got['step']} (resumed from {resumed})"
    return resumed
