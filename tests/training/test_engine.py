"""The DeepSpeed engine built from a recipe, in-process on a world of one (gloo)."""

from __future__ import annotations

import pytest
import torch
from deepspeed.utils import safe_get_full_grad

from mmscale.config import load_recipe
from mmscale.config.load import RecipeError
from mmscale.data.tokenizer import IGNORE_INDEX
from mmscale.errors import UserError
from mmscale.models.decoder_vlm import DecoderVLM
from mmscale.training import build_engine
from mmscale.training.budget import Budget
from mmscale.training.engine import deepspeed_config, lr_ratio, param_groups, set_lr
from mmscale.training.freeze import freeze, parameter_table
from tests.helpers.recipes import REPO, TINY_OVERRIDES


def _engine(*overrides: str):
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", [*TINY_OVERRIDES, *overrides])
    torch.manual_seed(0)
    model = DecoderVLM(recipe.model, vocab_size=64, image_token_id=3)
    return build_engine(model, recipe.train), model


def _batch(model: DecoderVLM) -> dict:
    n = model.image_token_count
    input_ids = torch.randint(10, 64, (4, 2 * n))
    input_ids[:, 1 : 1 + n] = 3
    labels = input_ids.clone()
    labels[:, : n + 1] = IGNORE_INDEX
    size = model.cfg.vision.image_size
    return {"input_ids": input_ids, "labels": labels, "pixel_values": torch.randn(4, 3, size, size)}


def test_gradient_accumulation_steps_the_optimizer_once_per_window(world_of_one):
    engine, model = _engine("train.grad_accum=2", "train.zero_stage=2")
    weight = model.language_model.layers[0].mlp.up_proj.weight
    before = weight.detach().clone()
    for micro_batch in range(2):
        loss = engine(**_batch(model))
        engine.backward(loss)
        engine.step()
        if micro_batch == 0:
            assert engine.global_steps == 0 and torch.equal(weight, before)
    assert engine.global_steps == 1 and not torch.equal(weight, before)


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    budget = Budget("steps", 10)
    ratios = [lr_ratio(step, budget.done(step + 1, 0), budget.done(4, 0), warmup=4, floor=0.1) for step in range(10)]
    assert ratios[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a > b for a, b in zip(ratios[3:], ratios[4:]))
    assert ratios[-1] == pytest.approx(0.1)


def test_learning_rate_by_samples_follows_the_samples_seen_not_the_steps():
    budget = Budget("samples", 1000)
    # After warmup ended at 100 samples: halfway through the rest is the cosine's midpoint.
    ratio = lr_ratio(7, budget.done(8, 550), budget.done(4, 100), warmup=4, floor=0.0)
    assert ratio == pytest.approx(0.5)
    assert lr_ratio(9, budget.done(10, 1000), 0.1, warmup=4, floor=0.2) == pytest.approx(0.2)


def test_set_lr_reaches_the_optimizer_that_steps(world_of_one):
    engine, model = _engine()
    before = model.language_model.norm.weight.detach().clone()
    set_lr(engine, 0.0)
    loss = engine(**_batch(model))
    engine.backward(loss)
    engine.step()
    assert set(engine.get_lr()) == {0.0}
    assert torch.equal(model.language_model.norm.weight, before)  # AdamW with lr 0 moves nothing


