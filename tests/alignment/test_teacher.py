"""The teacher: its normalisation, its grid, loading a local DINOv2 folder, and bad folders."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

from mmscale.alignment import build_teacher, resample_grid
from mmscale.alignment.teacher import IMAGENET_MEAN, IMAGENET_STD
from mmscale.config import load_recipe
from mmscale.errors import UserError
from tests.helpers.recipes import REPO, TINY_OVERRIDES

TINY_DINO = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=4, image_size=16)


def model_cfg(*overrides: str):
    return load_recipe(REPO / "recipes" / "demo.yaml", [*TINY_OVERRIDES, "model.alignment.enabled=true", *overrides]).model


def save(model, folder, mean=None):
    model.save_pretrained(folder)
    if mean is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": [0.5, 0.5, 0.5]}))
    return folder


def test_pixels_are_renormalised_from_the_students_statistics_to_imagenets():
    cfg = model_cfg("model.alignment.random_teacher_patch_size=8")  # 4 x 4 grid at 32 px: no resize
    teacher = build_teacher(cfg)
    assert teacher.image_size == 32 and teacher.grid == 4
    raw = torch.rand(2, 3, 32, 32)
    student = (raw - torch.tensor(cfg.vision.image_mean).view(1, 3, 1, 1)) / torch.tensor(cfg.vision.image_std).view(1, 3, 1, 1)
    expected = (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(teacher.pixels(student), expected, atol=1e-5, rtol=1e-5)


def test_random_teacher_is_seeded_and_leaves_the_global_generator_alone():
    cfg = model_cfg()
    torch.manual_seed(5)
    state = torch.get_rng_state()
    a, b = build_teacher(cfg), build_teacher(cfg)
    assert torch.equal(torch.get_rng_state(), state)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    assert all(not p.requires_grad for p in a.model.parameters()) and not a.model.training


def test_resample_grid_halves_by_averaging_two_by_two_neighbourhoods():
    features = torch.randn(2, 36, 5)
    out = resample_grid(features, 3)
    expected = features.view(2, 3, 2, 3, 2, 5).mean(dim=(2, 4)).reshape(2, 9, 5)
    torch.testing.assert_close(out, expected)
    assert resample_grid(features, 6) is features


def test_a_local_dinov2_folder_is_the_teacher_with_its_own_statistics(tmp_path):
    torch.manual_seed(0)
    dino = Dinov2Model(Dinov2Config(**TINY_DINO)).eval()
    folder = save(dino, tmp_path / "dino", mean=[0.1, 0.2, 0.3])
    teacher = build_teacher(model_cfg(f"model.alignment.teacher={folder}"))
    assert teacher.mean == (0.1, 0.2, 0.3) and teacher.std == (0.5, 0.5, 0.5)
    assert teacher.image_size == 16 and teacher.hidden_size == 32  # the student's 4 x 4 grid, 4-px patches
    pixels = torch.randn(3, 3, 32, 32)
    expected = dino(pixel_values=teacher.pixels(pixels)).last_hidden_state[:, 1:]
    torch.testing.assert_close(teacher.features(pixels), expected)
    assert teacher.forward_calls == 1


def test_register_tokens_are_dropped_with_the_class_token(tmp_path):
    torch.manual_seed(0)
    dino = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY_DINO, num_register_tokens=4)).eval()
    teacher = build_teacher(model_cfg(f"model.alignment.teacher={save(dino, tmp_path / 'reg')}"))
    pixels = torch.randn(1, 3, 32, 32)
    expected = dino(pixel_values=teacher.pixels(pixels)).last_hidden_state[:, 5:]
    assert teacher.features(pixels).shape == (1, 16, 32)
    torch.testing.assert_close(teacher.features(pixels), expected)


def test_a_larger_teacher_grid_is_resampled_to_the_students(tmp_path):
    torch.manual_seed(0)
    folder = save(Dinov2Model(Dinov2Config(**TINY_DINO)), tmp_path / "dino")
    teacher = build_teacher(model_cfg(f"model.alignment.teacher={folder}", "model.alignment.teacher_image_size=32"))
    assert teacher.features(torch.randn(2, 3, 32, 32)).shape == (2, 16, 32)  # 8 x 8 teacher patches -> 4 x 4


def test_bad_teacher_folders_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        build_teacher(model_cfg(f"model.alignment.teacher={tmp_path / 'missing'}"))
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=16, patch_size=4))
    with pytest.raises(UserError, match="holds a 'clip_vision_model' model"):
        build_teacher(model_cfg(f"model.alignment.teacher={save(clip, tmp_path / 'clip')}"))
    folder = save(Dinov2Model(Dinov2Config(**TINY_DINO)), tmp_path / "dino")
    with pytest.raises(UserError, match="not a multiple of the teacher's patch size 4"):
        build_teacher(model_cfg(f"model.alignment.teacher={folder}", "model.alignment.teacher_image_size=18"))
