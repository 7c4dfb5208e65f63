"""VIRAL's loss on a tiny decoder VLM: the value by hand, where its gradients go, packing,
several images per sample, the encoder target, and what the model exposes to training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmscale.alignment import AlignedVLM, with_alignment
from mmscale.alignment.model import captured_output
from mmscale.config import RecipeError, load_recipe
from mmscale.models.decoder_vlm import DecoderVLM
from mmscale.models.llama import rope_cos_sin
from mmscale.models.loss import LossTokens, labelled_tokens
from mmscale.training.freeze import freeze, model_parts
from tests.helpers.recipes import REPO, TINY_OVERRIDES

IMAGE_ID, VOCAB = 3, 64
# Three blocks, the output of the second aligned: block 3 must get no gradient from the alignment loss.
VIRAL = ["model.alignment.enabled=true", "model.llm.num_layers=3", "model.alignment.layer=2",
         "model.alignment.projector_hidden=48", "model.alignment.random_teacher_patch_size=4"]


def build(*overrides: str) -> AlignedVLM:
    cfg = load_recipe(REPO / "recipes" / "demo.yaml", [*TINY_OVERRIDES, *VIRAL, *overrides]).model
    torch.manual_seed(0)
    model = with_alignment(DecoderVLM(cfg, VOCAB, IMAGE_ID), cfg)
    return model.train()


def batch(model: AlignedVLM, images_per_row=(1, 2), seq=48) -> dict[str, torch.Tensor]:
    n = model.vlm.image_token_count
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(10, VOCAB, (len(images_per_row), seq), generator=generator)
    for row, count in enumerate(images_per_row):
        input_ids[row, 2 : 2 + count * n] = IMAGE_ID
    size = model.cfg.vision.image_size
    return {
        "input_ids": input_ids, "labels": input_ids.clone(),
        "pixel_values": torch.randn(sum(images_per_row), 3, size, size, generator=generator),
    }


def hidden_after_block(model: AlignedVLM, input_ids: torch.Tensor, pixels: torch.Tensor, block: int) -> torch.Tensor:
    """The LLM's hidden states after `block` blocks, run by hand (no hook)."""
    x = model.vlm.embed(input_ids, pixels)
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    cos, sin = rope_cos_sin(positions, model.cfg.llm)
    for layer in model.language_model.layers[:block]:
        x = layer(x, cos, sin)
    return x


def test_loss_equals_a_hand_computation():
    model = build()
    b = batch(model)
    total = model(**b)
    parts = model.last_parts

    hidden = hidden_after_block(model, b["input_ids"], b["pixel_values"], block=2)
    predicted = model.alignment_head(hidden[b["input_ids"] == IMAGE_ID])
    # The teacher sees the raw image in ImageNet's statistics at its own size (4 x 4 patches of 4 px).
    vision = model.cfg.vision
    raw = b["pixel_values"] * torch.tensor(vision.image_std).view(1, 3, 1, 1) + torch.tensor(vision.image_mean).view(1, 3, 1, 1)
    raw = nn.functional.interpolate(raw, size=(16, 16), mode="bilinear", antialias=True)
    teacher_in = (raw - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    target = model.teacher.model(pixel_values=teacher_in).last_hidden_state[:, 1:].reshape(-1, predicted.shape[-1])
    cosines = (predicted * target).sum(-1) / (predicted.norm(dim=-1) * target.norm(dim=-1))
    expected_align = -cosines.mean()
    expected_lm = model.vlm(**b)

    assert predicted.shape[0] == 3 * 16
    torch.testing.assert_close(parts.align, expected_align.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total, expected_lm + 0.5 * expected_align, atol=1e-5, rtol=1e-5)
    # Normalised by the optimizer step's counts instead of the batch's own, each term is that share.
    step_total = model(**b, loss_tokens=LossTokens(labelled=4 * labelled_tokens(b["labels"]), aligned=2 * 48))
    torch.testing.assert_close(model.last_parts.lm, expected_lm.detach() / 4, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.last_parts.align, expected_align.detach() / 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step_total, expected_lm / 4 + 0.5 * expected_align / 2, atol=1e-5, rtol=1e-5)


def test_alignment_gradients_reach_the_head_and_blocks_up_to_the_layer_only():
    model = build()
    b = batch(model)
    with captured_output(model.language_model.layers[1]) as hidden:
        model.vlm.logits(b["input_ids"], b["pixel_values"])
    model.alignment_sum(hidden[0], b["input_ids"] == IMAGE_ID, b["pixel_values"]).backward()

    def grad(name: str) -> torch.Tensor | None:
        return dict(model.named_parameters())[name].grad

    for name in ("alignment_head.linear_1.weight", "alignment_head.linear_3.weight",
                 "language_model.layers.0.mlp.up_proj.weight", "language_model.layers.1.self_attn.q_proj.weight",
                 "connector.linear_1.weight"):
        assert grad(name) is not None and grad(name).abs().sum() > 0, name
    for name in ("language_model.layers.2.mlp.up_proj.weight", "language_model.norm.weight"):
        assert grad(name) is None, name
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.model.parameters())


