"""The eval prompt is training's rendering of the user turn, cut where the answer starts."""

from __future__ import annotations

import json

import pytest
import torch

from mmscale.config import load_recipe
from mmscale.data.tokenizer import load_tokenizer
from mmscale.eval.prompts import build_prompt_encoder
from mmscale.eval.samples import read_eval_samples
from tests.helpers.recipes import CROSS_ATTENTION_OVERRIDES, REPO, TINY_OVERRIDES, tiny_with


@pytest.mark.parametrize("arch", ["decoder", "cross_attention"])
def test_prompt_is_the_user_turn_with_the_generation_prompt(arch, demo_data, eval_shards):
    overrides = tiny_with(TINY_OVERRIDES, CROSS_ATTENTION_OVERRIDES if arch == "cross_attention" else [])
    cfg = load_recipe(str(REPO / "recipes" / "demo.yaml"), overrides).model
    tokenizer = load_tokenizer(demo_data / "tokenizer")
    encode = build_prompt_encoder(cfg, tokenizer)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for sample in read_eval_samples([str(p) for p in sorted(eval_shards.glob("*.tar"))], 4):
        inputs, lengths = encode([sample.raw])
        user = json.loads(sample.raw["json"])["messages"][:1]
        text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        expected = [t for i in expected for t in ([i] * cfg.image_tokens if i == image_id else [i])]
        assert inputs["input_ids"].tolist() == [expected] and lengths.tolist() == [len(expected)]
        assert text.endswith("<|assistant|>\n")
        if arch == "decoder":
            assert inputs["pixel_values"].shape == (1, 3, cfg.vision.image_size, cfg.vision.image_size)
        else:
            # The image token and everything after it, up to the prompt's end, see the image's tiles.
            mask = inputs["cross_attention_mask"][0, :, 0]  # (tokens, tiles)
            start = expected.index(image_id)
            assert mask[:start].sum() == 0 and (mask[start:] == mask[start]).all() and mask[start].sum() > 0
            assert inputs["pixel_values"].shape[:3] == (1, 1, cfg.tiled_vision.max_num_tiles)
            assert torch.equal(inputs["aspect_ratio_mask"][0, 0], mask[start])