def test_no_weight_decay_on_norms_and_biases_and_a_learning_rate_per_part():
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", [*TINY_OVERRIDES, "train.lr=1e-3", "train.weight_decay=0.1",
                                                          "train.lr_by_part={vision_tower: 1.0e-4}"])
    model = DecoderVLM(recipe.model, vocab_size=64, image_token_id=3)
    groups = {g["name"]: g for g in param_groups(model, recipe.train)}
    assert sorted(groups) == sorted(f"{part}/{kind}" for part in ("vision_tower", "connector", "llm")
                                    for kind in ("decay", "no_decay"))
    names = {id(p): n for n, p in model.named_parameters()}
    for name, group in groups.items():
        assert group["weight_decay"] == (0.1 if name.endswith("/decay") else 0.0)
        assert all((p.ndim >= 2) == name.endswith("/decay") for p in group["params"])
        assert group["lr_scale"] == pytest.approx(0.1 if name.startswith("vision_tower") else 1.0)
    assert "language_model.norm.weight" in {names[id(p)] for p in groups["llm/no_decay"]["params"]}
    assert "connector.linear_1.bias" in {names[id(p)] for p in groups["connector/no_decay"]["params"]}
    assert "language_model.embed_tokens.weight" in {names[id(p)] for p in groups["llm/decay"]["params"]}
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_frozen_parts_stay_bit_identical_and_are_left_out_of_the_optimizer(world_of_one):
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", [*TINY_OVERRIDES, "train.trainable=align"])
    torch.manual_seed(0)
    model = DecoderVLM(recipe.model, vocab_size=64, image_token_id=3)
    freeze(model, recipe.trainable_parts)
    table = parameter_table(model)
    assert table.splitlines()[2].split()[:2] == ["connector", f"{sum(p.numel() for p in model.connector.parameters()) / 1e6:.2f}M"]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    engine = build_engine(model, recipe.train)
    optimized = sum(p.numel() for group in engine.optimizer.param_groups for p in group["params"])
    assert optimized <= sum(p.numel() for p in model.connector.parameters())  # ZeRO may flatten, never add
    for _ in range(2):
        loss = engine(**_batch(model))
        engine.backward(loss)
        engine.step()
    for name, param in model.named_parameters():
        moved = not torch.equal(param, before[name])
        assert moved == name.startswith("connector."), name


def test_a_linear_decay_falls_evenly_to_the_floor():
    budget = Budget("steps", 10)
    ratios = [lr_ratio(s, budget.done(s + 1, 0), budget.done(2, 0), warmup=2, floor=0.2, shape="linear") for s in range(10)]
    assert ratios[:2] == pytest.approx([0.5, 1.0])
    drops = [a - b for a, b in zip(ratios[1:], ratios[2:])]
    assert drops == pytest.approx([drops[0]] * len(drops)) and ratios[-1] == pytest.approx(0.2)


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_gradients_accumulate_in_fp32(world_of_one, stage):
    """Two micro-batches' gradients, 0.5 and 0.0005 (after DeepSpeed's 1/grad_accum): bf16 has 8
    bits of mantissa, so a bf16 sum would stay 0.5; DeepSpeed sums them in fp32, as configured."""
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", [*TINY_OVERRIDES, "train.precision=bf16", "train.grad_accum=2",
                                                          f"train.zero_stage={stage}"])

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.connector = torch.nn.Linear(4, 1, bias=False)  # a part param_groups knows

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.connector(x).float().sum()  # d loss / d weight = x

    engine = build_engine(Tiny(), recipe.train)
    summed = []
    step = engine.step

    def capture_then_step() -> None:
        if engine.is_gradient_accumulation_boundary():
            weight = engine.module.connector.weight
            summed.append(safe_get_full_grad(weight).float().flatten().tolist())
        step()

    engine.step = capture_then_step
    for value in (1.0, 1e-3):
        engine.backward(engine(torch.full((1, 4), value, dtype=torch.bfloat16)))
        engine.step()
    expected = (1.0 + torch.tensor(1e-3, dtype=torch.bfloat16).item()) / 2
    assert summed == [pytest.approx([expected] * 4, rel=1e-6)]
    assert torch.tensor(0.5, dtype=torch.bfloat16) + torch.tensor(0.0005, dtype=torch.bfloat16) == 0.5


def test_zero1_in_bf16_is_refused_before_anything_is_built(monkeypatch):
    """DeepSpeed's ZeRO-1 sums bf16 gradients in fp32 only in its BF16_Optimizer, whose checkpoints
    zero_to_fp32 cannot consolidate: the run could never be released."""
    with pytest.raises(RecipeError, match="train.zero_stage=1 cannot train in bf16"):
        load_recipe(REPO / "recipes" / "demo.yaml", [*TINY_OVERRIDES, "train.zero_stage=1", "train.precision=bf16"])
    auto = load_recipe(REPO / "recipes" / "demo.yaml", [*TINY_OVERRIDES, "train.zero_stage=1"]).train
    assert deepspeed_config(auto)["zero_optimization"]["stage"] == 1  # fp32 on this CPU machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # auto means bf16 on CUDA
    with pytest.raises(UserError, match="train.zero_stage=1 cannot train in bf16"):
        deepspeed_config(auto)
