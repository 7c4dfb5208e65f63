"""VIRAL's teacher-feature cache: `mmscale shards cache-teacher` on the demo shards, cached targets
equal to online ones (also packed), no teacher forward when training on a cache, and the
identity check before training."""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from mmscale.alignment import with_alignment
from mmscale.alignment.cache import cache_identity, check_teacher_cache
from mmscale.cli import main
from mmscale.config import load_recipe
from mmscale.data.images import SquareImages
from mmscale.data.loader import build_dataloader
from mmscale.data.tokenizer import load_tokenizer
from mmscale.errors import UserError
from mmscale.models import build_model
from tests.helpers.outputs import logged_metrics
from tests.helpers.processes import run_command
from tests.helpers.recipes import REPO, TINY_OVERRIDES

RECIPE = REPO / "recipes" / "demo_viral.yaml"
# Teacher width and the student's token grid at TINY_OVERRIDES: 32 px / patch 8 = 4 x 4 tokens.
WIDTH, TOKENS = 64, 16


def recipe(demo_data: Path, train: Path | str, *overrides: str):
    paths = [f"data.train={train}", f"data.val={demo_data / 'val'}", f"data.tokenizer={demo_data / 'tokenizer'}"]
    return load_recipe(RECIPE, [*TINY_OVERRIDES, *paths, "data.num_workers=0", *overrides])


@pytest.fixture(scope="module")
def cached(demo_data, tmp_path_factory) -> Path:
    """The demo train shards with the tiny VIRAL recipe's teacher features, made through the CLI."""
    out = tmp_path_factory.mktemp("cached") / "train"
    tiny = [o for o in TINY_OVERRIDES if o.startswith("model.")]
    main(["shards", "cache-teacher", str(demo_data / "train"), str(out), "--recipe", str(RECIPE), *tiny,
          "--batch-size", "20", "--device", "cpu"])
    return out


def samples(shard: Path) -> list[dict]:
    return list(wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples()))


def members(sample: dict) -> dict[str, bytes]:
    return {k: v for k, v in sample.items() if not k.startswith("__")}


