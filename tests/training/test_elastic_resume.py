"""Resume on another number of ranks or loader workers: optimizer states resharded through
DeepSpeed's universal checkpoint, the rest of the epoch dealt to the new readers (data.elastic).
Real gloo ranks, ZeRO-2 and ZeRO-3, bf16 as users train."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mmscale.demo.corpus import build_demo_dataset
from mmscale.training.distributed import free_port
from tests.helpers.outputs import logged_sample_ids
from tests.helpers.processes import subprocess_env
from tests.helpers.recipes import REPO, TINY_DATA, TINY_OVERRIDES

# Each rank builds the tiny decoder model; with `steps`, trains that many steps on seeded random
# batches (one per rank and step) and saves them in RUN_DIR; without, loads RUN_DIR's newest
# checkpoint and saves it again in OUT.
RESHARD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from mmscale.training.checkpoint import load_latest_checkpoint, save_checkpoint
    from mmscale.launch.ending import leave
    from mmscale.training import build_engine, init_distributed
    from mmscale.config import load_recipe
    from mmscale.models.decoder_vlm import DecoderVLM
    from tests.helpers.recipes import REPO, TINY_OVERRIDES

    rank, world = init_distributed(120)
    run_dir, stage, steps, out = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", [*TINY_OVERRIDES, f"train.zero_stage={stage}",
                                                         "train.precision=bf16", "train.micro_batch_size=2"])
    torch.manual_seed(1)  # not the saved weights
    engine = build_engine(DecoderVLM(recipe.model, vocab_size=64, image_token_id=3), recipe.train)
    n = recipe.model.image_tokens
    for step in range(steps):
        g = torch.Generator().manual_seed(100 * step + rank)
        ids = torch.randint(4, 64, (2, n + 12), generator=g)
        ids[:, 1 : 1 + n] = 3
        labels = ids.clone()
        labels[:, : 1 + n] = -100
        loss = engine(input_ids=ids, labels=labels, pixel_values=torch.randn(2, 3, 32, 32, generator=g))
        engine.backward(loss)
        engine.step()
    if steps:
        save_checkpoint(engine, run_dir, steps, {"step": steps})
    else:
        restored = load_latest_checkpoint(engine, run_dir)
        assert restored.client_state["step"] == 2 and restored.world_size == 2
        save_checkpoint(engine, out, 2, {"step": 2})
    leave(0)
    """
)


def _ranks(world: int, *args: str) -> None:
    env = dict(subprocess_env(), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([sys.executable, "-c", RESHARD, *args], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(world)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]


def _whole_states(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 weights and Adam moments, whole, as DeepSpeed's converter writes them."""
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint),
                    "--output_folder", str(out), "--inject_missing_state"], check=True, capture_output=True,
                   env=subprocess_env())
    states = {f"{p.parent.name}/{p.stem}": torch.load(p, weights_only=False)
              for p in (out / "zero").glob("*/*.pt") if p.stem in ("fp32", "exp_avg", "exp_avg_sq")}
    return {name: t["param"] if isinstance(t, dict) else t for name, t in states.items()}  # ZeRO-2: a dict


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_optimizer_states_are_resharded_onto_one_and_three_ranks(tmp_path, stage):
    """Saved by 2 ranks after 2 steps, loaded by 1 and by 3 and saved again: every trainable
    parameter's fp32 master weights and both Adam moments are the saved ones."""
    _ranks(2, str(tmp_path / "run"), str(stage), "2", "-")
    saved = _whole_states(tmp_path / "run" / "checkpoints" / "step_0000002", tmp_path / "u2")
    assert len(saved) > 100 and all(t.abs().sum() > 0 for t in saved.values())  # trained: moments not zero
    for world in (1, 3):
        again = tmp_path / f"again{world}"
        _ranks(world, str(tmp_path / "run"), str(stage), "0", str(again))
        marker = json.loads((again / "checkpoints" / "step_0000002" / "complete.json").read_text())
        assert marker["world_size"] == world
        loaded = _whole_states(again / "checkpoints" / "step_0000002", tmp_path / f"u{world}")
        assert loaded.keys() == saved.keys()
        for name, tensor in saved.items():
            torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))  # the universal copy is removed


# ---- through `mmscale train` -----------------------------------------------------------------

# 96 samples in 12 shards of 8: 3 shards for each of 2 ranks x 2 workers, 4 for each of 3 readers.
# A global batch of 12 rows is 3 micro-batches of 2 on each of 2 ranks, 2 on each of 3, 6 on one:
# an epoch is 8 steps on any of them.
ELASTIC = ["data.shuffle_buffer=5", "train.micro_batch_size=2", "train.global_batch_size=12", "train.steps=8",
           "train.log_every=1", "train.val_every=0", "train.checkpoint_every=3", "train.log_sample_ids=true",
           "train.precision=bf16", "data.val=null", "data.eval=null"]


