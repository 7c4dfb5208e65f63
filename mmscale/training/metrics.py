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

# Counts a window sums, per rank, and then over ranks. A loss sum holds this rank's shares of
# the applied steps' losses (each micro-batch's loss is its share of the step's global mean,
# mmscale.models.loss), so summed over ranks it is the sum of the steps' losses. The last
# four count VIRAL's terms (model.alignment): their shares, the steps with the terms, and the
# steps with image tokens to align. The last four are the vision health counts (`ConnectorOutput`):
# every step (applied or not), text-only samples, image tokens, the sum of their norms.
COUNTS = (
    "loss_sum", "steps", "tokens", "labelled", "slots", "samples", "flops",
    "grad_norm_sum", "grad_norm_steps", "data_wait_s", "compute_s",
    "loss_lm_sum", "align_loss_sum", "viral_steps", "aligned_steps",
    "all_steps", "text_only", "image_tokens", "connector_norm_sum",
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
    steps = totals["steps"] / world  # every rank counts every applied step
    norms = totals["grad_norm_steps"]  # every rank sees the same global norm: take the mean over ranks
    wait, compute = totals["data_wait_s"], totals["compute_s"]
    flops_per_s = totals["flops"] / seconds
    return {
        # The mean over the steps applied in the window (null if every one was skipped as
        # non-finite) of each step's loss: its labelled tokens' mean cross-entropy (plus VIRAL's
        # weighted term), token-weighted over all its micro-batches and ranks, as val_loss is.
        "loss": totals["loss_sum"] / steps if steps else None,
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
        **alignment_record(totals, world),
        **vision_record(totals, world),
    }


def vision_record(totals: dict[str, float], world: int) -> dict:
    """What the LLM got from the images: image tokens per step (all ranks), the share of samples
    without an image, and the mean L2 norm of the connector's output per image token."""
    steps, tokens = totals["all_steps"] / world, totals["image_tokens"]
    return {
        "image_tokens_per_step": tokens / steps if steps else 0.0,
        "text_only": totals["text_only"] / totals["samples"] if totals["samples"] else 0.0,
        "connector_norm": totals["connector_norm_sum"] / tokens if tokens else None,
    }


class ConnectorOutput:
    """The connector's output, caught by a forward hook, as counts of the training micro-batches'
    real image tokens and their norms; summed on the device and read once per logging window
    (`take`), so that no step waits for them.

    Real: a decoder VLM's connector sees only the batch's images (or, for a batch without any, a
    blank one that is not counted); a cross-attention VLM's sees each row's padding images and
    tiles too, which no token attends to (its cross_attention_mask).
    """

    def __init__(self, connector: torch.nn.Module):
        self.norms: torch.Tensor | None = None
        self.totals: torch.Tensor | None = None  # (image tokens, sum of their norms)
        connector.register_forward_hook(self._caught)

    def _caught(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if module.training:  # not the forwards of validation and generation, which are not counted
            self.norms = output.detach().float().norm(dim=-1)

    def count(self, inputs: dict, meta: dict) -> int:
        """Add the micro-batch that just ran forward; returns its samples without an image."""
        norms, self.norms = self.norms, None
        text_only = sum(1 for *_, tiles in meta["samples"] if not tiles)
        if norms is None or text_only == len(meta["samples"]):
            return text_only
        if "cross_attention_mask" in inputs:  # (rows, tokens, images, tiles) -> seen tiles (rows, images, tiles)
            norms = norms[inputs["cross_attention_mask"].amax(dim=1).bool()]
        counts = torch.stack([norms.new_tensor(norms.numel()), norms.sum()]).double()
        self.totals = counts if self.totals is None else self.totals + counts
        return text_only

    def take(self) -> dict[str, float]:
        """The window's image tokens and norm sum (one device sync), and a fresh start."""
        if self.totals is None:
            return {}
        tokens, norm_sum = self.totals.tolist()
        self.totals = None
        return {"image_tokens": tokens, "connector_norm_sum": norm_sum}


def alignment_counts(parts: list[LossParts], aligned: int) -> dict[str, float]:
    """Window counts of one applied step's `mmscale.alignment.LossParts` (one per micro-batch);
    `aligned`: the step's image tokens over all ranks."""
    if not parts:
        return {}
    lm, align = torch.stack([torch.stack([part.lm, part.align]) for part in parts]).sum(0).tolist()  # one device sync
    return {"loss_lm_sum": lm, "align_loss_sum": align, "viral_steps": 1, "aligned_steps": int(aligned > 0)}


def alignment_record(totals: dict[str, float], world: int) -> dict:
    """VIRAL's terms, when the model has them, as means over the window's steps: the LM loss
    alone, the alignment loss it adds (before the weight; 0 for steps without images), and the
    image tokens' mean cosine similarity to their targets (over steps with images)."""
    if not totals["viral_steps"]:
        return {}
    steps, aligned = totals["viral_steps"] / world, totals["aligned_steps"] / world
    return {
        "loss_lm": totals["loss_lm_sum"] / steps,
        "loss_align": totals["align_loss_sum"] / steps,
        "align_cos": -totals["align_loss_sum"] / aligned if aligned else None,
    }
