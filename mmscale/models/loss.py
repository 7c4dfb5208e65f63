"""The training loss, normalised by the optimizer step's global token counts.

A micro-batch's loss is the sum of its labelled tokens' cross-entropies divided by the
number of labelled tokens in the whole optimizer step (every micro-batch of every rank),
not by its own: then the step's gradient is that of one mean over all its tokens, however
the step is split into micro-batches and ranks (transformers' `num_items_in_batch`,
torchtune's and torchtitan's global token count). A micro-batch's own mean would weigh a
row with 40 labelled tokens as much as one with 3,000. VIRAL's term is normalised the same
way by the step's image tokens. Without `LossTokens` (validation, tests, one forward) each
batch is its own step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmscale.data.tokenizer import IGNORE_INDEX


@dataclass(frozen=True)
class LossTokens:
    """Counts over the whole optimizer step: labelled tokens (next-token targets) and, for
    VIRAL, image tokens aligned to the teacher."""

    labelled: int
    aligned: int = 0


def labelled_tokens(labels: torch.Tensor) -> int:
    """Next-token targets of a batch: positions 1.. whose label is not IGNORE_INDEX."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def mean_over(total: torch.Tensor, count: int) -> torch.Tensor:
    """`total` divided by `count`; a zero count divides the zero sum of nothing by 1: it
    contributes zero, with zero gradients, where a mean of nothing would be NaN."""
    return total / max(1, count)


def next_token_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    output: Callable[[torch.Tensor], torch.Tensor],
    tokens: LossTokens | None = None,
) -> torch.Tensor:
    """Cross-entropy of each position's prediction against the next label, summed in fp32 over
    the labelled tokens and divided by the step's labelled count (`tokens`, else this batch's).

    `hidden` (batch, seq, width) are the LM's final hidden states and `output` its per-position
    norm and output layer, run on the labelled positions only: fp32 logits for every position
    take 8.4 GB at 8 x 2048 tokens of a 128K vocabulary (as much again for their gradient),
    and the unlabelled positions (prompts, images, padding) are often most of them.
    """
    targets = labels[:, 1:]
    # Position t predicts label t + 1 of its row, also in packed rows: the packer gives each
    # sample's first token IGNORE_INDEX, so no position predicts across a sample boundary.
    # Finding the labelled positions waits for the device, once: their number is a shape.
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    # In one piece: chunks would save memory only if recomputed in the backward pass (autograd
    # keeps each chunk's log-softmax), and under ZeRO-3 each recomputed chunk gathers lm_head again.
    logits = output(hidden[rows, cols])
    total = F.cross_entropy(logits.float(), targets[rows, cols], reduction="sum")
    return mean_over(total, tokens.labelled if tokens is not None else len(rows))
