"""The processor written beside an export prepares images as mmscale's loader does."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mmscale.config.model import DecoderModelConfig
from mmscale.convert.release_files import llava_image_processor
from mmscale.data.images import image_to_tensor
from tests.helpers.recipes import toy_vision


def _photo(width: int, height: int, seed: int) -> bytes:
    """Random pixels: every resampling or cropping difference shows."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["pad", "crop", "squash"])
@pytest.mark.parametrize("size", [(57, 31), (20, 13), (31, 57), (48, 48), (200, 90)])
def test_llava_processor_gives_the_loaders_pixels(mode, size):
    vision = toy_vision(image_size=32, patch_size=8, hidden_size=8, num_layers=1, num_heads=1, resize=mode)
    processor = llava_image_processor(DecoderModelConfig(vision=vision))
    data = _photo(*size, seed=sum(size))
    ours = image_to_tensor(data, vision)
    theirs = processor(Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"][0]
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["decoder", "cross_attention"])
def test_a_release_processor_renders_image_parts_as_its_own_image_token(arch, demo_data, tmp_path):
    """The chat template gets the image token from the released tokenizer's special tokens, not
    from its '<image>' fallback: with Llama 3.2 Vision's '<|image|>' a list-of-parts prompt is the
    string form training renders."""
    from transformers import AutoProcessor

    from mmscale.config import load_recipe
    from mmscale.convert.release_files import write_processor
    from mmscale.data.tokenizer import load_tokenizer
    from tests.helpers.recipes import CROSS_ATTENTION_OVERRIDES, REPO

    tok = load_tokenizer(demo_data / "tokenizer")
    tok.add_special_tokens({"additional_special_tokens": ["<|image|>"]})
    tok.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok", image_token="<|image|>")
    overrides = CROSS_ATTENTION_OVERRIDES if arch == "cross_attention" else []
    write_processor(load_recipe(REPO / "recipes" / "demo.yaml", overrides).model, tok, tmp_path / "release")
    processor = AutoProcessor.from_pretrained(tmp_path / "release")
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    text = [{"role": "user", "content": "<|image|>\nHow many?"}]
    assert processor.apply_chat_template(parts, add_generation_prompt=True) == \
        tok.apply_chat_template(text, tokenize=False, add_generation_prompt=True) == \
        "<|bos|><|user|>\n<|image|>\nHow many?<|end|>\n<|assistant|>\n"
