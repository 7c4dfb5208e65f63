"""The configurations users run, end to end on 2 ranks (real torchrun, DeepSpeed, gloo):
{fp32, bf16} x {ZeRO-2, ZeRO-3} x {frozen vision tower (a decoder VLM's `finetune`), frozen LLM
(a cross-attention VLM's `adapter`), a Molmo2-style model over a frozen tower} x {padded, packed},
each with gradient accumulation and
activation checkpointing, the frozen part loaded from a transformers folder (`model.pretrained`),
as users start. Every cell trains (with an in-loop eval), saves checkpoints without the frozen
weights, resumes bit for bit, is evaluated by `mmscale eval`, released by `mmscale convert`
(verified), and its release loads in transformers and runs on what its processor prepares.

Three cells run by default, together covering both values of every axis but Molmo2 (tested apart);
`-m matrix` runs all 24.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer
from transformers.utils import is_torchvision_available

from mmscale.config import load_recipe
from mmscale.convert.trained import consolidate
from mmscale.convert.verify import probe_inputs
from mmscale.data.multicrop import ImageTokenIds
from mmscale.data.tokenizer import recipe_tokenizer
from mmscale.models import vocab_size_for
from mmscale.models.hf import adapter_for_hf, molmo2
from mmscale.models.hf.folder import read_config
from mmscale.training.checkpoint import MARKER
from mmscale.training.distributed import free_port
from tests.helpers.outputs import logged_metrics
from tests.helpers.pretrained import write_pretrained_folders
from tests.helpers.processes import run_command
from tests.helpers.recipes import CROSS_ATTENTION_OVERRIDES, MOLMO2_OVERRIDES, REPO, TINY_OVERRIDES, tiny_with

ARCHS = {  # what each freezes, as users train them: LLaVA's stage 2, Llama 3.2 Vision's adapter, and
    # a Molmo2-style model over a frozen SigLIP tower (train.trainable=finetune)
    "finetune": ("demo.yaml", "decoder", []),
    "adapter": ("demo_cross_attention.yaml", "cross_attention", CROSS_ATTENTION_OVERRIDES),
    "molmo2": ("demo_molmo2.yaml", "molmo2", MOLMO2_OVERRIDES),
}
TRAINABLE = {"finetune": "finetune", "adapter": "adapter", "molmo2": "finetune"}
FROZEN = {"finetune": "vision", "adapter": "llm", "molmo2": "vision"}  # the part each freezes, as model.pretrained names it
FROZEN_WEIGHT = {"finetune": "vision_tower.", "adapter": "language_model.embed_tokens.",  # one of its weights
                 "molmo2": "vision_tower."}
PACKING = {"padded": [], "packed": ["data.pack=true", "data.pack_len=192"]}
CELLS = list(itertools.product(["fp32", "bf16"], [2, 3], ARCHS, PACKING))
# Molmo2's cells run with -m matrix only: its 2-rank ZeRO-2/3 resume, export and eval have tests of their own
# (tests/training/test_molmo2_training.py, tests/convert/test_export.py, tests/eval/test_run.py).
DEFAULT_CELLS = {("bf16", 3, "finetune", "packed"), ("bf16", 2, "adapter", "padded"), ("fp32", 3, "adapter", "packed")}
STEPS, CHECKPOINT = 4, 2
EVAL_SAMPLES = 8


def _cells() -> list:
    return [pytest.param(*cell, id="-".join(map(str, cell)),
                         marks=[pytest.mark.slow] + ([] if cell in DEFAULT_CELLS else [pytest.mark.matrix]))
            for cell in CELLS]


@pytest.fixture(scope="module")
def pretrained(demo_data, tmp_path_factory) -> dict[str, Path]:
    """The folder each stage's frozen part starts from."""
    folders = {}
    for trainable, (recipe, _, extra) in ARCHS.items():
        cfg = load_recipe(REPO / "recipes" / recipe,
                          [*tiny_with(TINY_OVERRIDES, extra), f"data.tokenizer={demo_data / 'tokenizer'}"])
        vocab = vocab_size_for(cfg.model, recipe_tokenizer(cfg))
        folders[trainable] = write_pretrained_folders(cfg.model, vocab, tmp_path_factory.mktemp(trainable))[FROZEN[trainable]]
    return folders


