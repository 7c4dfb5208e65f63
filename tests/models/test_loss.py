"""The loss normalisation of mmscale.models.loss, through both VLMs' forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmscale.config import load_recipe
from mmscale.data.tokenizer import IGNORE_INDEX
from mmscale.models.cross_attention_vlm import CrossAttentionVLM
from mmscale.models.decoder_vlm import DecoderVLM
from mmscale.models.loss import LossTokens, labelled_tokens
from tests.helpers.recipes import CROSS_ATTENTION_OVERRIDES, REPO, TINY_OVERRIDES, tiny_with

VOCAB, IMAGE_ID = 64, 3


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "decoder":
        return DecoderVLM(load_recipe(REPO / "recipes" / "demo.yaml", TINY_OVERRIDES).model, VOCAB, IMAGE_ID)
    overrides = tiny_with(TINY_OVERRIDES, CROSS_ATTENTION_OVERRIDES)
    cfg = load_recipe(REPO / "recipes" / "demo_cross_attention.yaml", overrides).model
    return CrossAttentionVLM(cfg, VOCAB)


def _text_batch() -> dict[str, torch.Tensor]:
    input_ids = torch.randint(10, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[0, :20] = IGNORE_INDEX  # 4 labelled next tokens in row 0, 23 in row 1
    return {"input_ids": input_ids, "labels": labels}


@pytest.mark.parametrize("arch", ["decoder", "cross_attention"])
def test_the_loss_is_the_summed_cross_entropy_over_the_steps_labelled_tokens(arch):
    model, batch = _model(arch), _text_batch()
    logits = model.logits(batch["input_ids"])
    per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                ignore_index=IGNORE_INDEX, reduction="none")
    assert labelled_tokens(batch["labels"]) == 27
    torch.testing.assert_close(model(**batch), per_token.sum() / 27)  # alone: its own mean
    torch.testing.assert_close(model(**batch, loss_tokens=LossTokens(labelled=100)), per_token.sum() / 100)


@pytest.mark.parametrize("arch", ["decoder", "cross_attention"])
def test_a_batch_without_labelled_tokens_gives_zero_not_nan(arch):
    model, batch = _model(arch), _text_batch()
    batch["labels"].fill_(IGNORE_INDEX)
    for tokens in (None, LossTokens(labelled=0), LossTokens(labelled=57)):
        loss = model(**batch, loss_tokens=tokens)
        assert loss.item() == 0.0
        loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
