"""DeepSpeed engine from a recipe: ZeRO stage, precision, AdamW, warmup + cosine schedule."""

from __future__ import annotations

import argparse
import math

import deepspeed
import torch
from torch import nn

from mmscale.config.schema import ZERO1_BF16, TrainConfig
from mmscale.errors import UserError
from mmscale.training.freeze import model_parts


def use_bf16(cfg: TrainConfig) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())


def deepspeed_config(cfg: TrainConfig) -> dict:
    if cfg.zero_stage == 1 and use_bf16(cfg):  # precision=auto on CUDA; an explicit bf16 fails in the recipe
        raise UserError(ZERO1_BF16)
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage, **buckets(cfg), **offload(cfg)},
        # Offloaded optimizer states keep our torch AdamW rather than DeepSpeed's CPU Adam,
        # which is faster but a JIT-compiled extension (minutes to build, needs a compiler).
        "zero_force_ds_cpu_optimizer": False,
        # check_grad_overflow: skip the step (and clear the gradients) when the global gradient
        # norm is not finite, as ZeRO does by itself in fp32; the trainer counts such steps.
        "bf16": {"enabled": use_bf16(cfg), "check_grad_overflow": True},
        # In bf16 the weights, activations and each backward's gradients are bf16, but the
        # micro-batches' gradients are summed, and reduced over ranks, in fp32 (bf16's 8-bit
        # mantissa would drop small contributions to a large sum); the master weights and the
        # optimizer states are fp32 in every ZeRO stage, and the loss is computed in fp32.
        "communication_data_type": "fp32",
        "data_types": {"grad_accum_dtype": "fp32"},
        # Our AdamW is torch's (no JIT build of DeepSpeed's fused CPU Adam); ZeRO shards it fine.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # we report progress ourselves
    }


def skip_if_not_finite(loss: torch.Tensor) -> torch.Tensor:
    """`loss` for backward, made to give NaN gradients when it is not finite itself.

    ZeRO skips a step on a non-finite gradient norm, but a NaN or Inf loss may come with finite
    gradients (a non-finite term no trainable weight feeds, or an overflow in the loss after
    the logits): that step would be applied, and neither counted nor stopped by
    train.max_bad_steps. Found by tests/reliability/test_nonfinite.py. A finite loss is
    multiplied by exactly 1.0, which leaves its gradients bit for bit as they were.
    """
    return loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))


def buckets(cfg: TrainConfig) -> dict:
    """Bucket sizes and overlap, set rather than left to DeepSpeed's defaults, so that the memory
    plan (mmscale.plan) knows the buffers; contiguous gradients copy each gradient into the
    reduce bucket as soon as it is complete, which frees it."""
    sizes = {"reduce_bucket_size": cfg.zero_bucket, "overlap_comm": cfg.overlap_comm, "contiguous_gradients": True}
    if cfg.zero_stage == 3:
        # Parameters gathered ahead of their use; at most max_live_parameters gathered at once.
        return {**sizes, "stage3_prefetch_bucket_size": cfg.zero_bucket, "stage3_max_live_parameters": 2 * cfg.zero_bucket}
    return {**sizes, "allgather_bucket_size": cfg.zero_bucket}


def offload(cfg: TrainConfig) -> dict:
    """ZeRO-Offload / ZeRO-Infinity to CPU memory: optimizer states, and with ZeRO-3 the parameters."""
    if cfg.offload == "none":
        return {}
    out = {"offload_optimizer": {"device": "cpu", "pin_memory": torch.cuda.is_available()}}
    if cfg.offload == "optimizer_and_params":
        out["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return out


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """One group per (part, decay): weight decay on matrices and embedding tables, none on norms
    and biases (the 1-D tensors); each part's peak lr from train.lr_by_part, else train.lr.

    A group's `lr_scale` (its peak over train.lr) survives in the optimizer's groups, so
    `set_lr` can move every group along the one schedule.
    """
    groups = []
    for part, params in model_parts(model).items():
        trainable = [p for p in params if p.requires_grad]
        scale = cfg.lr_by_part.get(part, cfg.lr) / cfg.lr
        for decay in (True, False):
            # ds_shape: under zero.Init a parameter's own tensor is an empty 1-D partition.
            chosen = [p for p in trainable if (len(getattr(p, "ds_shape", p.shape)) >= 2) == decay]
            if chosen:
                groups.append({
                    "params": chosen, "weight_decay": cfg.weight_decay if decay else 0.0,
                    "lr_scale": scale, "name": f"{part}/{'decay' if decay else 'no_decay'}",
                })
    return groups


def lr_ratio(step: int, done: float, done_at_warmup: float, warmup: int, floor: float, shape: str = "cosine") -> float:
    """Multiplier of the peak lr for optimizer step `step + 1`: linear warmup, then a cosine
    (or linear) decay to `floor`.

    Warmup counts optimizer steps. The decay follows `done`, the fraction of the training
    budget (steps or samples) done, from `done_at_warmup` (where warmup ended) to 1: for a
    budget of steps, done = (step + 1) / steps. Written out rather than DeepSpeed's
    WarmupCosineLR, whose warmup gives the first step a learning rate of zero, and which
    cannot follow samples when packing makes the samples per step vary.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max(0.0, (done - done_at_warmup) / max(1e-12, 1 - done_at_warmup)))
    remaining = 1 - progress if shape == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (1 - floor) * remaining


def build_engine(model: nn.Module, cfg: TrainConfig) -> deepspeed.DeepSpeedEngine:
    # No DeepSpeed lr scheduler: the trainer sets each step's rate from `lr_ratio`, a pure
    # function of the run's progress, so a resumed run needs no scheduler state.
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas)
    # DeepSpeed selects the GPU LOCAL_RANK again, which is out of range where srun binds each task
    # to its own GPU; device_rank keeps the one init_distributed selected.
    args = argparse.Namespace(device_rank=torch.cuda.current_device()) if torch.cuda.is_available() else None
    engine, *_ = deepspeed.initialize(args=args, model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    return engine


def set_lr(engine: deepspeed.DeepSpeedEngine, lr: float) -> None:
    """Set the rate of train.lr's schedule point `lr`, scaled per group (see `param_groups`)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
