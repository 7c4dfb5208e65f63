"""Crash-safe checkpoints (commit, keep-last-k, newest complete on resume), stop signals and the
save clock: real DeepSpeed on a world of one in-process, subprocesses where a process must die."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmscale.errors import UserError
from mmscale.training.checkpoint import (
    MARKER,
    checkpoint_dir,
    checkpoint_problem,
    checksum_problem,
    load_latest_checkpoint,
    newest_complete_checkpoint,
    save_checkpoint,
)
from mmscale.training.distributed import free_port
from mmscale.utils.files import crc32_of
from tests.helpers.checkpoints import SYNCING, fingerprint, tiny_engine
from tests.helpers.processes import subprocess_env, wait_for
from tests.helpers.recipes import RECIPE, REPO


def _tags(run_dir: Path) -> list[str]:
    """Checkpoints and leftovers (DeepSpeed also writes its conversion scripts next to them)."""
    folder = checkpoint_dir(run_dir)
    return sorted(p.name for p in [*folder.glob("step_*"), *folder.glob(".tmp-*")])


def _latest(run_dir: Path) -> str:
    return (checkpoint_dir(run_dir) / "latest").read_text()


@pytest.fixture(scope="module")
def engine(world_of_one):
    return tiny_engine(seed=0)


def _save_steps(engine, run_dir: Path, steps: range, keep: int = 0) -> None:
    eng, model = engine
    for step in steps:
        save_checkpoint(eng, run_dir, step, {"step": step, "fingerprint": fingerprint(model)}, keep=keep)


# ---- save ----------------------------------------------------------------------------------


def test_a_save_commits_a_complete_checkpoint_and_points_latest_at_it(engine, tmp_path):
    path = save_checkpoint(engine[0], tmp_path, 3, {"step": 3})
    assert path == checkpoint_dir(tmp_path) / "step_0000003"
    assert _tags(tmp_path) == ["step_0000003"]  # no .tmp- directory or file is left
    assert _latest(tmp_path) == "step_0000003"
    marker = json.loads((path / MARKER).read_text())
    assert marker["step"] == 3 and marker["world_size"] == 1
    shards = [p for p in path.rglob("*") if p.is_file() and p.name != MARKER]
    on_disk = {p.relative_to(path).as_posix(): p.stat().st_size for p in shards}
    assert marker["files"] == on_disk and "mp_rank_00_model_states.pt" in on_disk
    assert checkpoint_problem(path) is None
    assert marker["crc32"].keys() == on_disk.keys() and checksum_problem(path) is None

    # One byte changed in place: the size check cannot see it, the checksum names the file.
    states = path / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF
    states.write_bytes(bytes(data))
    assert checkpoint_problem(path) is None
    assert "mp_rank_00_model_states.pt with contents other than its save wrote" in checksum_problem(path)


def test_keep_last_k_deletes_the_oldest_complete_checkpoints_only(engine, tmp_path):
    broken = checkpoint_dir(tmp_path) / "step_0000000"
    broken.mkdir(parents=True)  # no marker: not counted, not deleted
    _save_steps(engine, tmp_path, range(1, 5), keep=2)
    assert _tags(tmp_path) == ["step_0000000", "step_0000003", "step_0000004"]
    assert _latest(tmp_path) == "step_0000004"
    _save_steps(engine, tmp_path, range(5, 7), keep=0)  # 0 keeps all
    assert _tags(tmp_path) == ["step_0000000", "step_0000003", "step_0000004", "step_0000005", "step_0000006"]


def test_keep_never_deletes_the_checkpoint_just_written(engine, tmp_path):
    # A run resumed from step 2 after its step-4 checkpoint went missing saves step 3 (older
    # than the abandoned step 4): with keep=1 that is the one kept.
    _save_steps(engine, tmp_path, [2, 4])
    _save_steps(engine, tmp_path, [3], keep=1)
    assert _tags(tmp_path) == ["step_0000003"] and _latest(tmp_path) == "step_0000003"


def test_saving_a_step_again_replaces_its_checkpoint(engine, tmp_path):
    eng, _ = engine
    save_checkpoint(eng, tmp_path, 5, {"step": 5, "run": "first"})
    save_checkpoint(eng, tmp_path, 5, {"step": 5, "run": "second"})
    restored = load_latest_checkpoint(eng, tmp_path)
    assert restored.client_state["run"] == "second"
    assert _tags(tmp_path) == ["step_0000005"]


# ---- resume --------------------------------------------------------------------------------


def test_resume_restores_weights_and_state_of_the_newest_checkpoint(world_of_one, tmp_path):
    saver, saved_model = tiny_engine(seed=1)
    _save_steps((saver, saved_model), tmp_path, [1, 2])
    loader, model = tiny_engine(seed=2)
    assert fingerprint(model) != fingerprint(saved_model)
    restored = load_latest_checkpoint(loader, tmp_path)
    assert restored.path == checkpoint_dir(tmp_path) / "step_0000002"
    assert restored.client_state["step"] == 2
    assert fingerprint(model) == restored.client_state["fingerprint"] == fingerprint(saved_model)


def test_a_run_without_checkpoints_starts_fresh(engine, tmp_path):
    assert load_latest_checkpoint(engine[0], tmp_path) is None


def test_latest_naming_a_missing_or_broken_checkpoint_falls_back_with_a_warning(engine, tmp_path, caplog):
    _save_steps(engine, tmp_path, range(1, 4))
    folder = checkpoint_dir(tmp_path)
    for file in (folder / "step_0000003").iterdir():
        file.unlink()
    (folder / "step_0000003").rmdir()
    shard = folder / "step_0000002" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated: the marker's size no longer fits
    with caplog.at_level(logging.WARNING, logger="mmscale.training.checkpoint"):
        restored = load_latest_checkpoint(engine[0], tmp_path)
    assert restored.path.name == "step_0000001" and restored.client_state["step"] == 1
    assert "names step_0000003, which does not exist" in caplog.text
    assert f"skipping checkpoint {folder / 'step_0000002'}: it has mp_rank_00_model_states.pt of" in caplog.text
    (folder / "latest").unlink()  # no `latest` at all: the scan alone finds it
    assert newest_complete_checkpoint(tmp_path).name == "step_0000001"


def test_latest_pointing_at_an_earlier_checkpoint_rolls_the_run_back(engine, tmp_path):
    _save_steps(engine, tmp_path, range(1, 4))
    (checkpoint_dir(tmp_path) / "latest").write_text("step_0000001")
    assert load_latest_checkpoint(engine[0], tmp_path).client_state["step"] == 1


def test_a_leftover_tmp_directory_is_ignored_by_resume_and_removed_by_the_next_save(engine, tmp_path):
    _save_steps(engine, tmp_path, [1, 2])
    folder = checkpoint_dir(tmp_path)
    # Even a leftover that got as far as its marker (killed just before the rename) is not used.
    (folder / "step_0000002").rename(folder / ".tmp-step_0000009")
    (folder / ".tmp-latest").write_text("step_00")
    assert load_latest_checkpoint(engine[0], tmp_path).path.name == "step_0000001"
    assert (folder / ".tmp-step_0000009").is_dir()  # resume only reads
    _save_steps(engine, tmp_path, [3])
    assert _tags(tmp_path) == ["step_0000001", "step_0000003"]


def test_checkpoints_that_are_all_broken_stop_the_run_instead_of_restarting_it(engine, tmp_path):
    _save_steps(engine, tmp_path, [1])
    (checkpoint_dir(tmp_path) / "step_0000001" / MARKER).unlink()
    with pytest.raises(UserError, match="holds no complete checkpoint"):
        load_latest_checkpoint(engine[0], tmp_path)


def test_a_checkpoint_that_cannot_be_resharded_is_refused_naming_the_fix(engine, tmp_path):
    """The conversion for another number of ranks fails: every rank hears why, through the attempt's
    outcome file, and the converter's partial output is gone."""
    from mmscale.training.checkpoint import _load_resharded

    path = save_checkpoint(engine[0], tmp_path, 1, {"step": 1})
    for shard in path.glob("*optim_states.pt"):
        shard.unlink()  # nothing left for the converter to convert
    with pytest.raises(UserError, match=r"ds_to_universal failed on .*step_0000001 \(FileNotFoundError: can't find "
                                        r"\*_optim_states.pt .*\); resume on the number of ranks that wrote the checkpoint"):
        _load_resharded(engine[0], path, lambda *args: None)
    leftover = checkpoint_dir(tmp_path) / ".tmp-universal-step_0000001"
    assert [p.name.split("-")[0] for p in leftover.iterdir()] == ["outcome"]


