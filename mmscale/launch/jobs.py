"""The SLURM jobs of a run directory: their states, logs and the run's progress (`mmscale jobs`),
and waiting for one to end (`mmscale submit --wait`).

States come from `squeue` while SLURM holds the job (pending, running, being requeued) and from
`sacct` after it ended; a job that was requeued shows one sacct record per start.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from mmscale.monitor.timeline import account, attempts_table, read_attempts

# States a job does not leave by itself (a requeued job goes back to PENDING instead).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED", "REVOKED"}  # fmt: skip


def _lines(command: list[str]) -> list[str]:
    """Output lines of a SLURM command; none if it fails or is missing (the job is then unknown)."""
    try:
        proc = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line for line in proc.stdout.splitlines() if line.strip()] if proc.returncode == 0 else []


def job_state(job_id: str) -> str:
    """PENDING, RUNNING, COMPLETED, FAILED, ... ("CANCELLED by 0" reads CANCELLED), or UNKNOWN
    while neither squeue nor sacct knows it (just submitted, or accounting is late)."""
    active = _lines(["squeue", "-h", "-j", job_id, "-o", "%T"])
    if active:
        return active[0].split()[0]
    ended = _lines(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"])
    return ended[-1].split()[0] if ended else "UNKNOWN"


def wait_for_job(job_id: str, poll_s: float = 2.0, timeout_s: float | None = None) -> str:
    """Block until job `job_id` is in a final state (through any requeues) and return it;
    TimeoutError after `timeout_s`."""
    start = time.monotonic()
    while (state := job_state(job_id)) not in FINAL_STATES:
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"SLURM job {job_id} still {state} after {timeout_s:.0f} s")
        time.sleep(poll_s)
    return state


def node_logs(run_dir: Path, job_id: str) -> list[Path]:
    """The log of each node's task of a job `mmscale submit` started (node 0 first)."""
    folder = run_dir / "slurm" / job_id
    return sorted(folder.glob(f"{job_id}_*_log.out"), key=lambda p: int(p.name.split("_")[1]))


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    state: str
    starts: int  # 1 + the times it was requeued, as far as accounting knows
    elapsed: str  # of the last start
    nodes: str


def job_record(job_id: str) -> JobRecord:
    starts = _lines(["sacct", "-X", "-n", "-P", "-D", "-j", job_id, "-o", "State,Elapsed,NodeList"])
    elapsed, nodes = starts[-1].split("|")[1:] if starts else ("-", "-")
    return JobRecord(job_id, job_state(job_id), max(len(starts), 1), elapsed, nodes)


def run_jobs(run_dir: Path) -> list[JobRecord]:
    """The jobs `mmscale submit` started for `run_dir`, oldest first."""
    folders = [p for p in (run_dir / "slurm").glob("*") if p.is_dir() and p.name.isdigit()]
    return [job_record(p.name) for p in sorted(folders, key=lambda p: int(p.name))]


def progress(run_dir: Path) -> str:
    """The newest checkpoint `latest` names and the last step metrics.jsonl logged."""
    try:
        checkpoint = (run_dir / "checkpoints" / "latest").read_text().strip()
    except FileNotFoundError:
        checkpoint = "none"
    steps = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    return f"latest checkpoint: {checkpoint}; last logged step: {steps[-1] if steps else 'none'}"


def describe_jobs(run_dir: Path) -> str:
    """`mmscale jobs RUN_DIR`: one line per job, the run's progress, the newest job's logs; then
    each attempt (start of the trainer, under SLURM or not): its seconds per phase, the steps it
    lost, and the run's goodput (mmscale.monitor.timeline)."""
    jobs = run_jobs(run_dir)
    if not jobs:
        lines = [f"{run_dir}: no jobs submitted with `mmscale submit`", progress(run_dir)]
    else:
        lines = [f"{'job':>10}  {'state':<12} {'starts':>6}  {'elapsed':>10}  nodes"]
        lines += [f"{j.job_id:>10}  {j.state:<12} {j.starts:>6}  {j.elapsed:>10}  {j.nodes}" for j in jobs]
        lines.append(progress(run_dir))
        lines += [f"log: {path}" for path in node_logs(run_dir, jobs[-1].job_id)]
    attempts = read_attempts(run_dir)
    if attempts:
        lines += ["", "time per attempt, in seconds of wall time (phases: mmscale/monitor/timeline.py):",
                  attempts_table(account(attempts))]
    return "\n".join(lines)
