"""Molmo2VLM equals transformers' Molmo2ForConditionalGeneration (tiny random models read from
save_pretrained folders, fp32): padded rows, packed rows, and the q/k norm and both-ways image
attention each matter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Molmo2Config, Molmo2ForConditionalGeneration

from mmscale.errors import UserError
from mmscale.models.hf.molmo2 import crops_to_hf, read_folder
from mmscale.models.molmo2 import Molmo2VLM

VOCAB, EXTRA = 100, 8
START, END, PATCH, COL, LOW_START = 100, 101, 102, 103, 104
SIZE, PATCH_PX = 56, 14  # 4 x 4 patches per crop
PATCHES = (SIZE // PATCH_PX) ** 2


def hf_config(qk_norm_type: str = "qwen3", norm_after: bool = False, qkv_bias: bool = False) -> Molmo2Config:
    return Molmo2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=4, head_dim=8, image_size=[SIZE, SIZE], patch_size=PATCH_PX),
        adapter_config=dict(vision_feature_layer=[-1, 0], hidden_size=32, num_attention_heads=4,
                            num_key_value_heads=4, head_dim=8, intermediate_size=48, text_hidden_size=64),
        text_config=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         vocab_size=VOCAB, additional_vocab_size=EXTRA, num_hidden_layers=2, intermediate_size=96,
                         qk_norm_type=qk_norm_type, norm_after=norm_after, attention_bias=qkv_bias,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        image_start_token_id=START, image_end_token_id=END, image_patch_id=PATCH,
        low_res_image_start_token_id=LOW_START, frame_start_token_id=105, frame_end_token_id=106,
    )


def make_pair(tmp_path, **kwargs) -> tuple[Molmo2ForConditionalGeneration, Molmo2VLM]:
    torch.manual_seed(0)
    theirs = Molmo2ForConditionalGeneration(hf_config(**kwargs)).eval()
    with torch.no_grad():
        # transformers' N(0, 0.02) weights shrink the image features to nothing by the LLM, and its
        # norms start at 1 and biases at 0: give every weight a unit-gain scale and the rest noise,
        # so an error anywhere on the image path shows in the logits.
        for name, p in theirs.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(std=p.shape[1] ** -0.5)
            elif "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    theirs.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_crops": 4, "overlap_margins": [1, 1]}))
    cfg, tokens, state = read_folder(str(tmp_path), column_id=COL)
    ours = Molmo2VLM(cfg, VOCAB, tokens).eval()
    ours.load_state_dict(state)
    return theirs, ours


def image_tokens(overview: tuple[int, int], high: tuple[int, int]) -> list[int]:
    """Molmo2's layout of one image: the overview's rows, then the crops' (each row ends in <im_col>)."""
    def rows(h: int, w: int) -> list[int]:
        return ([PATCH] * w + [COL]) * h
    return [LOW_START, *rows(*overview), END, START, *rows(*high), END]


def image(crops: int, high: tuple[int, int], gen: torch.Generator) -> dict:
    """Random crops and a pooling table: the overview pools crop 0's 2x2 windows, the high-resolution
    rows pool random patches of the other crops, with some -1 (padding) slots."""
    overview = torch.arange(PATCHES).view(2, 2, 2, 2).permute(0, 2, 1, 3).reshape(4, 4)
    tokens = high[0] * high[1]
    pooled = torch.randint(PATCHES, crops * PATCHES, (tokens, 4), generator=gen)
    pooled[torch.rand(tokens, 4, generator=gen) < 0.25] = -1
    pooled[:, 0] = pooled[:, 0].clamp(min=PATCHES)  # at least one patch per window
    return {"crops": torch.randn(crops, 3, SIZE, SIZE, generator=gen), "pooling": torch.cat([overview, pooled]),
            "grid": [2, 2, *high], "ids": image_tokens((2, 2), high)}


def samples(gen: torch.Generator) -> list[dict]:
    """Two prompts: one image amid text; two images, the first right after the start token."""
    first = [image(3, (2, 3), gen)]
    second = [image(2, (1, 2), gen), image(4, (3, 2), gen)]
    text = lambda n: torch.randint(1, 90, (n,), generator=gen).tolist()  # noqa: E731
    return [
        {"ids": text(3) + first[0]["ids"] + text(5), "images": first},
        {"ids": [1] + second[0]["ids"] + text(2) + second[1]["ids"] + text(4), "images": second},
    ]


def hf_inputs(batch: list[dict]) -> dict:
    """transformers' inputs: right-padded rows, per-image pooling tables (their own crops' indices)."""
    longest = max(len(s["ids"]) for s in batch)
    ids = torch.zeros(len(batch), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(batch):
        ids[i, : len(s["ids"])] = torch.tensor(s["ids"])
        mask[i, : len(s["ids"])] = 1
    images = [im for s in batch for im in s["images"]]
    return {
        "input_ids": ids, "attention_mask": mask,
        "mm_token_type_ids": torch.isin(ids, torch.tensor([START, END, PATCH, COL, LOW_START])).long() * mask,
        "pixel_values": torch.cat([crops_to_hf(im["crops"], PATCH_PX) for im in images]),
        "image_token_pooling": torch.cat([im["pooling"] for im in images]),
        "image_grids": torch.tensor([im["grid"] for im in images]),
        "image_num_crops": torch.tensor([len(im["crops"]) for im in images]),
    }


def our_images(batch: list[dict]) -> dict:
    """Ours: all crops in order, pooling indices into the batch's flattened patches."""
    crops, pooling, offset = [], [], 0
    for im in (im for s in batch for im in s["images"]):
        crops.append(im["crops"])
        pooling.append(torch.where(im["pooling"] >= 0, im["pooling"] + offset, -1))
        offset += len(im["crops"]) * PATCHES
    return {"pixel_values": torch.cat(crops), "image_pooling": torch.cat(pooling)}


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