def _train(command: list[str]) -> str:
    command[command.index("--master_port") + 1] = str(free_port())
    proc = run_command(command, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _released_model_runs(folder: Path, arch: str, dtype: torch.dtype) -> None:
    """The release loads with transformers' own classes and processor, and runs on what the processor prepares
    (Molmo2's processor needs torchvision, which imports only beside CUDA torch: on CPU, on mmscale's crops)."""
    model = adapter_for_hf(read_config(folder), folder).model_class.from_pretrained(folder).eval()
    assert {p.dtype for p in model.parameters()} == {dtype}
    if arch == "molmo2" and not is_torchvision_available():
        config = molmo2.complete(read_config(folder))
        cfg = molmo2.config_from_hf(config, *molmo2.processor_configs(folder))
        tokens = ImageTokenIds.of_tokenizer(AutoTokenizer.from_pretrained(folder))
        inputs = molmo2.inputs_to_hf(probe_inputs(cfg, config["text_config"]["vocab_size"], tokens, set()), cfg, tokens)
        with torch.no_grad():
            logits = model(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}).logits
        assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
        return
    processor = AutoProcessor.from_pretrained(folder)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    text = f"{processor.image_token}\nHow many cats are there?"
    inputs = processor(images=[[image]] if arch == "cross_attention" else [image], text=[text], return_tensors="pt")
    with torch.no_grad():
        logits = model(**{k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


@pytest.mark.parametrize("precision, stage, trainable, packing", _cells())
def test_a_user_configuration_trains_resumes_evaluates_and_releases(demo_data, pretrained, tmp_path, precision, stage,
                                                                    trainable, packing):
    recipe, arch, extra = ARCHS[trainable]
    run_dir = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", "0"]
    command = [
        *torchrun, "-m", "mmscale", "train", str(REPO / "recipes" / recipe), *tiny_with(TINY_OVERRIDES, extra),
        f"data.train={demo_data / 'train'}", f"data.val={demo_data / 'val'}", f"data.eval={demo_data / 'eval'}",
        f"data.tokenizer={demo_data / 'tokenizer'}", "data.num_workers=0", f"run.dir={run_dir}",
        f"train.precision={precision}", f"train.zero_stage={stage}", f"train.trainable={TRAINABLE[trainable]}",
        *PACKING[packing],
        "train.micro_batch_size=2", "train.grad_accum=2", "model.llm.activation_checkpointing=true",
        f"train.steps={STEPS}", "train.warmup_steps=1", "train.log_every=1", "train.val_every=0",
        f"train.checkpoint_every={CHECKPOINT}", f"train.eval_every={STEPS}", f"train.eval_samples={EVAL_SAMPLES}",
        f"model.pretrained.{FROZEN[trainable]}={pretrained[trainable]}",
    ]
    _train(command)
    train, val = logged_metrics(run_dir)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["loss"]) and r["skipped_steps"] == 0 for r in train)
    assert len(val) == 1  # validation at the last step
    first_eval = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval_overall" in r]
    assert [r["eval_samples"] for r in first_eval] == [EVAL_SAMPLES]

    # Resume from the middle checkpoint: the same steps, the same final weights, bit for bit.
    checkpoints = run_dir / "checkpoints"
    last = checkpoints / f"step_{STEPS:07d}"
    uninterrupted = consolidate(last)
    # The frozen part is not in the checkpoints: every start, and the conversion, read it from its folder.
    assert list(json.loads((last / MARKER).read_text())["frozen_from"]) == [str(pretrained[trainable])]
    assert not any(k.startswith(FROZEN_WEIGHT[trainable]) for k in uninterrupted)
    shutil.rmtree(last)
    (checkpoints / "latest").write_text(f"step_{CHECKPOINT:07d}")
    assert f"resumed from step {CHECKPOINT}" in _train(command)
    records = logged_metrics(run_dir)[0]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # each step once
    after = records[CHECKPOINT:]
    for got, want in zip(after, train[CHECKPOINT:], strict=True):
        assert (got["step"], got["loss"], got["grad_norm"], got["lr"]) == (
            want["step"], want["loss"], want["grad_norm"], want["lr"])
    resumed = consolidate(last)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)

    # `mmscale eval` answers the eval questions from the checkpoint.
    report = tmp_path / "eval.json"
    proc = run_command([sys.executable, "-m", "mmscale", "eval", str(run_dir), "--data", str(demo_data / "eval"),
                 "--max-samples", str(EVAL_SAMPLES), "--out", str(report)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(json.loads(report.read_text())["samples"]) == EVAL_SAMPLES

    # `mmscale convert` releases it, verified, in the dtype it trained in; transformers runs it.
    release = tmp_path / "release"
    proc = run_command([sys.executable, "-m", "mmscale", "convert", str(run_dir), "--to", "hf", str(release)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"({adapter_for_hf(read_config(release), release).name}, {precision})" in proc.stdout and "greedy 10 tokens identical" in proc.stdout
    _released_model_runs(release, arch, torch.bfloat16 if precision == "bf16" else torch.float32)
