import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmscale.alignment.teacher import build_teacher
from mmscale.config import load_recipe
from mmscale.demo.corpus import GRID, SCENE_OBJECTS, caption_set, make_sample
from mmscale.demo.toy_teacher import BACKGROUND, ToyTeacherConfig, patch_labels, rgb, train_toy_teacher
from mmscale.errors import UserError

GLYPHS = 16
IDS = {codepoint: i for i, (codepoint, _) in enumerate(caption_set(GLYPHS))}
KIND = {kind.name: IDS[kind.codepoint] for kind in SCENE_OBJECTS}


def test_scene_patches_name_the_object_in_their_grid_cell_and_nothing_else():
    size = 64
    for index in range(1, 81, 2):  # odd indices are scenes
        _, sample, png = make_sample(0, "train", index, size, caption_glyphs=GLYPHS)
        labels = patch_labels(rgb(png), sample["meta"], IDS, size // GRID).reshape(GRID, GRID)
        expected = np.full((GRID, GRID), BACKGROUND)
        for o in sample["meta"]["objects"]:
            expected[int(o["y"] // (size / GRID)), int(o["x"] // (size / GRID))] = 1 + KIND[o["name"]]
        assert (labels == expected).all(), (sample["id"], labels, expected)


def test_caption_patches_name_the_glyph_around_the_centre():
    for index in range(0, 40, 2):  # even indices are captions
        _, sample, png = make_sample(1, "train", index, 128, caption_glyphs=GLYPHS)
        labels = patch_labels(rgb(png), sample["meta"], IDS, 32).reshape(4, 4)
        glyph = 1 + IDS[int(sample["meta"]["codepoint"], 16)]
        assert set(np.unique(labels)) <= {BACKGROUND, glyph}
        assert (labels != BACKGROUND).sum() >= 2 and (labels[1:3, 1:3] == glyph).any()


def test_an_image_that_does_not_tile_is_refused():
    png = io.BytesIO()
    Image.new("RGB", (30, 30), "white").save(png, format="PNG")
    with pytest.raises(UserError, match="does not tile into 8-px patches"):
        patch_labels(rgb(png.getvalue()), {"codepoint": "1F408"}, IDS, 8)


def test_the_trained_teacher_learns_and_loads_as_viral_teacher(demo_data, tmp_path):
    cfg = ToyTeacherConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2, steps=40,
                           batch_size=32, lr=3e-3)
    folder = tmp_path / "teacher"
    facts = train_toy_teacher(demo_data, folder, cfg)
    assert facts["final_train_loss"] < 0.7 * facts["first_train_loss"]
    assert 0 < facts["covered_share"] < 1 and 0 <= facts["covered_patch_accuracy"] <= 1
    assert json.loads((folder / "toy_teacher.json").read_text())["config"]["steps"] == 40
    recipe = load_recipe("recipes/demo_viral.yaml", [
        "model.vision.image_size=32", "model.vision.patch_size=8", f"model.alignment.teacher={folder}",
    ])
    teacher = build_teacher(recipe.model)
    assert (teacher.image_size, teacher.hidden_size, teacher.mean) == (32, 32, (0.485, 0.456, 0.406))
    features = teacher.features(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 16, 32) and torch.isfinite(features).all()


def test_a_folder_that_is_not_a_demo_build_names_the_fix(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError, match="not a finished demo build.*mmscale shards demo"):
        train_toy_teacher(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
