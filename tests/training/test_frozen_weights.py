"""Frozen weights that come from model.pretrained stay out of the checkpoints: saved without them,
restored over a rebuild (the new vocabulary rows included), read back by conversion exactly as
the run trained with them, and refused when their folders changed. Real DeepSpeed (bf16, ZeRO-2)
on a world of one in-process; 2 ranks and ZeRO-3 in tests/test_user_configurations.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mmscale.config import load_recipe
from mmscale.convert.export import meta_model
from mmscale.convert.trained import consolidate, with_frozen_weights
from mmscale.errors import UserError
from mmscale.models.decoder_vlm import DecoderVLM
from mmscale.models.pretrained import load_pretrained
from mmscale.training import build_engine
from mmscale.training.checkpoint import MARKER, load_latest_checkpoint, save_checkpoint
from mmscale.training.freeze import freeze, frozen_from_pretrained
from tests.helpers.pretrained import write_pretrained_folders
from tests.helpers.recipes import REPO, TINY_OVERRIDES

RECIPE = REPO / "recipes" / "demo.yaml"
VOCAB, IMAGE_ID = 64, 3
# LLaVA's stage 1: only the connector trains; the tower and the LLM are frozen, from folders.
OVERRIDES = [*TINY_OVERRIDES, "train.trainable=align", "train.precision=bf16", "train.zero_stage=2"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """A SigLIP tower and a Llama LLM with a smaller vocabulary."""
    root = tmp_path_factory.mktemp("pretrained")
    write_pretrained_folders(load_recipe(RECIPE, OVERRIDES).model, VOCAB, root)
    return root


def _recipe(root: Path):
    return load_recipe(RECIPE, [*OVERRIDES, f"model.pretrained.vision={root / 'vision'}",
                                f"model.pretrained.llm={root / 'llm'}"])


def _build(recipe, seed: int):
    """The run's start: build (seeded), load the folders, freeze, then DeepSpeed."""
    torch.manual_seed(seed)
    model = DecoderVLM(recipe.model, vocab_size=VOCAB, image_token_id=IMAGE_ID)
    loaded = load_pretrained(model, recipe.model)
    freeze(model, recipe.trainable_parts)
    frozen = frozen_from_pretrained(model, loaded, recipe.model.pretrained, fingerprint=True)
    return build_engine(model, recipe.train), frozen


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def test_frozen_weights_are_left_out_and_come_back_exactly(world_of_one, folders, tmp_path):
    recipe = _recipe(folders)
    engine, frozen = _build(recipe, seed=0)
    assert frozen is not None
    assert {n.split(".")[0] for n in frozen.names} == {"vision_tower", "language_model"}
    assert frozen.new_rows["language_model.embed_tokens.weight"].shape == (8, 64)  # the LLM folder's vocabulary is 8 short
    trained = _weights(engine)

    lean = save_checkpoint(engine, tmp_path / "lean", 1, {"step": 1}, frozen=frozen)
    full = save_checkpoint(engine, tmp_path / "full", 1, {"step": 1})
    assert _bytes(lean) < _bytes(full) / 3  # the frozen tower and LLM are most of the model
    marker = json.loads((lean / MARKER).read_text())
    assert set(marker["frozen_from"]) == {str(folders / "vision"), str(folders / "llm")}
    state = consolidate(lean)
    assert not any(k.startswith(("vision_tower.", "language_model.")) for k in state)

    # Conversion: the checkpoint's weights plus the folders' and the new rows, as the run held them.
    model = meta_model(recipe.model, VOCAB, IMAGE_ID)
    completed = with_frozen_weights(state, model, recipe, lean, marker)
    assert completed.keys() == trained.keys()
    assert [k for k in trained if not torch.equal(completed[k].to(trained[k].dtype), trained[k])] == []

    # Resume: another seed draws other new rows and another connector; the checkpoint wins.
    again, frozen_again = _build(recipe, seed=1)
    assert not torch.equal(frozen_again.new_rows["language_model.embed_tokens.weight"],
                           frozen.new_rows["language_model.embed_tokens.weight"])
    assert load_latest_checkpoint(again, tmp_path / "lean", frozen_again) is not None
    resumed = _weights(again)
    assert all(torch.equal(resumed[k], trained[k]) for k in trained)


def test_changed_folders_are_refused_on_resume_and_on_conversion(world_of_one, folders, tmp_path):
    root = tmp_path / "pretrained"
    shutil.copytree(folders, root)
    recipe = _recipe(root)
    engine, frozen = _build(recipe, seed=0)
    path = save_checkpoint(engine, tmp_path / "run", 1, {"step": 1}, frozen=frozen)

    # Another fine-tune in the same place: same names and shapes, other values.
    weights = root / "llm" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-2] ^= 0xFF
    weights.write_bytes(bytes(data))
    changed, frozen_changed = _build(recipe, seed=0)
    with pytest.raises(UserError, match="model.safetensors changed"):
        load_latest_checkpoint(changed, tmp_path / "run", frozen_changed)
    marker = json.loads((path / MARKER).read_text())
    with pytest.raises(UserError, match="model.safetensors changed.*put back the folders"):
        with_frozen_weights(consolidate(path), meta_model(recipe.model, VOCAB, IMAGE_ID), recipe, path, marker)
    # A start that no longer loads its frozen weights from folders cannot use the checkpoint.
    with pytest.raises(UserError, match="holds no frozen weights"):
        load_latest_checkpoint(changed, tmp_path / "run", None)


def test_weights_frozen_as_initialised_stay_in_the_checkpoint(world_of_one, folders):
    """Without the LLM's folder the frozen LLM is its random initialisation: no folder gives it back."""
    recipe = load_recipe(RECIPE, [*OVERRIDES, f"model.pretrained.vision={folders / 'vision'}"])
    torch.manual_seed(0)
    model = DecoderVLM(recipe.model, vocab_size=VOCAB, image_token_id=IMAGE_ID)
    loaded = load_pretrained(model, recipe.model)
    freeze(model, recipe.trainable_parts)
    assert frozen_from_pretrained(model, loaded, recipe.model.pretrained, fingerprint=False) is None
