"""slurm/train.sbatch on the local two-node cluster: training to the end, stopping and coming back."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.helpers.slurm import (
    STEPS,
    assert_resumed_exactly,
    job_overrides,
    read_log,
    sbatch,
    starts,
    training_records,
    wait_for_state,
    wait_for_step,
    wait_until_ended,
    wandb_run_ids,
)

pytestmark = pytest.mark.slurm


def test_the_template_trains_the_demo_on_two_nodes_to_the_end(reference_run):
    log = read_log(reference_run.log)
    assert reference_run.state == "COMPLETED", log[-3000:]
    assert starts(reference_run.job_id) == ["COMPLETED"]
    # One torchrun per node; both nodes' ranks met at the first host, on the port of the job id.
    port = 15000 + int(reference_run.job_id) % 15000
    assert f"job {reference_run.job_id} start 1 on node[1-2] (torchrun), rendezvous node1:{port}" in log
    records = training_records(reference_run.run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[-1]["loss"] < records[0]["loss"]
    step = reference_run.run_dir / "checkpoints" / f"step_{STEPS:07d}"
    assert sorted(p.name for p in step.glob("*optim_states.pt")) == [  # ZeRO-2: one shard per rank
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert f"job {reference_run.job_id} start 1 ended with status 0" in log


@pytest.mark.parametrize(
    "stop, wandb",
    [
        # Preemption as `scontrol requeue` does it: SIGTERM to every process; SLURM requeues the job.
        # SIGTERM also ends W&B's service process; the tracker then goes on without W&B, and the
        # resumed start opens the same W&B run again.
        (["scontrol", "requeue"], True),
        # The time-limit notice of --signal=B:USR2@90: the batch shell passes it on and requeues the job.
        (["scancel", "--batch", "--signal=USR2"], True),
    ],
    ids=["scontrol-requeue", "usr2-notice"],
)
def test_a_stopped_job_comes_back_and_resumes_where_it_stopped(
    reference_run, demo_data, job_env, tmp_path, stop, wandb
):
    run_dir = tmp_path / "run"
    overrides = [*job_overrides(demo_data, run_dir), f"run.wandb.enabled={str(wandb).lower()}"]
    job_id, log_path = sbatch(overrides, job_env, tmp_path / "logs")
    wait_for_step(run_dir, 3, job_id)
    subprocess.run([*stop, job_id], check=True, timeout=30)
    state = wait_until_ended(job_id)
    log = read_log(log_path)
    assert state == "COMPLETED", log[-3000:]
    assert starts(job_id) == ["REQUEUED", "COMPLETED"]
    assert f"job {job_id} start 2 on node[1-2]" in log  # SLURM_RESTART_COUNT=1
    (resumed,) = assert_resumed_exactly(run_dir, log, training_records(reference_run.run_dir))
    assert re.search(rf"step {resumed}: stopped by a signal, checkpoint committed [0-9.]+ s after", log)
    if wandb:  # both starts wrote to one W&B run: the id saved in the run directory
        assert wandb_run_ids(run_dir) == [(run_dir / "wandb_id").read_text().strip()] * 2


def test_one_task_per_rank_reads_its_rank_from_slurm(slurm_cluster, demo_data, job_env, tmp_path):
    """MMSCALE_LAUNCH=srun: no torchrun, `mmscale train` in each task finds its rank and peers itself."""
    run_dir = tmp_path / "run"
    job_env["MMSCALE_LAUNCH"] = "srun"
    job_id, log_path = sbatch(job_overrides(demo_data, run_dir, steps=6, checkpoint_every=3), job_env, tmp_path / "logs")
    state = wait_until_ended(job_id)
    log = read_log(log_path)
    assert state == "COMPLETED", log[-3000:]
    assert [r["step"] for r in training_records(run_dir)] == list(range(1, 7))
    assert "global batch 4 x 1 accumulation x 2 ranks" in log
    assert len(list((run_dir / "checkpoints" / "step_0000006").glob("*optim_states.pt"))) == 2


def test_a_requeue_onto_one_node_resumes_elastically(slurm_cluster, demo_data, job_env, tmp_path):
    """Preempted and held (`scontrol requeuehold`), given one node instead of two and released:
    the second start resumes the 2-rank checkpoint its ranks saved on the signal, on 1 rank
    (the global batch of 8 rows kept by accumulation), and every step is logged once."""
    run_dir = tmp_path / "run"
    overrides = [*job_overrides(demo_data, run_dir, steps=12), "train.global_batch_size=8"]
    job_id, log_path = sbatch(overrides, job_env, tmp_path / "logs")
    wait_for_step(run_dir, 3, job_id)
    subprocess.run(["scontrol", "requeuehold", job_id], check=True, timeout=30)
    wait_for_state(job_id, "PENDING")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "NumNodes=1-1", "NumTasks=1"], check=True, timeout=30)
    subprocess.run(["scontrol", "release", job_id], check=True, timeout=30)
    state = wait_until_ended(job_id)
    log = read_log(log_path)
    assert state == "COMPLETED", log[-3000:]
    assert re.search(rf"job {job_id} start 2 on node[12] \(torchrun\)", log)
    assert re.search(r"resumed from step \d+: .*, written by 2 ranks, on 1 \(the global batch stays 8 rows", log)
    assert [r["step"] for r in training_records(run_dir)] == list(range(1, 13))
