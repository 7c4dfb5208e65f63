"""Molmo2VLM equals transformers' Molmo2ForConditionalGeneration (tiny random models read from
save_pretrained folders, fp32): padded rows, packed rows, and the q/k norm and both-ways image
attention each matter."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmscale.errors import UserError
from mmscale.models.hf.molmo2 import read_folder
from tests.helpers.molmo2 import COL, VOCAB, hf_inputs, make_pair, our_images, samples


@pytest.mark.parametrize("variant", [
    {},  # Molmo2-8B: Qwen3's per-head q/k norm
    {"qk_norm_type": "olmo", "norm_after": True},  # Molmo2-O: OLMo's whole-projection norm, norms after
    {"qkv_bias": True},
])
def test_padded_and_packed_rows_match_transformers(tmp_path, variant):
    theirs, ours = make_pair(tmp_path, **variant)
    batch = samples(torch.Generator().manual_seed(1))
    inputs = hf_inputs(batch)
    with torch.no_grad():
        expected = theirs(**inputs).logits
        padded = ours.logits(inputs["input_ids"], **our_images(batch))
        packed_ids = torch.tensor([batch[0]["ids"] + batch[1]["ids"]])
        lengths = [len(s["ids"]) for s in batch]
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        segments = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)])[None]
        packed = ours.logits(packed_ids, **our_images(batch), position_ids=positions, segment_ids=segments)
    assert expected.shape[-1] == VOCAB and padded.shape[-1] == VOCAB  # the image markers are never predicted
    for row, n in enumerate(lengths):
        torch.testing.assert_close(padded[row, :n], expected[row, :n], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[0], torch.cat([expected[r, :n] for r, n in enumerate(lengths)]),
                               atol=1e-5, rtol=0)


def _gap(theirs, ours, batch) -> float:
    inputs = hf_inputs(batch)
    with torch.no_grad():
        expected = theirs(**inputs).logits
        got = ours.logits(inputs["input_ids"], **our_images(batch))
    n = len(batch[0]["ids"])
    return float((got[0, :n] - expected[0, :n]).abs().max())


def test_negative_controls_fail_parity(tmp_path, monkeypatch):
    """Each Molmo2 difference from a LLaVA-style model matters: without it the logits are far off."""
    theirs, ours = make_pair(tmp_path)
    batch = samples(torch.Generator().manual_seed(1))
    assert _gap(theirs, ours, batch) < 1e-5
    with monkeypatch.context() as m:  # image tokens causal like text
        m.setattr(ours, "both_ways", lambda ids: torch.zeros_like(ids, dtype=torch.bool))
        assert _gap(theirs, ours, batch) > 1e-2
    for attn in (layer.self_attn for layer in ours.language_model.layers):  # no q/k norm
        attn.q_norm = attn.k_norm = torch.nn.Identity()
    assert _gap(theirs, ours, batch) > 1e-2


def test_a_folder_missing_weights_is_refused_not_filled_at_random(tmp_path):
    """transformers' from_pretrained fills weights a folder lacks with random ones and only warns."""
    make_pair(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    del state["lm_head.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(UserError, match="does not hold a complete Molmo2 model.*lm_head.weight"):
        read_folder(str(tmp_path), column_id=COL)
