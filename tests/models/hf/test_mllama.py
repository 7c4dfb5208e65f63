"""Import of transformers' MllamaForConditionalGeneration: config, weights, and logits parity."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import MllamaForConditionalGeneration

from mmscale.errors import UserError
from mmscale.models.cross_attention_vlm import CrossAttentionVLM
from mmscale.models.hf import mllama
from mmscale.models.hf.folder import read_state_dict
from mmscale.models.hf.mllama import config_from_hf, load_mllama, state_dict_from_hf, state_dict_to_hf
from tests.helpers.cross_attention import TINY, VOCAB, alone, make_sample, open_gates, pack_row, pad_batch
from tests.helpers.mllama import tiny_hf_config

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A saved random tiny Mllama with every gate open (at 0 parity would be trivial) and
    weights 2x transformers' N(0, 0.02), so every part moves the logits above TOLERANCE."""
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(tiny_hf_config()).eval()
    open_gates(model)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.mul_(2)
    folder = tmp_path_factory.mktemp("mllama")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(hf_folder):
    hf = MllamaForConditionalGeneration.from_pretrained(hf_folder).eval()
    return hf, load_mllama(hf_folder).eval()


def _hf_logits(hf: MllamaForConditionalGeneration, batch: dict) -> torch.Tensor:
    return hf(**{k: v for k, v in batch.items() if k not in ("position_ids", "segment_ids")}).logits


def test_config_maps_to_a_cross_attention_model_config(hf_folder):
    cfg = config_from_hf(json.loads((hf_folder / "config.json").read_text()))
    assert cfg == TINY.model_copy(update={"llm": TINY.llm.model_copy(update={"vocab_size": VOCAB})})


@pytest.mark.parametrize(
    "tiles", [[[1], [2], [4]], [[4, 1], [2, 3]]], ids=["one image per row, 1-4 tiles", "two images per row"]
)
def test_padded_batch_logits_equal_transformers(models, tiles):
    """Rows of different lengths whose image slots are all real: the batch equals transformers' batch."""
    hf, ours = models
    batch = pad_batch([make_sample(t, 9 - 2 * i, seed=i) for i, t in enumerate(tiles)])
    with torch.no_grad():
        expected, got = _hf_logits(hf, batch), ours.logits(**batch)
        images_matter = (expected - hf(input_ids=batch["input_ids"]).logits).abs().max().item()
    diff = (got - expected).abs().max().item()
    print(f"padded batch vs transformers: max abs diff {diff:.2e} (images change logits by {images_matter:.2e})")
    assert images_matter > 1e-2
    assert diff <= TOLERANCE


def test_rows_with_fewer_images_equal_transformers_on_the_sample_alone(models):
    """A row padded with empty image slots (and a text-only row) gives what transformers gives
    the sample alone. transformers' own batch differs there: its tokens that see no image
    (here the BOS) also attend to the empty slots, so a sample's logits depend on the other
    rows' image counts; ours do not."""
    hf, ours = models
    samples = [make_sample([4, 1], 5, seed=3), make_sample([2], 4, seed=2), make_sample([], 6, seed=6)]
    batch = pad_batch(samples)
    with torch.no_grad():
        got = ours.logits(**batch)
        worst = 0.0
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            worst = max(worst, (got[row, :n] - _hf_logits(hf, alone(sample))[0]).abs().max().item())
        batch_effect = (_hf_logits(hf, batch)[1, : len(samples[1]["input_ids"])] - got[1, : len(samples[1]["input_ids"])]).abs().max().item()
    print(f"rows vs transformers alone: max abs diff {worst:.2e}; transformers' batch effect {batch_effect:.2e}")
    assert worst <= TOLERANCE
    assert batch_effect > TOLERANCE  # the transformers behaviour we deliberately do not copy


def test_vision_features_equal_transformers(models):
    hf, ours = models
    batch = pad_batch([make_sample([3], 2, seed=4), make_sample([4, 2], 2, seed=5)])
    args = (batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"])
    with torch.no_grad():
        expected = hf.model.vision_model(*args).last_hidden_state
        got = ours.vision_tower(*args)
    diff = (got - expected).abs().max().item()
    print(f"vision features vs transformers: max abs diff {diff:.2e}")
    assert got.shape == expected.shape and diff <= TOLERANCE


# Packing changes the shapes every matmul and SDPA call sees, so fp32 rounds differently
# (a few ulps, ~5e-7 here); fp64 checks the semantics exactly.
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-10), (torch.float32, TOLERANCE)])
def test_packed_row_logits_equal_transformers_per_sample(models, dtype, tolerance):
    hf, ours = (copy.deepcopy(m).to(dtype) for m in models)
    samples = [make_sample(tiles, 5, seed=6 + i) for i, tiles in enumerate([[2], [], [1, 4], [3]])]
    for s in samples:
        s["pixel_values"] = s["pixel_values"].to(dtype)
    with torch.no_grad():
        packed = ours.logits(**pack_row(samples))[0]
        start, worst = 0, 0.0
        for s in samples:
            n = len(s["input_ids"])
            worst = max(worst, (packed[start : start + n] - _hf_logits(hf, alone(s))[0]).abs().max().item())
            start += n
    print(f"packed row vs transformers per sample ({dtype}): max abs diff {worst:.2e}")
    assert worst <= tolerance