def test_a_complete_checkpoint_that_cannot_be_loaded_is_a_user_error(engine, tmp_path):
    """Its bytes are those its save wrote (say, by a DeepSpeed this one cannot read), yet it does not load."""
    path = save_checkpoint(engine[0], tmp_path, 1, {"step": 1})
    shard = path / "mp_rank_00_model_states.pt"
    shard.write_bytes(b"\0" * shard.stat().st_size)
    marker = json.loads((path / MARKER).read_text())
    marker["crc32"][shard.name] = crc32_of(shard)
    (path / MARKER).write_text(json.dumps(marker))
    with pytest.raises(UserError, match=f"checkpoint {path} is complete but cannot be loaded"):
        load_latest_checkpoint(engine[0], tmp_path)


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_byte_flipped_in_any_file_is_refused_on_resume_naming_the_fallback(engine, tmp_path, name):
    _save_steps(engine, tmp_path, [1, 2])
    shard = checkpoint_dir(tmp_path) / "step_0000002" / name
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # the same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"step_0000002 has {name} with contents other than its save wrote.*"
                                        r"resume from it with `echo step_0000001 > \S+latest`"):
        load_latest_checkpoint(engine[0], tmp_path)


def test_after_a_rollback_the_kept_checkpoints_are_the_new_lineage(engine, tmp_path):
    _save_steps(engine, tmp_path, [2, 4, 6], keep=3)
    (checkpoint_dir(tmp_path) / "latest").write_text("step_0000002")  # roll back to step 2
    assert load_latest_checkpoint(engine[0], tmp_path).path.name == "step_0000002"
    _save_steps(engine, tmp_path, [3], keep=3)  # the branch of steps 4 and 6 is abandoned
    assert _tags(tmp_path) == ["step_0000002", "step_0000003"]
    _save_steps(engine, tmp_path, [5, 7], keep=2)
    assert _tags(tmp_path) == ["step_0000005", "step_0000007"]
    parents = [json.loads((checkpoint_dir(tmp_path) / t / MARKER).read_text())["parent"] for t in _tags(tmp_path)]
    assert parents == ["step_0000003", "step_0000005"]


