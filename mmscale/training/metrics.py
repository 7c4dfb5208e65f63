"""What a logging window measures, and the device facts MFU and memory need.

A `Window` sums per-rank counts over the steps between two log lines; `record` turns
them, summed over ranks, into one metrics record. MFU counts the model's own FLOPs per
sample (`mmscale.models.flops`) against the accelerator's dense bf16 peak; it is left
out (None) where the peak is unknown, as on CPU.
"""

from __future__ import annotations

import resource
import sys
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mmscale.alignment import LossParts

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s per device, from the vendors' data
# sheets; matched against torch.cuda.get_device_name() in this order.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM and NVL
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
)

# Counts a window sums, per rank, and then over ranks. The last five count VIRAL's loss terms
# (model.alignment): micro-batches with the terms, and those with image tokens to align.
COUNTS = (
    "loss_sum", "micro_batches", "tokens", "labelled", "slots", "samples", "flops",
    "grad_norm_sum", "grad_norm_steps", "data_wait_s", "compute_s",
    "loss_lm_sum", "align_loss_sum", "align_cos_sum", "lm_batches", "align_batches",
)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated by this process (CUDA), else its peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB on Linux
    return kib / (2**30 if sys.platform == "darwin" else 2**20)


class Window:
    def __init__(self) -> None:
        self.counts = torch.zeros(len(COUNTS), dtype=torch.float64)

    def add(self, **values: float) -> None:
        for name, value in values.items():
            self.counts[COUNTS.index(name)] += value

    def reset(self) -> None:
        self.counts.zero_()


def record(totals: dict[str, float], seconds: float, world: int, peak: float | None) -> dict:
    """Window metrics from counts summed over `world` ranks, over `seconds` of wall time."""
    norms = totals["grad_norm_steps"]  # every rank sees the same global norm: take the mean over ranks
    wait, compute = totals["data_wait_s"], totals["compute_s"]
    flops_per_s = totals["flops"] / seconds
    return {
        # Over the steps applied in the window (null if every one was skipped as non-finite).
        "loss": totals["loss_sum"] / totals["micro_batches"] if totals["micro_batches"] else None,
        # Mean global gradient norm (before clipping) of the steps applied in the window.
        "grad_norm": totals["grad_norm_sum"] / norms if norms else None,
        "samples_per_s": totals["samples"] / seconds,
        "tokens_per_s": totals["tokens"] / seconds,
        "loss_tokens_per_s": totals["labelled"] / seconds,  # the honest throughput of supervised finetuning
        "fill": totals["tokens"] / totals["slots"],  # real tokens / all token slots of the batches
        "tflops_per_s": flops_per_s / 1e12,  # model FLOPs of all ranks
        "mfu": flops_per_s / (peak * world) if peak else None,
        # Share of the step time spent waiting for the data loader (mean over ranks).
        "data_wait": wait / (wait + compute) if wait + compute else 0.0,
        **alignment_record(totals),
    }


def alignment_counts(parts: list[LossParts]) -> dict[str, float]:
    """Window counts of micro-batches' `mmscale.alignment.LossParts`."""
    counts = dict.fromkeys(("loss_lm_sum", "align_loss_sum", "align_cos_sum", "align_batches"), 0.0)
    for part in parts:
        lm, align, cos = torch.stack([part.lm, part.align, part.cos]).tolist()  # one device sync
        counts["loss_lm_sum"] += lm
        if part.image_tokens:
            counts["align_loss_sum"] += align
            counts["align_cos_sum"] += cos
            counts["align_batches"] += 1
    return {**counts, "lm_batches": len(parts)}


def alignment_record(totals: dict[str, float]) -> dict:
    """VIRAL's terms, when the model has them: the LM loss alone, the alignment loss it adds
    (before the weight; 0 for micro-batches without images), and the image tokens' mean
    cosine similarity to their targets (over micro-batches with images)."""
    if not totals["lm_batches"]:
        return {}
    aligned = totals["align_batches"]
    return {
        "loss_lm": totals["loss_lm_sum"] / totals["lm_batches"],
        "loss_align": totals["align_loss_sum"] / totals["lm_batches"],
        "align_cos": totals["align_cos_sum"] / aligned if aligned else None,
    }
