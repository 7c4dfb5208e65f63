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


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, tokens: LossTokens | None = None) -> torch.Tensor:
    """Cross-entropy of each position's logits against the next label, summed in fp32 over the
    labelled tokens and divided by the step's labelled count (`tokens`, else this batch's)."""
    total = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    # This batch's own count only when needed: on a GPU, counting waits for the device.
    return mean_over(total, tokens.labelled if tokens is not None else labelled_tokens(labels))