@pytest.fixture(scope="module")
def twelve_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("elastic") / "data"
    build_demo_dataset(out, seed=0, **{**TINY_DATA, "samples_per_shard": 8})
    return out


def _train(data: Path, run_dir: Path, stage: int, ranks: int, workers: int, extra: list[str] = ()
           ) -> subprocess.CompletedProcess:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    command = [*torchrun, "-m", "mmscale", "train", str(REPO / "recipes" / "demo.yaml"), *TINY_OVERRIDES, *ELASTIC,
               f"data.train={data / 'train'}", f"data.tokenizer={data / 'tokenizer'}", f"run.dir={run_dir}",
               f"train.zero_stage={stage}", f"data.num_workers={workers}", *extra]
    proc = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    if proc.returncode:
        print(proc.stdout[-5000:], proc.stderr[-5000:], sep="\n")
    return proc


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_a_run_of_2x2_readers_resumes_on_3x1_and_1x3(twelve_shards, tmp_path, stage):
    """Rolled back to step 3 of an 8-step epoch on 2 ranks x 2 workers, and resumed on 3 ranks x 1
    worker, and on 1 rank x 3 workers: the epoch's 96 samples are each trained once, every step
    is logged once, and the losses go on within the run's own step-to-step change."""
    straight = tmp_path / "straight"
    first = _train(twelve_shards, straight, stage, 2, 2)
    assert first.returncode == 0, first.stderr[-3000:]
    expected = _losses(straight)
    assert list(expected) == list(range(1, 9))
    assert sorted(logged_sample_ids(straight)) == sorted(set(logged_sample_ids(straight))) and len(logged_sample_ids(straight)) == 96
    noise = max(abs(expected[s + 1] - expected[s]) for s in range(1, 8))
    for ranks, workers in ((3, 1), (1, 3)):
        run_dir = tmp_path / f"{ranks}x{workers}"
        shutil.copytree(straight, run_dir)
        (run_dir / "checkpoints" / "latest").write_text("step_0000003")
        resumed = _train(twelve_shards, run_dir, stage, ranks, workers)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        out = resumed.stdout + resumed.stderr
        assert "written by 2 ranks, on " + str(ranks) in out and "universal checkpoint" in out
        layout = {(3, 1): "3 ranks x 1 reader", (1, 3): "1 rank x 3 readers"}[ranks, workers]
        assert f"data positions of 2 ranks x 2 readers dealt to {layout}" in out
        assert "the rest of the epoch, 60 samples" in out
        losses = _losses(run_dir)
        assert list(losses) == list(range(1, 9))
        assert all(losses[s] == expected[s] for s in (1, 2, 3))
        assert all(abs(losses[s] - expected[s]) <= noise for s in range(4, 9)), (losses, expected, noise)
        ids = logged_sample_ids(run_dir)
        assert len(ids) == 96 and set(ids) == set(logged_sample_ids(straight))
        # The run goes on where it stopped: its next checkpoint's parent is the one it resumed from.
        marker = json.loads((run_dir / "checkpoints" / "step_0000006" / "complete.json").read_text())
        assert marker["world_size"] == ranks and marker["parent"] == "step_0000003"


@pytest.mark.slow
def test_a_packed_run_hands_on_the_rest_of_its_blocks(twelve_shards, tmp_path):
    """Packed rows (blocks of 8 samples, about 3 to a row) on 2 ranks x 2 workers, stopped at step 2
    inside their blocks and resumed on 3 x 1 for a step: the samples of rows trained before the stop
    are not trained again, and the rest of the blocks are."""
    run_dir = tmp_path / "run"
    packed = ["data.pack=true", "data.pack_len=200", "data.pack_block=8", "train.micro_batch_size=1",
              "train.global_batch_size=6", "train.checkpoint_every=2", "train.warmup_steps=1"]
    first = _train(twelve_shards, run_dir, 2, 2, 2, [*packed, "train.steps=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    before = logged_sample_ids(run_dir)
    resumed = _train(twelve_shards, run_dir, 2, 3, 1, [*packed, "train.steps=3"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "data positions of 2 ranks x 2 readers dealt to 3 ranks x 1 reader" in resumed.stdout + resumed.stderr
    ids = logged_sample_ids(run_dir)
    assert len(ids) > len(before) and len(set(ids)) == len(ids)  # within the epoch: nothing twice
