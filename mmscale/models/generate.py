"""Greedy decoding of one sample with either architecture's `logits`.

Every step runs the whole sequence again (no KV cache): a reference that is right by
construction, used to check exports token for token against transformers' `generate`.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn


def producible(ids: Collection[int], vocab_size: int) -> list[int]:
    """The `ids` a model with `vocab_size` outputs can produce: Mllama's `<|image|>`, say, lies
    past its output layer (transformers' `suppress_tokens` needs ids it can index)."""
    return sorted(i for i in ids if i < vocab_size)


@torch.no_grad()
def greedy(
    model: nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int, banned: set[int], stop: Collection[int] = ()
) -> list[int]:
    """The `new_tokens` ids `model` appends to `inputs["input_ids"]` (batch of 1), argmax over
    all but the `banned` ids (an image placeholder, which has no image behind it; ids past
    the output layer, like Mllama's `<|image|>`, are never produced anyway) at every step;
    fewer if one of the `stop` ids (end of turn, eos) comes first, which ends the list.

    `inputs` are `model.logits` keyword arguments. A cross-attention mask grows by repeating
    its last position, so new tokens see the images the prompt's last token saw (as
    transformers' Mllama does while generating).
    """
    inputs = dict(inputs)
    new: list[int] = []
    for _ in range(new_tokens):
        scores = model.logits(**inputs)[0, -1]
        scores[producible(banned, scores.shape[0])] = float("-inf")
        token = int(scores.argmax())
        new.append(token)
        if token in stop:
            break
        inputs["input_ids"] = torch.cat([inputs["input_ids"], inputs["input_ids"].new_tensor([[token]])], dim=1)
        if "cross_attention_mask" in inputs:
            mask = inputs["cross_attention_mask"]
            inputs["cross_attention_mask"] = torch.cat([mask, mask[:, -1:]], dim=1)
    return new
