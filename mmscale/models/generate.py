"""Greedy decoding with a KV cache, for a batch of prompts of different lengths, with either
architecture's `logits`.

The prompts come right-padded, as the loader's collator pads them; every row's answer is
appended after the padded block and the pad columns in between are masked out of attention,
so the answers need no re-padding and the images, cross-attention masks and packing rules of
training apply unchanged. Positions come from each row's own length: a row's answer gets the
same rotary positions, and so the same logits, as with no padding at all.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
from torch import nn


def producible(ids: Collection[int], vocab_size: int) -> list[int]:
    """The `ids` a model with `vocab_size` outputs can produce: Mllama's `<|image|>`, say, lies
    past its output layer (transformers' `suppress_tokens` needs ids it can index)."""
    return sorted(i for i in ids if i < vocab_size)


class KVCache:
    """Each self-attention layer's keys and values of the tokens run so far.

    Before every forward the caller says which of its new tokens are real (`extend`); a
    token then attends to the real tokens at or before its own column. Layers find their
    slot by index (`layer`), so one cache serves both LLM layouts.
    """

    def __init__(self) -> None:
        self.keys: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.real: torch.Tensor | None = None  # (batch, columns so far) bool
        self.mask: torch.Tensor | None = None  # this forward's (batch, 1, new, columns) bool
        # A cross-attention model's encoded images and which are real, kept from the prompt's
        # forward for the answer's tokens (images are encoded once per prompt), and each
        # cross-attention layer's keys and values of them (projected once, not at every token).
        self.images: tuple[torch.Tensor, torch.Tensor] | None = None
        self.cross: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def extend(self, real: torch.Tensor) -> None:
        """Record the next forward's tokens, (batch, new) bool: False for padding."""
        self.real = real if self.real is None else torch.cat([self.real, real], dim=1)
        new, columns = real.shape[1], self.real.shape[1]
        causal = torch.ones(new, columns, dtype=torch.bool, device=real.device).tril(columns - new)
        self.mask = causal & self.real[:, None, None, :]

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self, index)


class LayerCache:
    """One layer's view of a `KVCache`: appends its new keys and values, hands back all of them."""

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    @property
    def mask(self) -> torch.Tensor:
        return self.cache.mask

    def cross(self, project: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """A cross-attention layer's keys and values of the images: `project()` at the prompt's
        forward, the same tensors for every token of the answer."""
        if self.index not in self.cache.cross:
            self.cache.cross[self.index] = project()
        return self.cache.cross[self.index]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (batch, kv_heads, new, head_dim) -> the layer's keys and values of every column."""
        past = self.cache.keys.get(self.index)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        self.cache.keys[self.index] = (k, v)
        return k, v


@torch.no_grad()
def greedy(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    new_tokens: int,
    banned: set[int],
    stop: Collection[int] = (),
    lengths: torch.Tensor | None = None,
) -> list[list[int]]:
    """For every row of `inputs["input_ids"]`, the `new_tokens` ids `model` appends, argmax over
    all but the `banned` ids (an image placeholder, which has no image behind it) at every
    step; a row's list ends early at the first of the `stop` ids (end of turn, eos), which it
    includes. Decoding goes on until every row has stopped.

    `inputs` are `model.logits` keyword arguments for right-padded rows of `lengths` real
    tokens (None: no padding). A cross-attention mask continues the row's last prompt token's
    (the answer sees the images the prompt's end saw, as in transformers' Mllama).
    """
    input_ids = inputs["input_ids"]
    batch, columns = input_ids.shape
    device = input_ids.device
    if lengths is None:
        lengths = torch.full((batch,), columns, device=device)
    lengths = lengths.to(device)
    rows = torch.arange(batch, device=device)
    cache = KVCache()
    cache.extend(torch.arange(columns, device=device) < lengths[:, None])
    positions = torch.arange(columns, device=device).expand(batch, -1)
    scores = model.logits(**{"position_ids": positions, **inputs}, cache=cache)[rows, lengths - 1]
    step_inputs = {}
    if "cross_attention_mask" in inputs:
        step_inputs["cross_attention_mask"] = inputs["cross_attention_mask"][rows, lengths - 1][:, None]
    answers: list[list[int]] = [[] for _ in range(batch)]
    running = set(range(batch))
    never = producible(banned, scores.shape[-1])
    for step in range(new_tokens):
        scores[:, never] = float("-inf")
        tokens = scores.argmax(-1)
        for row in sorted(running):
            answers[row].append(int(tokens[row]))
            if answers[row][-1] in stop:
                running.discard(row)
        if not running or step == new_tokens - 1:
            break
        cache.extend(torch.ones(batch, 1, dtype=torch.bool, device=device))
        step_inputs.update(input_ids=tokens[:, None], position_ids=(lengths + step)[:, None])
        scores = model.logits(**step_inputs, cache=cache)[:, -1]
    return answers