def test_a_damaged_ancestor_does_not_cut_the_lineage_short(engine, tmp_path):
    _save_steps(engine, tmp_path, [1, 2, 3], keep=3)
    shard = checkpoint_dir(tmp_path) / "step_0000002" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:-1])  # broken: left for a person, not counted, not deleted
    _save_steps(engine, tmp_path, [4], keep=3)
    assert _tags(tmp_path) == ["step_0000001", "step_0000002", "step_0000003", "step_0000004"]
    _save_steps(engine, tmp_path, [5], keep=3)
    assert _tags(tmp_path) == ["step_0000002", "step_0000003", "step_0000004", "step_0000005"]


def test_resuming_from_another_checkpoint_than_latest_names_points_latest_at_it(engine, tmp_path):
    _save_steps(engine, tmp_path, [1, 2])
    (checkpoint_dir(tmp_path) / "step_0000002" / MARKER).unlink()  # a save cut short: resume takes step 1
    assert load_latest_checkpoint(engine[0], tmp_path).path.name == "step_0000001"
    assert _latest(tmp_path) == "step_0000001"


# ---- a process killed mid-save (acceptance) ------------------------------------------------

# Saves step 1, then step 2, and stops (signalling "BLOCKED" on stdout) at the point under
# test for the parent to SIGKILL it: while torch.save writes the client state of step 2 into
# the .tmp- directory, or after every shard and the marker are written, just before the rename.
SAVER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from mmscale.training import checkpoint, init_distributed
    from tests.helpers.checkpoints import fingerprint, tiny_engine

    def block(*args):
        print("BLOCKED", flush=True)
        time.sleep(600)

    class BlocksWhilePickled:
        def __reduce__(self):
            block()

    run_dir, where = Path(sys.argv[1]), sys.argv[2]
    init_distributed(timeout_s=60)
    engine, model = tiny_engine(seed=1)
    checkpoint.save_checkpoint(engine, run_dir, 1, {"step": 1, "fingerprint": fingerprint(model)})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    state = {"step": 2, "fingerprint": fingerprint(model)}
    if where == "writing":
        state["blocker"] = BlocksWhilePickled()
    else:
        checkpoint.os.rename = block  # Path.rename, the commit's one rename, goes through it
    checkpoint.save_checkpoint(engine, run_dir, 2, state)
    """
)


@pytest.mark.parametrize("where", ["writing", "committing"])
def test_a_process_killed_mid_save_leaves_the_previous_checkpoint_loadable(world_of_one, tmp_path, where):
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path), where], cwd=REPO, env=subprocess_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while line.strip() != "BLOCKED" and saver.poll() is None:
            line = saver.stdout.readline()
        assert line.strip() == "BLOCKED", saver.stderr.read()[-3000:]
        saver.send_signal(signal.SIGKILL)
    finally:
        saver.kill()
        saver.wait()
    folder = checkpoint_dir(tmp_path)
    half = folder / ".tmp-step_0000002"
    assert half.is_dir() and not (folder / "step_0000002").exists()
    assert (half / MARKER).exists() == (where == "committing")
    assert _latest(tmp_path) == "step_0000001"

    engine, model = tiny_engine(seed=2)
    restored = load_latest_checkpoint(engine, tmp_path)
    assert restored.path == folder / "step_0000001" and restored.client_state["step"] == 1
    assert fingerprint(model) == restored.client_state["fingerprint"]  # step 1's weights, not step 2's
    save_checkpoint(engine, tmp_path, 2, {"step": 2})
    assert _tags(tmp_path) == ["step_0000001", "step_0000002"]


# ---- agreeing on a stop, and the clock ------------------------------------------------------------


# Two gloo ranks: rank 1 alone has the flag; then rank 1 alone, then rank 0 alone, has an
# expired clock. Each rank prints what it was told.
AGREEING = textwrap.dedent(
    """
    import os
    import torch.distributed as dist
    from mmscale.training.signals import SaveClock, agree

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    answers = [agree(rank == 1, "cpu"), agree(False, "cpu")]
    clock = SaveClock(minutes=60, device="cpu")
    answers.append(clock.due())
    for expired_on in (1, 0):
        clock.restart()
        if rank == expired_on:
            clock.started -= 3601
        answers.append(clock.due())
    answers.append(SaveClock(minutes=0, device="cpu").due())
    print("ANSWERS", answers, flush=True)
    dist.destroy_process_group()
    """
)


def test_ranks_agree_on_stopping_and_rank_0s_clock_decides_when_to_save():
    env = dict(subprocess_env(), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    ranks = [subprocess.Popen([sys.executable, "-c", AGREEING], cwd=REPO, env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    for rank, (out, err) in zip(ranks, outputs):
        assert rank.returncode == 0, err[-3000:]
        # flag on rank 1 only -> all stop; no flag -> none; clock fresh -> no; expired on
        # rank 1 only -> no; expired on rank 0 -> yes; off -> no.
        assert out.split("ANSWERS ")[1].strip() == "[True, False, False, False, True, False]"


# ---- the trainer stops on SIGTERM and resumes (needs the trainer integration) --------------


def _launch(command: list[str], log: Path) -> subprocess.Popen:
    # A session of its own, so the signal can go to the whole process group as SLURM sends it,
    # data loader workers included.
    return subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _train_records(run_dir: Path) -> list[dict]:
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return [r for r in map(json.loads, lines) if "loss" in r]


def _stop_when(proc: subprocess.Popen, condition, log: Path) -> None:
    """SIGTERM the run once `condition` holds; it must then exit 0. A failed test leaves no run behind."""
    try:
        assert wait_for(lambda: condition() or proc.poll() is not None, seconds=120), log.read_text()[-3000:]
        assert proc.poll() is None, log.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_sigterm_saves_a_checkpoint_exits_0_and_the_restart_resumes_there(tiny_overrides, tmp_path):
    run_dir = Path(tiny_overrides[-1].split("=", 1)[1])
    # Far more steps than will run; checkpoints only by the clock (every 0.3 s) and on the signal, one kept.
    command = [sys.executable, "-m", "mmscale", "train", RECIPE, *tiny_overrides, "train.steps=100000",
               "train.checkpoint_every=0", "train.checkpoint_every_minutes=0.005", "train.checkpoint_keep=1",
               "train.val_every=0", "data.num_workers=2"]
    first_log = tmp_path / "first.log"
    # Stopped once the clock has saved: the signal's checkpoint is then at least the second.
    _stop_when(_launch(command, first_log), lambda: ": checkpoint " in first_log.read_text(), first_log)
    saves = [int(step) for step in re.findall(r"step (\d+): checkpoint ", first_log.read_text())]
    stopped_at = _train_records(run_dir)[-1]["step"]  # saving closes the logging window
    assert len(saves) >= 2 and saves[-1] == stopped_at
    tag = f"step_{stopped_at:07d}"
    assert _tags(run_dir) == [tag] and _latest(run_dir) == tag
    assert checkpoint_problem(checkpoint_dir(run_dir) / tag) is None

    before = len(_train_records(run_dir))
    second_log = tmp_path / "second.log"
    _stop_when(_launch(command, second_log), lambda: len(_train_records(run_dir)) > before, second_log)
    assert f"resumed from step {stopped_at}" in second_log.read_text()
    resumed = _train_records(run_dir)[before:]
    assert resumed[0]["step"] > stopped_at
    assert _latest(run_dir) == f"step_{resumed[-1]['step']:07d}"


@pytest.mark.parametrize("stage", [2, 3])
def test_each_rank_makes_the_files_it_wrote_durable(tmp_path, stage):
    """On a shared file system only the host that wrote a file can make it durable: each rank
    fsyncs its own ZeRO partitions, rank 0 the rest, the marker and the directories."""
    env = dict(subprocess_env(), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    ranks = [subprocess.Popen([sys.executable, "-c", SYNCING, str(tmp_path), str(stage)], cwd=REPO,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    synced = []
    for rank, (out, err) in zip(ranks, outputs):
        assert rank.returncode == 0, err[-3000:]
        synced.append({Path(p).name for p in json.loads(out.split("SYNCED ")[1])})
    written = {p.name for p in (checkpoint_dir(tmp_path) / "step_0000001").iterdir()}
    shards = {0: {n for n in written if "zero_pp_rank_0_" in n}, 1: {n for n in written if "zero_pp_rank_1_" in n}}
    assert shards[0] and shards[1]
    assert shards[1] <= synced[1] and not shards[0] & synced[1]
    assert written - shards[1] <= synced[0] and not shards[1] & synced[0]  # the marker and rank 0's files