def test_teacher_is_not_a_parameter_of_the_model_nor_in_its_checkpoint():
    model = build()
    keys = set(model.state_dict())
    assert keys == set(model.vlm.state_dict()) | {k for k in keys if k.startswith("alignment_head.")}
    assert {k for k in keys if k.startswith("alignment_head.")}
    teacher = {id(p) for p in model.teacher.model.parameters()}
    assert not teacher & {id(p) for p in model.parameters()}
    assert set(model_parts(model)) == {"vision_tower", "connector", "llm", "alignment_head"}


def test_the_head_trains_with_every_stage_and_the_teacher_stays_in_eval_mode():
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", [*TINY_OVERRIDES, *VIRAL, "train.trainable=align"])
    assert recipe.trainable_parts == ("connector", "alignment_head")
    model = build()
    freeze(model, recipe.trainable_parts)
    trainable = {part for part, ps in model_parts(model).items() if all(p.requires_grad for p in ps)}
    assert trainable == {"connector", "alignment_head"}
    model.train()
    assert not model.teacher.model.training and model.vlm.training


def test_packed_rows_give_the_same_alignment_loss_as_one_sample_per_row():
    model = build()
    b = batch(model, images_per_row=(1, 2), seq=48)
    model(**b)
    unpacked = model.last_parts
    # Both samples, one row: positions restart and segments separate them.
    packed = {
        "input_ids": b["input_ids"].reshape(1, -1), "labels": b["labels"].reshape(1, -1),
        "pixel_values": b["pixel_values"],
        "position_ids": torch.arange(48).repeat(2).unsqueeze(0),
        "segment_ids": torch.cat([torch.full((48,), 1), torch.full((48,), 2)]).unsqueeze(0),
    }
    model(**packed)
    torch.testing.assert_close(model.last_parts.align, unpacked.align, atol=1e-5, rtol=1e-5)


def test_several_images_per_sample_match_a_per_image_loop():
    model = build()
    b = batch(model, images_per_row=(3, 1, 2), seq=64)
    model(**b)
    n = model.vlm.image_token_count
    hidden = hidden_after_block(model, b["input_ids"], b["pixel_values"], block=2)
    targets = model.targets(b["pixel_values"])
    cosines, image = [], 0
    for row, count in enumerate((3, 1, 2)):
        for k in range(count):
            tokens = hidden[row, 2 + k * n : 2 + (k + 1) * n]
            cosines.append(nn.functional.cosine_similarity(model.alignment_head(tokens), targets[image], dim=-1))
            image += 1
    torch.testing.assert_close(-model.last_parts.align, torch.cat(cosines).mean().detach(), atol=1e-5, rtol=1e-5)