def test_export_loads_in_transformers_with_the_same_logits(hf_folder, tmp_path):
    torch.manual_seed(1)
    ours = CrossAttentionVLM(config_from_hf(json.loads((hf_folder / "config.json").read_text())), VOCAB).eval()
    open_gates(ours, seed=1)
    exported = state_dict_to_hf(ours.state_dict())
    assert exported.keys() == read_state_dict(hf_folder).keys()
    assert state_dict_from_hf(exported).keys() == ours.state_dict().keys()
    exported = {k: v.contiguous() for k, v in exported.items()}
    save_file(exported, tmp_path / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(hf_folder / "config.json", tmp_path / "config.json")
    hf = MllamaForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = pad_batch([make_sample([2, 3], 4, seed=9)])
    with torch.no_grad():
        diff = (ours.logits(**batch) - _hf_logits(hf, batch)).abs().max().item()
    print(f"exported model in transformers: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_in_memory_transformers_names_map_too(models):
    hf, ours = models
    mapped = state_dict_from_hf(hf.state_dict())
    assert mapped.keys() == ours.state_dict().keys()
    torch.testing.assert_close(mapped["language_model.lm_head.weight"], ours.language_model.lm_head.weight)


def test_missing_weights_are_a_user_error_listing_them(hf_folder, tmp_path):
    state = read_state_dict(hf_folder)
    del state["language_model.model.layers.1.cross_attn.q_norm.weight"]
    save_file(state, tmp_path / "model.safetensors")
    shutil.copy(hf_folder / "config.json", tmp_path / "config.json")
    with pytest.raises(UserError, match=r"1 missing weights \['language_model.layers.1.cross_attn.q_norm.weight'\]"):
        load_mllama(tmp_path)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("text_config", "hidden_act", "gelu", "text_config.hidden_act='gelu' is not supported"),
        ("text_config", "rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4}, "rope_type='yarn' is not"),
        ("vision_config", "vision_output_dim", 64, "vision_config.vision_output_dim=64 is not supported"),
        ("vision_config", "image_size", [32, 48], r"vision_config.image_size=\[32, 48\] is not supported"),
    ],
)
def test_unsupported_settings_are_user_errors_naming_them(hf_folder, section, key, value, message):
    config = json.loads((hf_folder / "config.json").read_text())
    config[section][key] = value
    with pytest.raises(UserError, match=message):
        config_from_hf(config)


def test_llama3_rope_scaling_of_released_configs_is_read(hf_folder):
    config = json.loads((hf_folder / "config.json").read_text())
    text = config["text_config"]
    del text["rope_parameters"]
    text["rope_theta"] = 500000.0
    text["rope_scaling"] = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    llm = config_from_hf(config).llm
    assert llm.rope_theta == 500000.0 and llm.rope_scaling is not None and llm.rope_scaling.factor == 8.0


def test_llama3_rope_logits_equal_transformers(tmp_path):
    config = tiny_hf_config()
    # A short "pretraining context" so the scaling changes the frequencies these positions use.
    config.text_config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 16}
    torch.manual_seed(2)
    hf = MllamaForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path)
    ours = load_mllama(tmp_path).eval()
    assert ours.cfg.llm.rope_scaling is not None
    ids = torch.randint(2, VOCAB, (2, 40))
    with torch.no_grad():
        diff = (ours.logits(ids) - hf(input_ids=ids).logits).abs().max().item()
    print(f"llama3 rope, text only, vs transformers: max abs diff {diff:.2e}")
    assert diff <= TOLERANCE


def test_import_builds_on_the_meta_device_without_initialising(hf_folder, monkeypatch):
    """An 11B import must not first initialise 11B random weights on the CPU (as LLaVA's import,
    it builds on the meta device, then allocates and fills from the folder)."""
    built_on = []

    def recording(*args, **kwargs):
        built_on.append(torch.get_default_device().type)
        return CrossAttentionVLM(*args, **kwargs)

    monkeypatch.setattr(mllama, "CrossAttentionVLM", recording)
    load_mllama(hf_folder)
    assert built_on == ["meta"]
