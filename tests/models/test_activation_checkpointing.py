"""Activation checkpointing of the vision towers: the same outputs and gradients, less stored."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from mmscale.config.towers import TiledVisionConfig
from mmscale.models import vision
from mmscale.models.mllama_vision import TiledVisionEncoder
from mmscale.models.vision import VisionTower
from tests.helpers.recipes import toy_vision

CLIP = toy_vision(
    family="clip", image_size=32, patch_size=8, hidden_size=32, num_layers=4, num_heads=2, intermediate_size=64,
    feature_layers=(-2, 0),  # the last built block and the embedding output, both checkpoint boundaries
)
# Three local layers of which two are kept, two global ones; images of 2 and 1 tiles of 3 slots
# (padding tiles, and padding tokens after each tile's 17, are masked).
TILED = TiledVisionConfig(
    image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_global_layers=2, num_heads=2,
    intermediate_size=64, max_num_tiles=3, intermediate_layers=(0, 1), supported_aspect_ratios=((1, 1), (1, 2)),
)


def _tower(kind: str, checkpointing: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "clip":
        return VisionTower(CLIP.model_copy(update={"activation_checkpointing": checkpointing})).train()
    return TiledVisionEncoder(TILED.model_copy(update={"activation_checkpointing": checkpointing})).train()


def _forward(tower: torch.nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if isinstance(tower, VisionTower):
        return tower(torch.randn(2, 3, 32, 32, generator=gen))
    tiles = torch.tensor([[[1, 1, 0]], [[1, 0, 0]]])
    pixels = torch.randn(2, 1, 3, 3, 32, 32, generator=gen) * tiles[..., None, None, None]
    return tower(pixels, torch.tensor([[2], [1]]), tiles)


def _loss(features: torch.Tensor) -> torch.Tensor:
    # Random weights, so every feature (each kept layer's too) sends back its own gradient.
    return (features * torch.randn(features.shape, generator=torch.Generator().manual_seed(2))).sum()


@pytest.mark.parametrize("kind", ["clip", "tiled"])
def test_checkpointing_gives_the_same_features_and_gradients(kind):
    results = []
    for checkpointing in (False, True):
        tower = _tower(kind, checkpointing)
        features = _forward(tower)
        _loss(features).backward()
        results.append((features.detach(), {name: p.grad for name, p in tower.named_parameters()}))
    (plain, plain_grads), (ckpt, ckpt_grads) = results
    torch.testing.assert_close(ckpt, plain, rtol=0, atol=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=0, atol=1e-6, msg=name)


def _saved_bytes(tower: torch.nn.Module) -> int:
    """Bytes of activations the forward stores for backward (parameters not counted)."""
    params = {p.untyped_storage().data_ptr() for p in tower.parameters()}
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        _forward(tower)
    return sum(storages.values())


@pytest.mark.parametrize("kind", ["clip", "tiled"])
def test_checkpointing_stores_less_for_backward(kind):
    plain, ckpt = _saved_bytes(_tower(kind, False)), _saved_bytes(_tower(kind, True))
    print(f"{kind}: {plain} bytes saved for backward without checkpointing, {ckpt} with")
    # A layer stores ~17 hidden-sized tensors without (inputs of norms, projections, attention,
    # the 4x wide MLP ones), its input alone with; the embeddings and the head are not checkpointed.
    assert ckpt < plain / 3


def test_only_a_training_forward_with_gradients_checkpoints(monkeypatch):
    calls = []
    real = vision.checkpoint
    monkeypatch.setattr(vision, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    tower = _tower("tiled", True)
    _forward(tower)
    assert len(calls) == TILED.num_layers + TILED.num_global_layers
    calls.clear()
    tower.requires_grad_(False)  # a frozen tower: nothing to recompute for
    _forward(tower)
    tower.requires_grad_(True).eval()
    _forward(tower)
    with torch.no_grad():
        _forward(tower.train())
    assert not calls
