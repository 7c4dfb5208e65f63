"""VIRAL, visual representation alignment: the aligned model, its teacher, head and feature cache.

`with_alignment(vlm, model_cfg)` returns the model the trainer trains, a frozen teacher beside
it, when `model.alignment.enabled`."""

from __future__ import annotations

from mmscale.alignment.head import AlignmentHead, alignment_loss
from mmscale.alignment.model import AlignedVLM, LossParts, with_alignment
from mmscale.alignment.teacher import Teacher, build_teacher, resample_grid

__all__ = [
    "AlignedVLM", "AlignmentHead", "LossParts", "Teacher", "alignment_loss", "build_teacher", "resample_grid",
    "with_alignment",
]
