"""End-to-end runs of the demo recipe through the real CLI, DeepSpeed and gloo: no mocks."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from mmscale.config import load_recipe
from mmscale.monitor.predictions import COLUMNS
from mmscale.monitor.timeline import read_attempts
from mmscale.training.distributed import free_port
from tests.helpers.outputs import logged_metrics
from tests.helpers.processes import run_command
from tests.helpers.recipes import CROSS_ATTENTION_OVERRIDES, RECIPE, REPO, tiny_with
from tests.helpers.wandb_log import history as _history
from tests.helpers.wandb_log import offline_runs as _offline_runs
from tests.helpers.wandb_log import records as _records
from tests.helpers.wandb_log import summary as _summary

CROSS_RECIPE = str(REPO / "recipes" / "demo_cross_attention.yaml")


def test_single_process_run_trains_validates_checkpoints_and_resumes(tiny_overrides):
    run_dir = Path(tiny_overrides[-1].split("=", 1)[1])
    command = [sys.executable, "-m", "mmscale", "train", RECIPE, *tiny_overrides, "train.steps=12", "data.num_workers=2"]
    proc = run_command(command, MMSCALE_STOP_LEAD_S="5")  # as a job whose --signal lead is 5 s
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "warning: this job's stop signal comes 5 s before its time limit, and a stop needs about 90 s" in out
    assert "attention (float32 on cpu): LLM self-attention SDPA; vision tower SDPA;" in out
    train, val = logged_metrics(run_dir)
    # Logged every 2 steps, and whenever validation or a checkpoint (every 3) closes the window.
    assert [r["step"] for r in train] == [2, 3, 4, 6, 8, 9, 10, 12]
    seen = [r["tokens_seen"] for r in train]
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert all(r["tokens_per_s"] > 0 and r["loss_tokens_per_s"] > 0 and 0 < r["fill"] < 1 for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    assert [r["step"] for r in val] == [3, 6, 9, 12]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_0000012"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_0000003", "step_0000006", "step_0000009", "step_0000012"]
    assert (run_dir / "recipe.yaml").is_file()

    # Running the same command again finds the finished run and does nothing.
    again = run_command(command)
    assert again.returncode == 0
    assert "already finished at step 12" in again.stdout + again.stderr

    # Cut the run back to its step-6 checkpoint and start it again: it resumes there, with
    # weights, optimizer, schedule and both loader workers' data positions restored, so
    # steps 7-12 give exactly the losses of the uninterrupted run. (A key that does not
    # change the computation, like the collective timeout or W&B settings, may differ.)
    for tag in ("step_0000009", "step_0000012"):
        shutil.rmtree(checkpoints / tag)
    (checkpoints / "latest").write_text("step_0000006")
    resumed = run_command([*command, "train.dist_timeout_s=300", "run.wandb.project=elsewhere"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 6" in resumed.stdout + resumed.stderr
    # metrics.jsonl holds every step once: the first start's records after step 6 moved aside.
    records, _ = logged_metrics(run_dir)
    keys = ("step", "loss", "lr", "tokens_seen")
    assert [[r[k] for k in keys] for r in records] == [[r[k] for k in keys] for r in train]
    replaced = [json.loads(line) for line in (run_dir / "metrics.replaced.jsonl").read_text().splitlines()]
    assert [r["step"] for r in replaced if "loss" in r] == [8, 9, 10, 12]
    assert (checkpoints / "latest").read_text().strip() == "step_0000012"

    # A different recipe must not write into this run directory.
    other = run_command([*command, "train.lr=0.5"])
    assert other.returncode == 2
    assert "different recipe (differs in train.lr)" in other.stderr

    # A longer run may: it resumes where it ended, and the decay stretches over the new length.
    longer = run_command([*command, "train.steps=14", "train.log_every=1"])
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "train.steps 12 -> 14" in longer.stderr and "resumed from step 12" in longer.stdout + longer.stderr
    records, _ = logged_metrics(run_dir)
    assert [r["step"] for r in records] == [2, 3, 4, 6, 8, 9, 10, 12, 13, 14]
    assert records[-2]["lr"] > records[-3]["lr"]  # step 12 ended the old decay; step 13 is 13/14 of the new
    assert load_recipe(run_dir / "recipe.yaml").train.steps == 14


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["decoder", "cross_attention"])
def test_two_ranks_under_torchrun_with_zero2(tiny_overrides, arch):
    run_dir = Path(tiny_overrides[-1].split("=", 1)[1])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    # The decoder run fixes its global batch: 16 rows = 4 per rank x 2 ranks x 2 accumulated.
    recipe, extra = (RECIPE, ["train.global_batch_size=16"]) if arch == "decoder" else (
        CROSS_RECIPE, CROSS_ATTENTION_OVERRIDES)
    proc = run_command([*torchrun, "-m", "mmscale", "train", recipe, *tiny_with(tiny_overrides, extra),
                        "train.zero_stage=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_recipe(run_dir / "recipe.yaml").train.grad_accum == (2 if arch == "decoder" else 1)
    train, val = logged_metrics(run_dir)
    assert [r["step"] for r in train] == [2, 3, 4, 6]
    assert train[-1]["loss"] < train[0]["loss"]
    assert len(val) == 2
    step = run_dir / "checkpoints" / "step_0000006"
    # ZeRO-2 partitions the optimizer state: one shard per rank.
    assert sorted(p.name for p in step.glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000006"


# What a CPU machine refuses; a GPU machine may well run it.
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU machine's refusal")


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr_warmup=3", "unknown key 'train.lr_warmup'"),
        ("data.train={tmp}/missing", "data.train: {tmp}/missing does not exist"),
        ("data.val={tmp}/empty", "data.val: folder {tmp}/empty holds no .tar shards"),
        ("data.tokenizer={tmp}/empty", "tokenizer folder {tmp}/empty has no tokenizer_config.json"),
        ("data.num_workers=8", "data.train: 4 shards for 1 ranks x 8 workers; every reader needs a shard"),
        ("model.attention=flash3", "'model.attention': Input should be 'auto', 'flash2', 'flash4', "
                                   "'torch_varlen', 'flex' or 'sdpa' (got 'flash3')"),
        pytest.param("model.attention=flash4", "model.attention=flash4 cannot train here: flash-attn 4 is not installed",
                     marks=CPU_ONLY),
        pytest.param("model.attention=flex", "model.attention=flex cannot train here: FlexAttention has no backward "
                     "pass on CPU", marks=CPU_ONLY),
    ],
)
def test_bad_input_stops_before_training(tiny_overrides, tmp_path, override, message):
    (tmp_path / "empty").mkdir()
    proc = run_command([sys.executable, "-m", "mmscale", "train", RECIPE, *tiny_overrides,
                        override.format(tmp=tmp_path)])
    assert proc.returncode == 2
    assert message.format(tmp=tmp_path) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.parametrize(
    "strict, message",
    [
        ("true", r"error: shard {shards}/demo-train-00000\d.tar cannot be read as a tar file"),
        ("false", r"error: data.train: rank 0 reader \d read no sample in a whole epoch"),
    ],
)
def test_unreadable_shards_read_by_workers_stop_with_a_named_error(tiny_overrides, demo_data, tmp_path, strict, message):
    shards = tmp_path / "shards"
    shutil.copytree(demo_data / "train", shards)
    for shard in shards.glob("*.tar"):
        shard.write_bytes(b"this is not a tar file" * 100)
    proc = run_command([sys.executable, "-m", "mmscale", "train", RECIPE, *tiny_overrides, f"data.train={shards}",
                 "data.num_workers=2", f"data.strict={strict}"])
    assert proc.returncode == 2
    assert re.search(message.format(shards=shards), proc.stderr), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))  # no checkpoint of a failed run


def test_a_bad_shard_is_skipped_counted_and_training_goes_on(tiny_overrides, demo_data, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(demo_data / "train", shards)
    sorted(shards.glob("*.tar"))[1].write_bytes(b"this is not a tar file" * 100)
    # 30 steps of 4 samples read every shard at least once (72 readable samples per epoch).
    proc = run_command([sys.executable, "-m", "mmscale", "train", RECIPE, *tiny_overrides, f"data.train={shards}",
                 "train.steps=30", "train.log_every=10", "train.val_every=0", "train.checkpoint_every=0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    train, _ = logged_metrics(Path(tiny_overrides[-1].split("=", 1)[1]))
    assert train[-1]["step"] == 30
    assert train[-1]["skipped"] == {"unreadable_shard": 1}
    assert "skipped 1 unreadable_shard" in proc.stderr


def test_packed_run_fills_its_rows(tiny_overrides):
    run_dir = Path(tiny_overrides[-1].split("=", 1)[1])
    proc = run_command([sys.executable, "-m", "mmscale", "train", RECIPE, *tiny_overrides, "data.pack=true",
                 "data.pack_len=256", "data.pack_block=32", "train.micro_batch_size=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    train, val = logged_metrics(run_dir)
    assert [r["step"] for r in train] == [2, 3, 4, 6] and len(val) == 2
    assert all(r["fill"] >= 0.9 for r in train), [r["fill"] for r in train]
    assert train[-1]["loss"] < train[0]["loss"]


@pytest.mark.parametrize("trainable", ["full", "adapter"])
def test_cross_attention_model_trains_packed_in_one_process(tiny_overrides, trainable):
    run_dir = Path(tiny_overrides[-1].split("=", 1)[1])
    overrides = tiny_with(tiny_overrides, CROSS_ATTENTION_OVERRIDES)
    proc = run_command([sys.executable, "-m", "mmscale", "train", CROSS_RECIPE, *overrides,
                 "data.pack=true", "data.pack_len=192", "train.micro_batch_size=2", "train.steps=8",
                 f"train.trainable={trainable}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()
             if line.split() and line.split()[0] in ("vision_tower", "connector", "llm", "cross_attention")}
    assert set(table) == {"vision_tower", "connector", "llm", "cross_attention"}
    # The adapter stage (Llama 3.2 Vision's) keeps the LLM frozen: "-" trainable, its size frozen.
    assert (table["llm"][0] == "-") == (trainable == "adapter") and table["cross_attention"][1] == "-"
    train, val = logged_metrics(run_dir)
    # On the same validation batches each time: the adapter's training loss (its gates start at 0)
    # moves less over 8 steps than from one batch to the next.
    assert len(val) >= 2 and val[-1]["val_loss"] < val[0]["val_loss"]
    assert all(r["samples_seen"] > 2 * r["step"] for r in train)  # rows carry several samples each
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000008"


# Every metric a training record carries (issue 5's list, issue 23's vision health and time accounting);
# mfu is null where the peak is unknown (CPU).
METRIC_KEYS = {
    "step", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "loss_tokens_per_s", "fill", "tflops_per_s",
    "mfu", "data_wait", "samples_seen", "tokens_seen", "peak_mem_gb", "skipped_steps", "skipped",
    "image_tokens_per_step", "text_only", "connector_norm", "goodput", "rank_hours",
}


def test_metrics_reach_the_jsonl_file_and_an_offline_wandb_run(tiny_overrides, tmp_path):
    run_dir = Path(tiny_overrides[-1].split("=", 1)[1])
    home = {name: str(tmp_path / "wandb_home" / name.lower())
            for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")}
    proc = run_command([sys.executable, "-m", "mmscale", "train", RECIPE, *tiny_overrides, "run.wandb.enabled=true",
                 "run.wandb.tags=[e2e]", "train.eval_every=3", "train.eval_samples=8", "train.eval_table_rows=4"],
                WANDB_SILENT="true", WANDB_MODE="offline", **home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train, val = logged_metrics(run_dir)
    assert all(set(r) == METRIC_KEYS for r in train), [sorted(set(r) ^ METRIC_KEYS) for r in train]
    assert all(r["grad_norm"] > 0 and 0 <= r["data_wait"] < 1 and r["peak_mem_gb"] > 0 for r in train)
    assert all(r["tflops_per_s"] > 0 and r["mfu"] is None and r["skipped_steps"] == 0 for r in train)
    # Every demo sample has one 32-px image of 4 x 4 patches: 16 image tokens per sample, 4 samples a step.
    assert all(r["image_tokens_per_step"] == 64 and r["text_only"] == 0 and r["connector_norm"] > 0 for r in train)
    # Goodput counts the steps a checkpoint holds: none before the first (a record comes before its step's save).
    assert [r["goodput"] > 0 for r in train] == [r["step"] > 3 for r in train]
    assert all(r["goodput"] < 1 and r["rank_hours"]["build"] > 0 for r in train)
    # Read back with W&B's own reader of its transaction log.
    (wandb_file,) = _offline_runs(run_dir)
    rows = _history(wandb_file)
    assert [row["loss"] for row in rows if "loss" in row] == pytest.approx([r["loss"] for r in train])
    assert [row["val_loss"] for row in rows if "val_loss" in row] == pytest.approx([r["val_loss"] for r in val])
    assert [row["goodput"] for row in rows if "goodput" in row] == pytest.approx([r["goodput"] for r in train])
    assert all(f"rank_hours/{phase}" in rows[0] for phase in ("startup", "build", "train_kept", "train_lost", "save"))
    summary = _summary(wandb_file)
    assert summary["run_id"] == (run_dir / "wandb_id").read_text().strip() and summary["tags"] == ["e2e"]
    assert summary["config"]["model"]["llm"]["hidden_size"] == 64 and summary["state"] == "finished"
    assert summary["summary"]["ended"] == "finished" and 0 < summary["summary"]["goodput"] < 1
    assert summary["summary"]["rank_hours/train_lost"] == 0 < summary["summary"]["rank_hours/train_kept"]
    _assert_predictions_tables(run_dir, wandb_file, rows, steps=[3, 6], size=4)


def _assert_predictions_tables(run_dir: Path, wandb_file: Path, rows: list[dict], steps: list[int], size: int) -> None:
    """Each eval's table in W&B (images inline) equals its rows in RUN_DIR/predictions.jsonl."""
    local = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in local] == [s for s in steps for _ in range(size)]
    assert all((run_dir / r["image"]).read_bytes().startswith(b"\x89PNG") for r in local)
    assert [r["id"] for r in local[:size]] == [r["id"] for r in local[-size:]]  # the same questions every eval
    tables = [row for row in rows if "eval/predictions" in row or "eval/predictions._type" in row]
    assert [row["step"] for row in tables] == steps
    assert all(row["eval/predictions._type"] == "table-file" and row["eval/predictions.nrows"] == size
               for row in tables)
    # W&B keeps each table and its images as an artifact whose files it stages until `wandb sync`.
    artifacts = [a for a in _records(wandb_file, "artifact")
                 if any(c["path"] == "eval/predictions.table.json" for c in a["manifest"]["contents"])]
    assert len(artifacts) == len(steps)
    for step, artifact in zip(steps, artifacts):
        files = {c["path"]: Path(c["local_path"]) for c in artifact["manifest"]["contents"]}
        table = json.loads(files["eval/predictions.table.json"].read_text())
        assert table["columns"] == list(COLUMNS)
        assert [dict(zip(COLUMNS, data)) | {"image": None} for data in table["data"]] == [
            r | {"image": None} for r in local if r["step"] == step]
        for data in table["data"]:
            image = data[COLUMNS.index("image")]
            assert image["_type"] == "image-file" and files[image["path"]].read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_resume_gives_the_uninterrupted_losses(tiny_overrides, stage):
    """Stopped after step 6 (its checkpoint) and resumed on 2 ranks: steps 7-10 repeat exactly,
    with ZeRO-2's and ZeRO-3's partitioned optimizer (and, for 3, parameter) states."""
    run_dir = Path(tiny_overrides[-1].split("=", 1)[1])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    command = [*torchrun, "-m", "mmscale", "train", RECIPE, *tiny_overrides, f"train.zero_stage={stage}",
               "train.steps=10", "train.log_every=1", "train.val_every=0", "train.checkpoint_every=6"]
    first = run_command(command)
    assert first.returncode == 0, first.stderr[-3000:]
    train, _ = logged_metrics(run_dir)
    checkpoints = run_dir / "checkpoints"
    shutil.rmtree(checkpoints / "step_0000010")
    (checkpoints / "latest").write_text("step_0000006")
    command[command.index("--master_port") + 1] = str(free_port())
    resumed = run_command(command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 6" in resumed.stdout + resumed.stderr
    records = logged_metrics(run_dir)[0]
    assert [r["step"] for r in records] == list(range(1, 11))  # each step once
    after = records[6:]
    expected = [r for r in train if r["step"] > 6]
    assert [r["step"] for r in after] == [r["step"] for r in expected] == [7, 8, 9, 10]
    for got, want in zip(after, expected):
        assert (got["loss"], got["lr"], got["grad_norm"], got["tokens_seen"]) == (
            want["loss"], want["lr"], want["grad_norm"], want["tokens_seen"])


@pytest.mark.parametrize("stage, offload", [(2, "optimizer"), (3, "optimizer_and_params")])
def test_offloaded_states_train_like_the_others(tiny_overrides, stage, offload):
    """ZeRO-Offload keeps torch's AdamW on the CPU copy of the states: the same losses as without it."""
    run_dir = Path(tiny_overrides[-1].split("=", 1)[1])
    base = [sys.executable, "-m", "mmscale", "train", RECIPE, *tiny_overrides, f"train.zero_stage={stage}",
            "train.val_every=0", "train.checkpoint_every=0"]
    plain = run_command([*base, f"run.dir={run_dir}-plain"])
    assert plain.returncode == 0, plain.stderr[-3000:]
    offloaded = run_command([*base, f"train.offload={offload}"])
    assert offloaded.returncode == 0, offloaded.stderr[-3000:]
    want, _ = logged_metrics(Path(f"{run_dir}-plain"))
    got, _ = logged_metrics(run_dir)
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-5)


