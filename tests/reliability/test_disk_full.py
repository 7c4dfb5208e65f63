"""The disk fills up during a save (the run directory on a small tmpfs): the save fails loudly,
leaves nothing behind, the previous checkpoint stays valid, and the run stops
(train.on_save_error=stop) or trains on (continue) as configured; with space again, it resumes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mmscale.training.checkpoint import checkpoint_dir, checkpoint_problem, checksum_problem
from tests.reliability.runs import demo_data, jsonl, run, train_command
from tests.reliability.trials import Trial, check, trials

# A tiny run's checkpoint takes ~2.1 MB: the first fits in 3 MB, the second does not.
SMALL, LARGE = "3m", "16m"
OVERRIDES = ("train.steps=6", "train.checkpoint_every=2", "train.log_every=1", "train.val_every=0",
             "data.num_workers=0")


def _mount(where: Path, size: str, remount: bool = False) -> None:
    options = f"remount,size={size}" if remount else f"size={size}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True, capture_output=True)


def can_mount(workdir: Path) -> bool:
    probe = workdir / "mount-probe"
    probe.mkdir(parents=True, exist_ok=True)
    try:
        _mount(probe, "1m")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return False
    subprocess.run(["umount", str(probe)], check=True)
    return True


def _trial(data: Path, disk: Path, mode: str) -> Trial:
    run_dir = disk / "run"
    log = disk.parent / f"{mode}.log"
    code = run(train_command(data, run_dir, *OVERRIDES, f"train.on_save_error={mode}"), log)
    text = log.read_text()
    folder = checkpoint_dir(run_dir)
    trained_to = max((r["step"] for r in jsonl(run_dir / "metrics.jsonl") if "loss" in r), default=0)
    what = f"disk full at the step-4 save, on_save_error={mode}"
    expected_stop = 4 if mode == "stop" else 6  # continue: trains on, then its last save fails too
    problems = []
    if code != 2 or "MiB free" not in text or "step_0000002, is intact" not in text:
        problems.append(f"exit {code} without naming the full disk and the intact checkpoint")
    if trained_to != expected_stop:
        problems.append(f"trained to step {trained_to}, expected {expected_stop}")
    said = [f"mmscale: run stopped: a checkpoint could not be saved after step {expected_stop}: "]
    if mode == "continue":
        said.append("mmscale: checkpoint failed, training goes on after step 4: ")
    if not all(line in text for line in said):
        problems.append(f"the log lacks the alert lines {said}")
    if any(folder.glob(".tmp-*")) or sorted(p.name for p in folder.glob("step_*")) != ["step_0000002"]:
        problems.append(f"left {sorted(p.name for p in folder.iterdir())}")
    if checkpoint_problem(folder / "step_0000002") or checksum_problem(folder / "step_0000002"):
        problems.append("step_0000002 is damaged")
    if problems:
        return Trial(False, what, "; ".join(problems))
    _mount(disk, LARGE, remount=True)  # space again: the same command resumes and finishes
    code = run(train_command(data, run_dir, *OVERRIDES, f"train.on_save_error={mode}"), disk.parent / "again.log")
    resumed = "resumed from step 2" in (disk.parent / "again.log").read_text()
    if code != 0 or not resumed:
        return Trial(False, what, f"with space again the run exited {code}, resumed from step 2: {resumed}")
    return Trial(True, what, f"steps 3-{trained_to} computed again after the resume")


def run_trials(n: int, workdir: Path, seed: int) -> list[Trial]:
    data = demo_data(workdir)
    results = []
    for trial in range(n):
        disk = workdir / f"trial{trial}" / "disk"
        disk.mkdir(parents=True)
        _mount(disk, SMALL)
        try:
            results.append(_trial(data, disk, ("stop", "continue")[(trial + seed) % 2]))
        finally:
            subprocess.run(["umount", str(disk)], check=True)
    return results


@pytest.mark.slow
@pytest.mark.reliability
def test_a_full_disk_fails_the_save_loudly_and_keeps_the_last_checkpoint(tmp_path):
    if not can_mount(tmp_path):
        pytest.skip("needs to mount a tmpfs (root with CAP_SYS_ADMIN), as on the CI machines")
    results = run_trials(max(2, trials(2)), tmp_path, seed=0)  # both modes
    check(results)
