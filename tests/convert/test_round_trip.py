"""`mmscale convert --from hf ... --to mmscale` and back: a released folder survives bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration, MllamaForConditionalGeneration, Molmo2ForConditionalGeneration

from mmscale.cli import main
from mmscale.convert.mmscale_folder import UNUSED
from mmscale.data.multicrop import END, IMAGE_MARKERS, LOW_RES_START, PATCH, START
from mmscale.data.tokenizer import load_tokenizer
from mmscale.models.hf.folder import read_state_dict
from tests.helpers.cross_attention import open_gates
from tests.helpers.llava import hf_config as llava_hf_config
from tests.helpers.mllama import tiny_hf_config
from tests.helpers.molmo2 import hf_config


def _molmo2_release(folder: Path, tokenizer_dir: Path) -> Molmo2ForConditionalGeneration:
    """A tiny Molmo2 release: the demo tokenizer with Molmo2's image tokens, their ids in the config."""
    tokenizer = load_tokenizer(tokenizer_dir)
    base = len(tokenizer)
    tokenizer = load_tokenizer(tokenizer_dir, layout_tokens=IMAGE_MARKERS)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in IMAGE_MARKERS}
    config = hf_config()
    config.text_config.vocab_size = base
    config.image_patch_id, config.image_start_token_id = ids[PATCH], ids[START]
    config.low_res_image_start_token_id, config.image_end_token_id = ids[LOW_RES_START], ids[END]
    config.frame_start_token_id, config.frame_end_token_id = ids[START], ids[END]
    model = Molmo2ForConditionalGeneration(config)
    tokenizer.save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({
        "image_processor": {"max_crops": 4, "overlap_margins": [1, 1], "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
        "image_use_col_tokens": True, "use_single_crop_col_tokens": False}))
    return model


def _original(kind: str, folder: Path, dtype: torch.dtype, tokenizer_dir: Path) -> None:
    torch.manual_seed(0)
    if kind == "molmo2":
        model = _molmo2_release(folder, tokenizer_dir)
    elif kind == "mllama":
        model = MllamaForConditionalGeneration(tiny_hf_config())
        open_gates(model)  # gates at 0 would make the cross-attention weights invisible to the check
    else:
        model = LlavaForConditionalGeneration(llava_hf_config(kind.removeprefix("llava-")))
    model.to(dtype).save_pretrained(folder)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["llava-clip", "llava-siglip", "mllama", "molmo2"])
def test_hf_to_mmscale_to_hf_gives_bit_identical_tensors(kind, dtype, demo_data, tmp_path, capsys):
    """With default flags: a bf16 release comes back bf16, stored as bf16 in between."""
    original, ours, back = tmp_path / "original", tmp_path / "mmscale", tmp_path / "back"
    _original(kind, original, dtype, demo_data / "tokenizer")
    main(["convert", "--from", "hf", str(original), "--to", "mmscale", str(ours)])
    main(["convert", str(ours), "--to", "hf", str(back)])
    printed = capsys.readouterr().out
    assert "greedy 10 tokens identical" in printed

    assert {t.dtype for t in read_state_dict(ours).values()} == {dtype}
    before, after = read_state_dict(original), read_state_dict(back)
    assert before.keys() == after.keys()
    changed = [k for k in before if before[k].dtype != after[k].dtype or not torch.equal(before[k], after[k])]
    assert not changed
    # LLaVA-1.5's CLIP: the last block and the final LayerNorm are never run, yet come back.
    kept = sorted(read_state_dict(ours / UNUSED)) if (ours / UNUSED).is_dir() else []
    if kind == "llava-clip":
        assert any(".layers.1." in k for k in kept) and any("post_layernorm" in k for k in kept)
        assert f"kept {len(kept)} weights the model does not run" in printed
