"""The vision tower against transformers' CLIP / SigLIP towers, feature selection, and connectors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from mmscale.config.model import ConnectorConfig, DecoderModelConfig, LLMConfig
from mmscale.models.connector import Connector, build_connector, merge_patches
from mmscale.models.decoder_vlm import DecoderVLM
from mmscale.models.vision import VisionTower
from tests.helpers.recipes import toy_vision

SIZES = {
    "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 2,
    "image_size": 32, "patch_size": 8,
}


def _hf_tower(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "clip":
        return CLIPVisionModel(CLIPVisionConfig(**SIZES)).eval()
    return SiglipVisionModel(SiglipVisionConfig(**SIZES, vision_use_head=False)).eval()


def _our_tower(hf: torch.nn.Module, family: str, feature_layers: tuple[int, ...], post_norm: bool) -> VisionTower:
    c = hf.config
    cfg = toy_vision(
        family=family, image_size=c.image_size, patch_size=c.patch_size, hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        activation={"quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh"}[c.hidden_act],
        layer_norm_eps=c.layer_norm_eps, feature_layers=feature_layers, post_norm=post_norm,
    )
    tower = VisionTower(cfg).eval()
    # Same names as transformers: the tower's weights are a subset of the HF state dict.
    hf_state = hf.state_dict()
    tower.load_state_dict({name: hf_state[name] for name in tower.state_dict()})
    return tower


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("feature_layers", [(-2,), (0,), (-1, -3), (3,)])
def test_selected_hidden_states_match_transformers(family, feature_layers):
    hf = _hf_tower(family)
    tower = _our_tower(hf, family, feature_layers, post_norm=False)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        states = hf(pixels, output_hidden_states=True).hidden_states
        expected = torch.cat([states[i] for i in feature_layers], dim=-1)[:, 1 if family == "clip" else 0 :]
        ours = tower(pixels)
    diff = (ours - expected).abs().max().item()
    print(f"{family} feature_layers={feature_layers}: max abs diff {diff:.2e}")
    assert ours.shape == (2, 16, 32 * len(feature_layers))
    assert diff <= 1e-5


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_post_norm_features_match_transformers_final_layernorm(family):
    hf = _hf_tower(family)
    tower = _our_tower(hf, family, (-1,), post_norm=True)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # SigLIP's last_hidden_state is already post-normed; CLIP's is not.
        last = hf(pixels).last_hidden_state
        expected = hf.post_layernorm(last)[:, 1:] if family == "clip" else last
        diff = (tower(pixels) - expected).abs().max().item()
    print(f"{family} post-normed last layer: max abs diff {diff:.2e}")
    assert diff <= 1e-5


def test_tower_builds_only_the_blocks_its_features_need():
    cfg = toy_vision(image_size=32, patch_size=8, hidden_size=32, num_layers=4, num_heads=2,
                       feature_layers=(-2, 1), post_norm=False)
    tower = VisionTower(cfg)
    assert cfg.feature_layer_ids == (3, 1) and len(tower.encoder.layers) == 3
    assert tower.post_layernorm is None
    # Every built parameter feeds the features: ZeRO needs each one to receive a gradient.
    tower(torch.randn(1, 3, 32, 32)).sum().backward()
    for name, param in tower.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "layers, message",
    [((), "feature_layers is empty"), ((5,), "out of range"), ((-6,), "out of range"), ((-1, 4), "same hidden state")],
)
def test_invalid_feature_layers_are_rejected(layers, message):
    with pytest.raises(ValidationError, match=message):
        toy_vision(num_layers=4, num_heads=2, hidden_size=32, feature_layers=layers)


def test_merge_patches_concatenates_each_2x2_neighbourhood_row_major():
    side, dim = 4, 3
    features = torch.arange(side * side, dtype=torch.float32).repeat_interleave(dim).view(1, side * side, dim)
    merged = merge_patches(features)
    assert merged.shape == (1, 4, 4 * dim)
    first_patch_of_each_slot = merged[0, :, ::dim]  # the patch index each feature slot came from
    expected = torch.tensor([[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]], dtype=torch.float32)
    torch.testing.assert_close(first_patch_of_each_slot, expected)


def test_pool_connector_rejects_an_odd_grid():
    vision = toy_vision(image_size=24, patch_size=8, hidden_size=32, num_heads=2)
    with pytest.raises(ValueError, match="vision grid is 3x3"):
        ConnectorConfig(type="pool_mlp").tokens_per_crop(vision)


@pytest.mark.parametrize(
    "kind, in_features, has_second", [("linear", 32, False), ("mlp", 32, True), ("pool_mlp", 128, True)]
)
def test_connector_types(kind, in_features, has_second):
    connector = Connector(ConnectorConfig(type=kind, bias=False), 32, 64)
    assert connector.linear_1.in_features == in_features and connector.linear_1.bias is None
    assert (connector.linear_2 is not None) == has_second
    out = connector(torch.randn(2, 16, 32))
    assert out.shape == (2, 4 if kind == "pool_mlp" else 16, 64)


def test_molmo_connector_pools_each_window_by_attention_with_its_mean_as_query():
    """Checked against the attention written out by hand, one head at a time."""
    torch.manual_seed(0)
    cfg = DecoderModelConfig(
        vision=toy_vision(image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=2,
                          feature_layers=(-1, -2)),
        connector=ConnectorConfig(type="molmo", bias=False),
        llm=LLMConfig(hidden_size=48, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=80),
    )
    connector = build_connector(cfg)
    assert connector.w1.bias is None and connector.pool.wq.bias is not None  # Molmo's layout
    features = torch.randn(2, 16, 64)  # two layers of 32 concatenated, 4x4 grid
    out = connector(features)
    assert out.shape == (2, cfg.connector.tokens_per_crop(cfg.vision), 48) == (2, 4, 48)

    pool = connector.pool
    window = features.view(2, 2, 2, 2, 2, 64)[:, 1, :, 0, :, :].reshape(2, 4, 64)  # cell (1, 0)
    q, k, v = pool.wq(window.mean(1)), pool.wk(window), pool.wv(window)  # (2, 32), (2, 4, 32)
    heads = []
    for h in range(2):
        part = slice(16 * h, 16 * (h + 1))
        weights = torch.softmax(torch.einsum("nd,npd->np", q[:, part], k[..., part]) / 4.0, dim=-1)
        heads.append(torch.einsum("np,npd->nd", weights, v[..., part]))
    pooled = pool.wo(torch.cat(heads, dim=-1))
    expected = connector.w2(F.silu(connector.w1(pooled)) * connector.w3(pooled))
    torch.testing.assert_close(out[:, 2], expected)  # row-major: cell (1, 0) is token 2


def _vlm(vision: dict, connector: str) -> DecoderVLM:
    torch.manual_seed(0)
    cfg = DecoderModelConfig(
        vision=toy_vision(image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=2, **vision),
        connector=ConnectorConfig(type=connector),
        llm=LLMConfig(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=128),
    )
    return DecoderVLM(cfg, 64, image_token_id=3)


@pytest.mark.parametrize(
    "vision, connector, tokens, width",
    [
        # LLaVA-1.5: the class token is dropped.
        ({"family": "clip", "feature_layers": (-2,), "post_norm": False}, "mlp", 16, 32),
        # Molmo-style: two layers concatenated, then 2x2 pooling.
        ({"family": "siglip", "feature_layers": (-1, -3)}, "pool_mlp", 4, 4 * 64),
    ],
)
def test_image_token_count_and_connector_width_follow_the_config(vision, connector, tokens, width):
    model = _vlm(vision, connector)
    assert model.image_token_count == tokens
    assert model.connector.linear_1.in_features == width
    input_ids = torch.randint(10, 64, (2, 40))
    input_ids[0, 2 : 2 + tokens] = 3
    input_ids[1, 1 : 1 + 2 * tokens] = 3
    pixels = torch.randn(3, 3, 32, 32)
    embeds = model.embed(input_ids, pixels)
    features = model.connector(model.vision_tower(pixels))
    torch.testing.assert_close(embeds[1, 1 + tokens : 1 + 2 * tokens], features[2])
    model(input_ids, input_ids, pixels).backward()
    assert all(p.grad is not None for p in model.parameters())
