"""`mmscale jobs`: a run's jobs, logs and progress, read from its run directory (no cluster needed)."""

from __future__ import annotations

import json

from mmscale.launch.jobs import FINAL_STATES, describe_jobs, node_logs, progress


def test_progress_names_the_latest_checkpoint_and_the_last_logged_step(tmp_path):
    assert progress(tmp_path) == "latest checkpoint: none; last logged step: none"
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_0000020\n")
    records = [{"step": 10, "loss": 2.0}, {"step": 20, "val_loss": 1.5}, {"step": 20, "loss": 1.0}, {"step": 20, "val_loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert progress(tmp_path) == "latest checkpoint: step_0000020; last logged step: 20"


def test_node_logs_come_in_node_order(tmp_path):
    folder = tmp_path / "slurm" / "7"
    folder.mkdir(parents=True)
    for node in (10, 2, 0, 1):
        (folder / f"7_{node}_log.out").touch()
    (folder / "7_submitted.pkl").touch()
    assert [p.name for p in node_logs(tmp_path, "7")] == ["7_0_log.out", "7_1_log.out", "7_2_log.out", "7_10_log.out"]


def test_a_run_without_jobs_says_so(tmp_path):
    assert describe_jobs(tmp_path).startswith(f"{tmp_path}: no jobs submitted with `mmscale submit`")


def test_a_requeued_job_is_not_final():
    assert {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"} <= FINAL_STATES
    assert not {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "UNKNOWN"} & FINAL_STATES
