"""LLaVA import and export against transformers' LlavaForConditionalGeneration, by logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from mmscale.config.model import DecoderModelConfig
from mmscale.errors import UserError
from mmscale.models.decoder_vlm import DecoderVLM
from mmscale.models.hf.llava import (
    config_from_hf,
    config_to_hf,
    load_decoder_vlm_state,
    load_llava,
    state_dict_from_hf,
    state_dict_to_hf,
)
from tests.helpers.llava import IMAGE_ID, PAD_ID, SAMPLES, TOKENS, VARIANTS, VOCAB, hf_config


@pytest.fixture(scope="module", params=list(VARIANTS))
def saved(request, tmp_path_factory):
    """A tiny random transformers LLaVA, saved to a folder, and our import of it."""
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(hf_config(request.param)).eval()
    with torch.no_grad():  # Qwen2's q/k/v biases start at 0 in transformers: random, so a dropped one shows
        for name, p in hf.named_parameters():
            if "language_model" in name and name.endswith("bias"):
                p.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, load_llava(folder).eval(), folder


def _hf_logits(hf, ids: torch.Tensor, pixels: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits


def _report(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    diff = (ours - theirs).abs().max().item()
    print(f"{name}: max abs logit diff {diff:.2e}")
    assert diff <= 1e-5


def test_import_reads_the_config(saved):
    variant, _, model, _ = saved
    vision = model.cfg.vision
    tower = variant.split("_")[0]
    assert vision.family == tower and not vision.post_norm
    assert vision.feature_layers == ((-2,) if tower == "clip" else (-3, -1))
    assert vision.activation == ("quick_gelu" if tower == "clip" else "gelu_tanh")
    assert model.image_token_id == IMAGE_ID and model.image_token_count == TOKENS
    assert model.cfg.llm.tie_embeddings == (tower == "siglip")
    assert (model.cfg.llm.qkv_bias, model.cfg.llm.qk_norm) == (variant.endswith("qwen2"), variant.endswith("qwen3"))
    assert model.connector.linear_1.in_features == 32 * len(vision.feature_layers)
    assert (model.connector.linear_1.bias is None) == (tower == "siglip")


def test_padded_batch_logits_match_transformers(saved):
    variant, hf, model, _ = saved
    length = max(len(ids) for ids, _ in SAMPLES)
    ids = torch.full((2, length), PAD_ID)
    mask = torch.zeros(2, length, dtype=torch.long)
    for row, (sample, _) in enumerate(SAMPLES):
        ids[row, : len(sample)], mask[row, : len(sample)] = sample, 1
    pixels = torch.cat([p for _, p in SAMPLES])
    with torch.no_grad():
        ours = model.logits(ids, pixels)
    theirs = _hf_logits(hf, ids, pixels, mask)
    real = mask.bool()
    _report(f"{variant} padded batch", ours[real], theirs[real])


def test_packed_row_logits_match_transformers_per_sample(saved):
    variant, hf, model, _ = saved
    ids = torch.cat([s for s, _ in SAMPLES] + [torch.full((3,), PAD_ID)])[None]
    positions = torch.cat([torch.arange(len(s)) for s, _ in SAMPLES] + [torch.arange(3)])[None]
    segments = torch.cat([torch.full((len(s),), n + 1) for n, (s, _) in enumerate(SAMPLES)] + [torch.zeros(3)])[None]
    with torch.no_grad():
        ours = model.logits(ids, torch.cat([p for _, p in SAMPLES]), positions, segments.long())
    start = 0
    for n, (sample, pixels) in enumerate(SAMPLES):
        theirs = _hf_logits(hf, sample[None], pixels)[0]
        _report(f"{variant} packed row, sample {n}", ours[0, start : start + len(sample)], theirs)
        start += len(sample)


def test_export_round_trips_through_transformers(saved):
    variant, _, model, _ = saved
    exported = LlavaForConditionalGeneration(LlavaConfig.from_dict(config_to_hf(model.cfg, VOCAB, IMAGE_ID)))
    result = exported.load_state_dict(state_dict_to_hf(model.state_dict(), model.cfg), strict=False)
    # A tied head is saved only as the embedding, as transformers itself saves it.
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    exported.tie_weights()
    ids, pixels = SAMPLES[1]
    with torch.no_grad():
        ours = model.logits(ids[None], pixels)
    _report(f"{variant} exported", ours, _hf_logits(exported.eval(), ids[None], pixels))


def test_released_checkpoint_key_layout_imports_the_same(saved):
    """transformers 4.x checkpoints (llava-hf) nest the tower in vision_model and the LM in language_model.model."""
    _, hf, model, _ = saved
    legacy = {}
    for key, tensor in hf.state_dict().items():
        key = key.replace("model.vision_tower.", "vision_tower.vision_model.")
        key = key.replace("model.language_model.", "language_model.model.")
        key = key.replace("model.multi_modal_projector.", "multi_modal_projector.")
        legacy["language_model.lm_head.weight" if key == "lm_head.weight" else key] = tensor
    state = state_dict_from_hf(legacy, model.cfg)
    ours = model.state_dict()
    assert set(state) <= set(ours) and set(ours) - set(state) <= {"language_model.lm_head.weight"}
    for key, tensor in state.items():
        assert torch.equal(tensor, ours[key]), key


def test_unbuilt_tower_parts_are_dropped_on_import(saved):
    variant, hf, model, _ = saved
    # CLIP reads layer -2 of 2: block 1 and the post-norm are never built.
    expected_blocks = 1 if variant.startswith("clip") else 2
    assert len(model.vision_tower.encoder.layers) == expected_blocks
    assert model.vision_tower.post_layernorm is None
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in hf.parameters())


def test_released_config_that_lists_only_non_defaults_is_completed():
    """llava-hf/llava-1.5-7b-hf's config.json leaves the 7B sizes to transformers' defaults."""
    released = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
        "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "text_config": {"model_type": "llama", "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
                        "vocab_size": 32064},
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                          "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                          "patch_size": 14, "projection_dim": 768},
    }
    cfg = config_from_hf(released)
    assert (cfg.llm.hidden_size, cfg.llm.num_layers, cfg.llm.vocab_size) == (4096, 32, 32064)
    assert cfg.vision.activation == "quick_gelu" and cfg.vision.depth == 23
    assert cfg.image_tokens == 576


def _edited_config(folder, **changes) -> dict:
    config = json.loads((folder / "config.json").read_text())
    for dotted, value in changes.items():
        section, _, key = dotted.rpartition("__")
        (config[section] if section else config)[key] = value
    return config


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"text_config__model_type": "mistral"}, "model_type 'mistral'"),
        ({"vision_config__hidden_act": "relu"}, "hidden_act 'relu'"),
        ({"projector_hidden_act": "relu"}, "projector_hidden_act 'relu'"),
        ({"vision_feature_select_strategy": "bogus"}, "not one transformers can read"),
    ],
)
def test_unsupported_settings_are_user_errors(saved, changes, message):
    _, _, _, folder = saved
    with pytest.raises(UserError, match=message):
        config_from_hf(_edited_config(folder, **changes))


def test_select_strategy_that_mixes_class_and_patch_tokens_is_rejected(saved):
    variant, _, _, folder = saved
    tower = variant.split("_")[0]
    other = "full" if tower == "clip" else "default"
    with pytest.raises(UserError, match=f"vision_feature_select_strategy '{other}' with a {tower} tower"):
        config_from_hf(_edited_config(folder, vision_feature_select_strategy=other))


def test_weights_that_do_not_fit_are_user_errors(saved):
    _, hf, model, _ = saved
    state = hf.state_dict()
    with pytest.raises(UserError, match="not part of a LLaVA model.*image_newline"):
        state_dict_from_hf({**state, "model.image_newline": torch.zeros(64)}, model.cfg)
    ours = state_dict_from_hf(state, model.cfg)
    del ours["connector.linear_1.weight"]
    fresh = DecoderVLM(model.cfg, VOCAB, IMAGE_ID)
    with pytest.raises(UserError, match="missing connector.linear_1.weight"):
        load_decoder_vlm_state(fresh, ours)


def test_a_model_llava_cannot_express_is_refused_on_export():
    with pytest.raises(UserError, match="post_norm=true"):
        config_to_hf(DecoderModelConfig(), VOCAB, IMAGE_ID)


def test_non_llava_folder_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(UserError, match="not a LlavaForConditionalGeneration"):
        load_llava(tmp_path)