def test_a_batch_without_images_adds_zero_and_still_uses_the_head():
    model = build()
    b = batch(model, images_per_row=(0, 0))
    del b["pixel_values"]
    total = model(**b)
    assert model.last_parts.align == 0
    total.backward()
    grad = model.alignment_head.linear_1.weight.grad
    assert grad is not None and not grad.any()


def test_validation_is_the_lm_loss_and_runs_no_teacher():
    model = build()
    b = batch(model)
    calls = model.teacher.forward_calls
    model.eval()
    torch.testing.assert_close(model(**b), model.vlm(**b))
    assert model.teacher.forward_calls == calls and model.last_parts is None


def test_activation_checkpointing_keeps_the_alignment_gradients():
    grads = []
    for checkpointing in ("false", "true"):
        model = build(f"model.llm.activation_checkpointing={checkpointing}")
        b = batch(model)
        model(**b).backward()
        grads.append(dict(model.named_parameters())["language_model.layers.0.mlp.up_proj.weight"].grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_encoder_target_is_the_towers_own_features_pooled_to_the_token_grid():
    model = build("model.alignment.target=encoder", "model.connector.type=pool_mlp", "model.vision.image_size=64")
    assert model.teacher is None
    b = batch(model, images_per_row=(1, 1))
    model(**b)
    features = model.vision_tower(b["pixel_values"]).detach()  # (2, 8 x 8, width)
    pooled = features.view(2, 4, 2, 4, 2, -1).mean(dim=(2, 4)).reshape(2, 16, -1)  # 2x2 averages, row-major
    targets = model.targets(b["pixel_values"], features)
    torch.testing.assert_close(targets, pooled, atol=1e-6, rtol=1e-5)
    assert not targets.requires_grad
    assert model.alignment_head.linear_3.out_features == model.cfg.vision.feature_size
    assert torch.isfinite(model.last_parts.align) and model.last_parts.align != 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.arch=cross_attention", "model.llm.tie_embeddings=false"], "needs model.arch=decoder"),
        (["model.alignment.layer=4"], "beyond model.llm.num_layers=3"),
        (["model.alignment.layer=0"], "blocks count from 1"),
        (["model.alignment.layer=null", "model.alignment.layer_fraction=1.5"], "a fraction must lie in"),
        (["model.alignment.target=encoder", "model.alignment.teacher=/x"], "teacher is for target dinov2"),
    ],
)
def test_bad_alignment_settings_are_config_errors(overrides, message):
    with pytest.raises(Exception, match=message):
        load_recipe(REPO / "recipes" / "demo.yaml", [*TINY_OVERRIDES, *VIRAL, *overrides])


def test_layer_as_fraction_picks_the_middle_block():
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", [*TINY_OVERRIDES, *VIRAL, "model.alignment.layer=null",
                                                          "model.alignment.layer_fraction=0.5",
                                                          "model.llm.num_layers=4"])
    assert recipe.model.alignment.block(4) == 2
    assert load_recipe(REPO / "recipes" / "llava15_7b_finetune_viral.yaml").model.alignment.block(32) == 16


@pytest.mark.parametrize("value", ["1.0", "0.5"])
def test_a_float_layer_is_refused_naming_layer_fraction(value):
    """`layer: 1.0` was the last block and `layer: 1` the first: a float block number is now an error."""
    with pytest.raises(RecipeError, match=f"layer_fraction={value}"):
        load_recipe(REPO / "recipes" / "demo.yaml", [*TINY_OVERRIDES, *VIRAL, f"model.alignment.layer={value}"])


def test_layer_and_layer_fraction_together_are_refused():
    with pytest.raises(RecipeError, match="give one"):
        load_recipe(REPO / "recipes" / "demo.yaml", [*TINY_OVERRIDES, *VIRAL, "model.alignment.layer_fraction=0.5"])


def test_the_default_is_the_middle_block():
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", [*TINY_OVERRIDES, "model.llm.num_layers=4"])
    assert recipe.model.alignment.layer is None and recipe.model.alignment.layer_fraction == 0.5
    assert recipe.model.alignment.block(4) == 2