def test_a_start_that_failed_before_its_first_checkpoint_may_be_corrected(tiny_overrides, tmp_path):
    run_dir = Path(tiny_overrides[-1].split("=", 1)[1])
    base = [sys.executable, "-m", "mmscale", "train", RECIPE, *tiny_overrides, "train.steps=2", "train.warmup_steps=1"]
    failed = run_command([*base, f"model.pretrained.vlm={tmp_path / 'no-such-llava'}"])
    assert failed.returncode == 2 and "no-such-llava is not a Hugging Face model folder" in failed.stderr
    assert (run_dir / "recipe.yaml").is_file() and not (run_dir / "checkpoints").exists()
    corrected = run_command(base)  # a different recipe, but the directory holds no checkpoint to protect
    assert corrected.returncode == 0, corrected.stderr[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    # Both starts cost allocated time: the failed one is on the run's record too.
    assert [(a.number, a.ended, a.last_step) for a in read_attempts(run_dir)] == [(1, "error", 0), (2, "finished", 2)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_task_bound_to_one_gpu_trains_whatever_its_local_rank(tiny_overrides):
    """srun with one task per GPU and per-task binding: the task sees one GPU, device 0, while its
    local rank is 1; DeepSpeed's own device selection by LOCAL_RANK would be out of range."""
    proc = run_command([sys.executable, "-m", "mmscale", "train", RECIPE, *tiny_overrides, "train.steps=2"],
                DS_ACCELERATOR="cuda", CUDA_VISIBLE_DEVICES="0", RANK="0", LOCAL_RANK="1", WORLD_SIZE="1",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    assert proc.returncode == 0, proc.stderr[-3000:]
