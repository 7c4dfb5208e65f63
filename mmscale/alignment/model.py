"""A decoder VLM trained with VIRAL: LM loss + weight x alignment loss of its image tokens.

`AlignedVLM` adopts the VLM's parts as its own children and adds `alignment_head`, so
parameter names, parameter groups and checkpoints are the plain VLM's plus
`alignment_head.*` (which the release export ignores: it maps only the VLM's parts).

The hidden states of block `layer` are taken by a forward hook that exists only while the
VLM runs: no other layer's states are kept, and activation checkpointing's recomputation
in the backward pass does not fire it again. Image tokens are gathered with one boolean
mask over the whole batch; their row-major order (sample by sample, then by position, also
in packed rows) is the order of the images in `pixel_values`, so the targets line up
without a per-sample loop, whatever the number of images per sample. Targets cached in the
shards (`teacher_features`, see mmscale.alignment.cache) come in the same order and replace
the teacher's forward.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from mmscale.alignment.head import AlignmentHead, alignment_loss
from mmscale.alignment.teacher import Teacher, build_teacher, resample_grid
from mmscale.config.model import AlignmentConfig, ModelConfig
from mmscale.models.decoder_vlm import DecoderVLM
from mmscale.models.loss import LossTokens, mean_over


@dataclass(frozen=True)
class LossParts:
    """The last training forward's loss terms, detached, for the metrics; each normalised as
    the loss is (mmscale.models.loss), so a step's terms are the sums over its micro-batches."""

    lm: torch.Tensor
    align: torch.Tensor  # -(sum of cosines) / aligned tokens (0 when the batch has no image tokens)


@contextmanager
def captured_output(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The outputs of `module`'s calls inside the block, collected by a temporary forward hook."""
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _module, _args, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


class AlignedVLM(nn.Module):
    def __init__(self, vlm: DecoderVLM, cfg: AlignmentConfig, teacher: Teacher | None):
        super().__init__()
        for name, child in vlm.named_children():
            self.add_module(name, child)
        llm_width = vlm.cfg.llm.hidden_size
        target_width = teacher.hidden_size if teacher is not None else vlm.cfg.vision.feature_size
        self.alignment_head = AlignmentHead(llm_width, cfg.projector_hidden or llm_width // 2, target_width)
        # Set past nn.Module's registration: the VLM's parts are already this module's children
        # (registering it would name them twice), and the teacher must stay out of the
        # parameters, the optimizer and the checkpoints.
        object.__setattr__(self, "vlm", vlm)
        object.__setattr__(self, "teacher", teacher)
        self.cfg, self.alignment = vlm.cfg, cfg
        self.image_token_id = vlm.image_token_id
        self.block = cfg.block(vlm.cfg.llm.num_layers)  # counted from 1
        self.last_parts: LossParts | None = None

    def logits(self, *args, **kwargs) -> torch.Tensor:
        return self.vlm.logits(*args, **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        teacher_features: torch.Tensor | None = None,
        loss_tokens: LossTokens | None = None,
    ) -> torch.Tensor:
        """LM loss + weight x alignment loss while training; the LM loss alone in eval mode
        (validation), which also skips the teacher. The terms are left in `last_parts`.
        `teacher_features` (images, image tokens, teacher width): cached targets, used instead
        of running the teacher. `loss_tokens`: the optimizer step's labelled and image tokens,
        which normalise the two sums (by default this batch's own)."""
        if not self.training:
            self.last_parts = None
            return self.vlm(input_ids, labels, pixel_values, position_ids, segment_ids, loss_tokens)
        layer = self.language_model.layers[self.block - 1]
        tower = captured_output(self.vision_tower) if self.alignment.target == "encoder" else nullcontext([])
        with captured_output(layer) as hidden, tower as encoded:
            lm = self.vlm(input_ids, labels, pixel_values, position_ids, segment_ids, loss_tokens)
        is_image = input_ids == self.image_token_id
        total = self.alignment_sum(hidden[0], is_image, pixel_values, encoded[0] if encoded else None, teacher_features)
        align = mean_over(total, loss_tokens.aligned if loss_tokens is not None else int(is_image.sum()))
        self.last_parts = LossParts(lm.detach(), align.detach())
        return lm + self.alignment.weight * align

    def alignment_sum(
        self,
        hidden: torch.Tensor,
        is_image: torch.Tensor,
        pixel_values: torch.Tensor | None,
        encoded: torch.Tensor | None = None,
        cached: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """-(sum of cosine similarities) of the image tokens of `hidden` (batch, seq, width) and
        their targets: `cached` when given, else the teacher's (or the tower's) of this batch."""
        tokens = hidden[is_image]
        predicted = self.alignment_head(tokens)
        if not len(tokens):
            # The head still runs (on no tokens, giving an exact 0 with a zero gradient): under
            # ZeRO every rank must use the same parameters in every step.
            return predicted.sum()
        targets = (cached if cached is not None else self.targets(pixel_values, encoded)).flatten(0, 1)
        if len(targets) != len(tokens):  # cosine_similarity would broadcast a single target silently
            raise ValueError(f"{len(tokens)} image tokens in the batch but {len(targets)} alignment targets")
        return alignment_loss(predicted, targets)

    @torch.no_grad()
    def targets(self, pixel_values: torch.Tensor, encoded: torch.Tensor | None = None) -> torch.Tensor:
        """(images, image tokens, target width): the teacher's features, or the tower's own (`encoded`)."""
        if self.teacher is None:
            return resample_grid(encoded.detach(), math.isqrt(self.vlm.image_token_count))
        weight = next(self.teacher.model.parameters())
        if weight.device != pixel_values.device:
            self.teacher.to(pixel_values.device, self.alignment_head.linear_1.weight.dtype)
        return self.teacher.features(pixel_values)

    def train(self, mode: bool = True) -> "AlignedVLM":
        # The teacher is not a child, so it stays in eval mode; the VLM object shares the
        # children and only its own flag needs keeping in step.
        self.vlm.training = mode
        return super().train(mode)


def with_alignment(vlm: nn.Module, cfg: ModelConfig) -> nn.Module:
    """`vlm` wrapped for VIRAL when `cfg.aligned` (model.alignment.enabled), else `vlm` itself.

    Call it after the pretrained weights are loaded (the head has none) and outside
    `deepspeed.zero.Init`: the teacher is an ordinary, unpartitioned model on every rank.
    """
    if not cfg.aligned:
        return vlm
    return AlignedVLM(vlm, cfg.alignment, build_teacher(cfg))
