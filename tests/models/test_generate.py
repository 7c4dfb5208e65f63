"""Greedy decoding with a KV cache, a batch of prompts of different lengths at once, gives
every row the tokens that running its prompt alone, the whole sequence again at every step,
gives."""

from __future__ import annotations

import pytest
import torch

from mmscale.config import load_recipe
from mmscale.data.tokenizer import image_token_id, load_tokenizer
from mmscale.eval.prompts import build_prompt_encoder
from mmscale.eval.samples import read_eval_samples
from mmscale.models import build_model
from mmscale.models.generate import greedy, producible
from tests.helpers.recipes import CROSS_ATTENTION_OVERRIDES, REPO, TINY_OVERRIDES, tiny_with

NEW_TOKENS = 6
PROMPTS = 6


def recompute(model, inputs: dict[str, torch.Tensor], length: int, banned: set[int]) -> list[int]:
    """The definition: row 0 of `inputs` cut to `length`, the whole sequence run for every token."""
    inputs = {k: v[:, :length] if k in ("input_ids", "cross_attention_mask") else v for k, v in inputs.items()}
    tokens = []
    for _ in range(NEW_TOKENS):
        scores = model.logits(**inputs)[0, -1]
        scores[producible(banned, scores.shape[0])] = float("-inf")
        tokens.append(int(scores.argmax()))
        inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[tokens[-1]]])], dim=1)
        if "cross_attention_mask" in inputs:
            mask = inputs["cross_attention_mask"]
            inputs["cross_attention_mask"] = torch.cat([mask, mask[:, -1:]], dim=1)
    return tokens


def _setup(arch: str, demo_data):
    overrides = tiny_with(TINY_OVERRIDES, CROSS_ATTENTION_OVERRIDES if arch == "cross_attention" else [])
    cfg = load_recipe(str(REPO / "recipes" / "demo.yaml"), overrides).model
    tokenizer = load_tokenizer(demo_data / "tokenizer")
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer).eval()
    # Llama's init (std 0.02) makes a tiny random model say one token to everything; larger
    # weights give every row its own tokens, so a wrong mask or position changes some. The
    # cross-attention gates, which start closed, are opened so that the images count.
    for name, p in model.named_parameters():
        if p.dim() > 1:
            p.data.normal_(0, 0.2)
        elif name.endswith("_gate"):
            p.data.fill_(1.0)
    shards = [str(p) for p in sorted((demo_data / "eval").glob("*.tar"))]
    raws = [s.raw for s in read_eval_samples(shards, PROMPTS)]
    return model, build_prompt_encoder(cfg, tokenizer), raws, {image_token_id(tokenizer)}


@pytest.mark.parametrize("arch", ["decoder", "cross_attention"])
def test_cached_batch_decoding_equals_recomputing_each_prompt_alone(arch, demo_data):
    model, prompts, raws, banned = _setup(arch, demo_data)
    inputs, lengths = prompts(raws)
    assert len(set(lengths.tolist())) > 1  # the batch really is padded
    batched = greedy(model, inputs, NEW_TOKENS, banned, lengths=lengths)
    for row, raw in enumerate(raws):
        alone, length = prompts([raw])
        reference = recompute(model, alone, int(length[0]), banned)
        assert batched[row] == reference, (row, batched[row], reference)
    # The images matter: another row's image changes the answer of some row.
    swapped = dict(inputs, pixel_values=inputs["pixel_values"].roll(1, 0))
    assert greedy(model, swapped, NEW_TOKENS, banned, lengths=lengths) != batched


def test_a_row_stops_at_its_stop_token_and_the_others_go_on(demo_data):
    model, prompts, raws, banned = _setup("decoder", demo_data)
    inputs, lengths = prompts(raws)
    free = greedy(model, inputs, NEW_TOKENS, banned, lengths=lengths)
    stop = {free[0][1]}  # row 0's second token
    stopped = greedy(model, inputs, NEW_TOKENS, banned, stop, lengths)
    for full, cut in zip(free, stopped):
        end = next((i + 1 for i, t in enumerate(full) if t in stop), len(full))
        assert cut == full[:end]
    assert len(stopped[0]) <= 2


def test_cross_attention_projects_the_images_keys_and_values_once_per_prompt(demo_data):
    """Each cross-attention layer projects the images to keys and values at the prompt's forward;
    the answer's tokens reuse them (the equality with recomputing is the test above)."""
    model, prompts, raws, banned = _setup("cross_attention", demo_data)
    inputs, lengths = prompts(raws)
    calls = []
    handles = [layer.cross_attn.k_proj.register_forward_hook(lambda *_: calls.append(1))
               for layer in model.language_model.cross_layers]
    try:
        answers = greedy(model, inputs, NEW_TOKENS, banned, lengths=lengths)
    finally:
        for handle in handles:
            handle.remove()
    assert max(len(a) for a in answers) == NEW_TOKENS  # several steps ran
    assert len(calls) == len(model.language_model.cross_layers)