def test_cache_copies_every_member_and_adds_fp16_teacher_features_per_image(demo_data, cached):
    r = recipe(demo_data, cached)
    model = with_alignment(build_model(r.model, load_tokenizer(r.data.tokenizer)), r.model)
    manifest = json.loads((cached / "manifest.json").read_text())
    assert manifest["teacher"] == cache_identity(model.teacher, r.model.vision)
    assert manifest["teacher"]["width"] == WIDTH and manifest["teacher"]["grid"] ** 2 == TOKENS
    inputs = sorted((demo_data / "train").glob("*.tar"))
    assert [s["name"] for s in manifest["shards"]] == [p.name for p in inputs]
    for stats in manifest["shards"]:
        data = (cached / stats["name"]).read_bytes()
        assert stats["bytes"] == len(data) and stats["sha256"] == hashlib.sha256(data).hexdigest()

    original, copied = samples(inputs[0]), samples(cached / inputs[0].name)
    assert [s["__key__"] for s in copied] == [s["__key__"] for s in original]
    assert sum(s["samples"] for s in manifest["shards"]) == manifest["samples"] == 96
    for before, after in zip(original, copied):
        images = json.loads(before["json"])["images"]
        added = {k: v for k, v in members(after).items() if k not in before}
        assert {k: members(after)[k] for k in members(before)} == members(before)  # unchanged bytes
        assert sorted(added) == sorted(f"{name}.teacher.npy" for name in images)
    # The features are the teacher's of the loader's pixels, rounded to fp16.
    sample = copied[5]
    name = json.loads(sample["json"])["images"][0]
    features = np.load(io.BytesIO(sample[f"{name}.teacher.npy"]))
    assert features.dtype == np.float16 and features.shape == (TOKENS, WIDTH)
    pixels = SquareImages(r.model.vision)(sample[name])["pixel_values"][None]
    expected = model.teacher.features(pixels)[0]
    torch.testing.assert_close(torch.from_numpy(features).float(), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("pack", [False, True])
def test_cached_and_online_targets_give_the_same_loss_and_stay_with_their_images(demo_data, cached, pack):
    r = recipe(demo_data, cached, f"data.pack={str(pack).lower()}", "data.pack_len=96", "data.pack_block=8")
    width = check_teacher_cache(r)
    tokenizer = load_tokenizer(r.data.tokenizer)
    loader = build_dataloader(r.data, r.model, tokenizer, split="train", batch_size=4, seed=0, teacher_width=width)
    batch = next(iter(loader))
    batch.pop("meta")
    torch.manual_seed(0)
    model = with_alignment(build_model(r.model, tokenizer), r.model).train()
    images = len(batch["pixel_values"])
    assert batch["teacher_features"].shape == (images, TOKENS, WIDTH)
    assert batch["teacher_features"].dtype == torch.float16
    if pack:
        assert (batch["segment_ids"].amax(dim=1) > 1).any()  # rows really hold several samples
    # Image i's cached features are the teacher's features of image i, in packed rows too.
    online_targets = model.teacher.features(batch["pixel_values"])
    torch.testing.assert_close(batch["teacher_features"].float(), online_targets, rtol=1e-3, atol=1e-3)

    calls = model.teacher.forward_calls
    cached_loss = model(**batch)
    cached_parts = model.last_parts
    assert model.teacher.forward_calls == calls
    online_loss = model(**{k: v for k, v in batch.items() if k != "teacher_features"})
    assert model.teacher.forward_calls == calls + 1
    assert int((batch["input_ids"] == model.image_token_id).sum()) == images * TOKENS
    torch.testing.assert_close(cached_parts.align, model.last_parts.align, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(cached_loss, online_loss, rtol=1e-3, atol=1e-4)


def test_training_steps_on_cached_shards_run_no_teacher_forward(demo_data, cached):
    r = recipe(demo_data, cached, "data.pack=true")
    tokenizer = load_tokenizer(r.data.tokenizer)
    loader = build_dataloader(r.data, r.model, tokenizer, split="train", batch_size=4, seed=0,
                              teacher_width=check_teacher_cache(r))
    torch.manual_seed(0)
    model = with_alignment(build_model(r.model, tokenizer), r.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cosines = []
    for _, batch in zip(range(8), loader):
        batch.pop("meta")
        model(**batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        cosines.append(-float(model.last_parts.align))
    assert model.teacher.forward_calls == 0
    assert cosines[-1] > cosines[0]  # the cached targets are learnt


def test_mmscale_train_on_cached_shards_never_calls_the_teacher(demo_data, cached, tmp_path):
    """The whole path (train.py's check, the loader, the trainer's batch keys) with the
    teacher's forward replaced by an error: the run only succeeds if it is never called."""
    overrides = [*TINY_OVERRIDES, f"data.train={cached}", f"data.val={demo_data / 'val'}",
                 f"data.tokenizer={demo_data / 'tokenizer'}", f"run.dir={tmp_path / 'run'}", "train.steps=4"]
    # os._exit, not an exception: a raising run would wait at exit for its DataLoader worker,
    # which ignores the SIGTERM that multiprocessing sends it.
    script = (
        "import os, sys\n"
        "from mmscale.alignment.teacher import Teacher\n"
        "def refuse(self, pixel_values):\n"
        "    print('the teacher ran on a cached run', file=sys.stderr, flush=True)\n"
        "    os._exit(3)\n"
        "Teacher.features = refuse\n"
        "from mmscale.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    proc = run_command([sys.executable, "-c", script, "train", str(RECIPE), *overrides])
    assert proc.returncode == 0, proc.stderr[-3000:]
    train, val = logged_metrics(tmp_path / "run")
    assert train and all(-1 <= row["align_cos"] <= 1 for row in train) and val


def test_identity_mismatch_stops_training_before_the_model_is_built(demo_data, cached, tmp_path):
    wider = recipe(demo_data, cached, "model.alignment.random_teacher_hidden_size=32")
    with pytest.raises(UserError, match=r"model=.*differing: model, width.*re-run `mmscale shards cache-teacher`"):
        check_teacher_cache(wider)
    cropped = recipe(demo_data, cached, "model.vision.resize=crop")
    with pytest.raises(UserError, match=r"pixels=.*'resize': 'pad'.*'resize': 'crop'"):
        check_teacher_cache(cropped)
    # Through `mmscale train`: exit 2 with the message, no run directory made.
    run_dir = tmp_path / "run"
    proc = run_command([sys.executable, "-m", "mmscale", "train", str(RECIPE), *TINY_OVERRIDES, f"data.train={cached}",
                 f"data.val={demo_data / 'val'}", f"data.tokenizer={demo_data / 'tokenizer'}", f"run.dir={run_dir}",
                 "model.alignment.random_teacher_hidden_size=32"])
    assert proc.returncode == 2
    assert "cached teacher features were made with model=" in proc.stderr
    assert not run_dir.exists()


def test_a_mixture_of_cached_and_uncached_shards_is_refused_and_runs_without_a_teacher_ignore_the_cache(
    demo_data, cached
):
    sources = [{"shards": str(cached), "weight": 1.0}, {"shards": str(demo_data / "train"), "weight": 1.0}]
    mixed = load_recipe(RECIPE, [*TINY_OVERRIDES, f"data.tokenizer={demo_data / 'tokenizer'}",
                                 f"data.val={demo_data / 'val'}", f"data.train={json.dumps(sources)}"])
    with pytest.raises(UserError, match="mixes shards with cached teacher features"):
        check_teacher_cache(mixed)
    assert check_teacher_cache(recipe(demo_data, demo_data / "train")) is None  # online VIRAL
    assert check_teacher_cache(recipe(demo_data, cached, "model.alignment.enabled=false")) is None
    assert check_teacher_cache(recipe(demo_data, cached, "model.alignment.target=encoder")) is None
