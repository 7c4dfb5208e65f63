"""`mmscale submit`: what it asks SLURM for, and (marked slurm) its jobs on the local two-node
cluster: to the end, through a preemption notice, and with a rank that dies."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit

from mmscale.errors import UserError
from mmscale.launch.jobs import node_logs
from mmscale.launch.submit import (
    FORWARDED_SIGNALS,
    SlurmRequest,
    TrainJob,
    executor_parameters,
    torchrun_command,
)
from tests.helpers.outputs import logged_sample_ids
from tests.helpers.recipes import RECIPE
from tests.helpers.slurm import (
    STEPS,
    assert_resumed_exactly,
    job_overrides,
    logged_steps,
    read_log,
    starts,
    training_records,
    wait_for_step,
    wait_until_ended,
    wandb_run_ids,
)
from tests.helpers.wandb_log import offline_runs, records

# ---- what is asked for (no cluster) ---------------------------------------------------------


def test_gpu_nodes_ask_for_one_requeueable_task_per_node_with_its_gpus():
    request = SlurmRequest(nodes=2, gpus_per_node=8, partition="gpu", account="vlm", constraint="h100", time_min=720,
                           cpus_per_task=96, mem="0", setup=("module load cuda",), srun_args=("--container-image=x",),
                           sbatch={"exclusive": "", "mail-type": "END"})  # fmt: skip
    params = executor_parameters(request, "demo")
    assert request.ranks == 8
    assert params["nodes"] == 2 and params["ntasks_per_node"] == 1 and params["gpus_per_node"] == 8
    assert (params["partition"], params["account"], params["constraint"], params["time"]) == ("gpu", "vlm", "h100", 720)
    assert params["srun_args"] == ["--kill-on-bad-exit=1", "--cpus-per-task=96", "--container-image=x"]
    assert params["additional_parameters"] == {"requeue": True, "exclusive": True, "mail-type": "END"}
    assert params["signal_delay_s"] == 90 and params["setup"] == ["module load cuda"]


def test_cpu_nodes_ask_for_no_gpu_and_run_one_rank_each():
    request = SlurmRequest(nodes=2, gpus_per_node=0)
    params = executor_parameters(request, "demo")
    assert request.ranks == 1 and "gpus_per_node" not in params and "partition" not in params
    assert SlurmRequest(gpus_per_node=0, ranks_per_node=3).ranks == 3


@pytest.mark.parametrize("field, value, option", [("nodes", 0, "--nodes"), ("time_min", 0, "--time"),
                                                  ("ranks_per_node", 0, "--ranks-per-node"),
                                                  ("max_requeues", -1, "--max-requeues")])  # fmt: skip
def test_impossible_requests_name_their_option(field, value, option):
    with pytest.raises(UserError, match=f"{option} must be at least"):
        SlurmRequest(**{field: value})


def test_each_node_runs_torchrun_that_forwards_the_preemption_notice():
    command = torchrun_command("py", 2, 1, 8, "gpu03", 15042, 300, Path("run/slurm/42/recipe.yaml"))
    assert command[:3] == ["py", "-m", "torch.distributed.run"]
    assert {"--nnodes=2", "--node-rank=1", "--nproc-per-node=8", "--master-addr=gpu03", "--master-port=15042",
            "--shutdown-timeout=300", f"--signals-to-handle={FORWARDED_SIGNALS}"} <= set(command)  # fmt: skip
    assert "SIGUSR2" in FORWARDED_SIGNALS.split(",")
    assert command[-4:] == ["-m", "mmscale", "train", "run/slurm/42/recipe.yaml"]


def test_checkpoint_requeues_the_same_job_until_max_requeues(monkeypatch):
    job = TrainJob("run: {}\n", "runs/x", "/work", SlurmRequest(max_requeues=2))
    for restarts in ("0", "1"):
        monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)
        delayed = job.checkpoint()
        assert isinstance(delayed, submitit.helpers.DelayedSubmission) and delayed.function is job
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert job.checkpoint() is None


# ---- jobs on the local cluster --------------------------------------------------------------


class Submission:
    """`mmscale submit` running in the background, its output going to files (readable while it runs)."""

    def __init__(self, overrides: list[str], env: dict[str, str], folder: Path, wait: bool = False,
                 nodes: int = 2):
        command = [sys.executable, "-m", "mmscale", "submit", RECIPE, *overrides, "--nodes", str(nodes),
                   "--gpus-per-node", "0", "--time", "10", *(["--wait"] if wait else [])]  # fmt: skip
        self.out, self.err = folder / "submit.out", folder / "submit.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)

    def job_id(self, timeout_s: float = 60) -> str:
        """The job id from the first line ("submitted job 12: ...")."""
        end = time.monotonic() + timeout_s
        while not self.out.read_text().startswith("submitted job ") and self.proc.poll() is None:
            assert time.monotonic() < end, "mmscale submit printed no job id"
            time.sleep(0.1)
        line = self.out.read_text().split("\n", 1)[0]
        assert line.startswith("submitted job "), line + self.err.read_text()
        return line.split()[2].rstrip(":")

    def wait(self, timeout_s: float) -> tuple[int, str, str]:
        """Exit code, stdout and stderr."""
        code = self.proc.wait(timeout=timeout_s)
        return code, self.out.read_text(), self.err.read_text()


def _results(run_dir: Path, job_id: str) -> list:
    """What each node's task returned, read the way submitit's own client reads it."""
    return submitit.SlurmJob(folder=run_dir / "slurm" / "%j", job_id=job_id, tasks=(0, 1)).results()


@pytest.mark.slurm
def test_submit_trains_the_demo_on_two_nodes_to_the_end(slurm_cluster, demo_data, job_env, tmp_path):
    run_dir = tmp_path / "run"
    submission = Submission(job_overrides(demo_data, run_dir, steps=6, checkpoint_every=3), job_env, tmp_path, wait=True)
    job_id = submission.job_id()
    code, out, err = submission.wait(150)
    assert code == 0, err[-3000:]
    assert f"job {job_id}: COMPLETED" in out
    assert f"logs: {run_dir}/slurm/{job_id}/{job_id}_K_log.out for node K = 0..1" in out
    assert [p.name for p in node_logs(run_dir, job_id)] == [f"{job_id}_0_log.out", f"{job_id}_1_log.out"]
    assert _results(run_dir, job_id) == [str(run_dir)] * 2
    assert [r["step"] for r in training_records(run_dir)] == list(range(1, 7))
    assert len(list((run_dir / "checkpoints" / "step_0000006").glob("*optim_states.pt"))) == 2  # ZeRO-2, 2 ranks
    # The job trains the recipe as resolved at submission, kept beside its logs.
    assert (run_dir / "slurm" / job_id / "recipe.yaml").read_text() == (run_dir / "recipe.yaml").read_text()
    command = [sys.executable, "-m", "mmscale", "jobs", str(run_dir)]
    jobs = subprocess.run(command, check=False, capture_output=True, text=True, env=job_env, timeout=60)
    assert jobs.returncode == 0, jobs.stderr
    assert f"{job_id}  COMPLETED         1" in jobs.stdout
    assert "latest checkpoint: step_0000006; last logged step: 6" in jobs.stdout


def resumed_steps(log: str) -> list[int]:
    return [int(s) for s in re.findall(r"resumed from step (\d+)", log)]


ATTEMPT_LINE = re.compile(r"mmscale: attempt (\d+): ([\d.]+) s x (\d+) ranks; steps (\d+)-(\d+), kept to (\d+) "
                          r"\(([\d.]+) s of train\); seconds: (.*)")


@pytest.mark.slurm
def test_a_job_preempted_twice_resumes_exactly_and_accounts_for_every_attempt(reference_run, demo_data, job_env,
                                                                             tmp_path):
    """Preempted (`scontrol requeue`: SIGTERM, SLURM requeues) and then given its time-limit notice
    (SIGUSR2, what SLURM sends `--signal-delay` before the limit: submitit requeues) at random steps:
    every step repeats the uninterrupted run, and `mmscale jobs` shows the three attempts, the time
    of each phase, the steps each stop lost, and the goodput a hand computation from the attempts'
    log lines gives."""
    rng = random.Random(23)
    first = rng.randint(3, 12)
    second = first + rng.randint(8, 20)  # past the first stop's step and the second start's resume
    assert second < STEPS
    run_dir = tmp_path / "run"
    submission = Submission([*job_overrides(demo_data, run_dir, checkpoint_every=10), "run.wandb.enabled=true"],
                            job_env, tmp_path)
    job_id = submission.job_id()
    assert submission.wait(60)[0] == 0
    wait_for_step(run_dir, first, job_id)
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
    wait_for_step(run_dir, second, job_id)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    state = wait_until_ended(job_id)
    log, other = (read_log(path) for path in node_logs(run_dir, job_id))
    assert state == "COMPLETED", log[-3000:]
    assert starts(job_id) == ["REQUEUED", "REQUEUED", "COMPLETED"]
    assert "requeueing (requeue 2 of at most 10)" in log  # TrainJob.checkpoint, called by submitit on SIGUSR2
    assert "node 0 of 2 (node1), start 3:" in log and "node 1 of 2 (node2), start 3:" in other
    assert_resumed_exactly(run_dir, log, training_records(reference_run.run_dir))
    assert wandb_run_ids(run_dir) == [(run_dir / "wandb_id").read_text().strip()] * 3
    assert _results(run_dir, job_id) == [str(run_dir)] * 2
    jobs = subprocess.run([sys.executable, "-m", "mmscale", "jobs", str(run_dir)], check=False, capture_output=True,
                          text=True, env=job_env, timeout=60)
    assert jobs.returncode == 0, jobs.stderr

    # By hand, from the log: each attempt's line, where each stopped and where the next resumed.
    lines = [m.groups() for m in ATTEMPT_LINE.finditer(log)]
    assert [int(n) for n, *_ in lines] == [1, 2, 3]
    stopped = [int(s) for s in re.findall(r"step (\d+): stopped by a signal, checkpoint committed", log)]
    resumed = resumed_steps(log)
    assert len(stopped) == len(resumed) == 2 and first <= stopped[0] < second <= stopped[1]
    lost = [stop - resume for stop, resume in zip(stopped, resumed)]  # steps trained again after each stop
    phases = [dict((name, float(value)) for name, value in (p.split() for p in line[-1].split(", "))) for line in lines]
    walls, ranks = [float(line[1]) for line in lines], [int(line[2]) for line in lines]
    kept = [train for train, loss in zip([p["train"] for p in phases], [*lost, 0]) if loss == 0]
    assert lost == [0, 0] and len(kept) == 3  # each stop saved its last step first
    by_hand = sum(k * r for k, r in zip(kept, ranks)) / sum(w * r for w, r in zip(walls, ranks))

    rows = [line.split() for line in jobs.stdout.splitlines() if re.match(r"\s+\d+\s+\d+ start \d", line)]
    assert [(row[0], row[1:4]) for row in rows] == [(str(n), [job_id, "start", str(n)]) for n in (1, 2, 3)]
    header = next(line.split() for line in jobs.stdout.splitlines() if line.split()[:1] == ["attempt"])
    for row, attempt, wall, stop, resume in zip(rows, phases, walls, [*stopped, STEPS], [0, *resumed]):
        shown = dict(zip(header[2:], row[4:]))  # the job column ("12 start 2") takes three words
        assert shown["steps"] == f"{resume + 1}-{stop}" and shown["lost"] == "0"
        for phase in ("launch", "startup", "build", "resume", "train", "save", "stop"):
            assert float(shown[phase]) == pytest.approx(attempt[phase], abs=0.051), phase
        assert float(shown["wall"]) == pytest.approx(wall, abs=0.051)
        assert attempt["launch"] > 0 and attempt["build"] > 0 and attempt["train"] > 0
    (goodput,) = re.findall(r"goodput ([\d.]+)% of", jobs.stdout)
    assert float(goodput) == pytest.approx(100 * by_hand, abs=0.06)
    # Both stops are in the log; the time-limit notice's is an alert in W&B too. SLURM's SIGTERM
    # also ends W&B's service, so the first stop may reach only the log; each later start alerts
    # that it resumed, saying how the one before ended.
    assert log.count("mmscale: run stopped by a signal, checkpoint saved after step") == 2
    alerts = [records(wandb_file, "alert") for wandb_file in offline_runs(run_dir)]
    assert len(alerts) == 3 and len(alerts[0]) <= 1
    assert [a["level"] for a in alerts[1]] == ["INFO", "WARN"] and [a["level"] for a in alerts[2]] == ["INFO"]
    assert "SIGUSR2 reached the job" in alerts[1][1]["text"]
    for n, (resumed_alert, *_) in ((2, alerts[1]), (3, alerts[2])):
        assert resumed_alert["text"] == (
            f"attempt {n} ({job_id} start {n}) went on from the checkpoint of step {resumed[n - 2]}; attempt {n - 1} "
            f"ended stopped after step {stopped[n - 2]}, so 0 of its steps are trained again")


def _rank_pid(job_id: str, rank: int) -> int | None:
    """The pid of a trainer rank of `job_id` (torchrun gives its workers RANK; the agents have none)."""
    for proc in Path("/proc").iterdir():
        try:
            env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
        except (OSError, ValueError):
            continue
        if env.get("SLURM_JOB_ID") == job_id and env.get("RANK") == str(rank) and "TORCHELASTIC_RUN_ID" in env:
            return int(proc.name)
    return None


@pytest.mark.slurm
def test_a_job_whose_rank_dies_fails_at_once_and_says_why(slurm_cluster, demo_data, job_env, tmp_path):
    run_dir = tmp_path / "run"
    # Far more steps than it will live for: if the job hung, the test would see it.
    submission = Submission(job_overrides(demo_data, run_dir, steps=100000, checkpoint_every=0), job_env, tmp_path,
                            wait=True)
    job_id = submission.job_id()
    wait_for_step(run_dir, 3, job_id)
    pid = _rank_pid(job_id, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would
    killed = time.monotonic()
    code, out, err = submission.wait(120)
    took = time.monotonic() - killed
    assert code == 1 and f"job {job_id}: FAILED" in out, out + err
    assert took < 60, f"the job took {took:.0f} s to fail"
    assert starts(job_id) == ["FAILED"]  # a failure is not requeued
    # The error message names the logs, and they say what happened.
    logs = node_logs(run_dir, job_id)
    assert f"see its logs: {', '.join(map(str, logs))}" in err
    second = read_log(logs[1])
    assert "Signal 9 (SIGKILL) received by PID" in second
    assert f"TrainingFailed: torchrun exited with code 1 on node 1 (node2) of job {job_id}" in second
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="TrainingFailed|state: FAILED"):
        _results(run_dir, job_id)  # submitit's own client sees the failure too


@pytest.mark.slurm
def test_a_run_submitted_again_on_fewer_nodes_goes_on_elastically(slurm_cluster, demo_data, job_env, tmp_path):
    """Two nodes train 4 steps of a 12-step epoch (global batch 8: 4 per rank); submitted again on
    one node (accumulation 2), the run resumes from their checkpoint and trains each of the
    epoch's 96 samples once."""
    run_dir = tmp_path / "run"
    overrides = [*job_overrides(demo_data, run_dir, steps=4, checkpoint_every=4), "train.global_batch_size=8",
                 "train.log_sample_ids=true"]
    for nodes, steps in ((2, 4), (1, 12)):
        folder = tmp_path / f"{nodes}-nodes"
        folder.mkdir()
        submission = Submission([*overrides, f"train.steps={steps}"], job_env, folder, wait=True, nodes=nodes)
        job_id = submission.job_id()
        code, out, err = submission.wait(150)
        assert code == 0 and f"job {job_id}: COMPLETED" in out, err[-3000:]
    log = read_log(node_logs(run_dir, job_id)[0])
    assert "resumed from step 4: " in log and "written by 2 ranks, on 1 (the global batch stays 8 rows" in log
    assert "data positions of 2 ranks x 1 reader dealt to 1 rank x 1 reader: the rest of the epoch, 64 samples" in log
    assert logged_steps(run_dir) == list(range(1, 13))
    ids = logged_sample_ids(run_dir)
    assert len(ids) == len(set(ids)) == 96
    assert json.loads((run_dir / "checkpoints" / "step_0000012" / "complete.json").read_text())["world_size"] == 1
