"""DeepSpeed engine from a recipe: ZeRO stage, precision, AdamW, warmup + cosine schedule."""

from __future__ import annotations

import deepspeed
import torch
from torch import nn

from mmscale.config.schema import TrainConfig


def use_bf16(cfg: TrainConfig) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())


def deepspeed_config(cfg: TrainConfig) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": use_bf16(cfg)},
        # Our AdamW is torch's (no JIT build of DeepSpeed's fused CPU Adam); ZeRO shards it fine.
        "zero_allow_untested_optimizer": True,
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": cfg.steps,
                "warmup_num_steps": cfg.warmup_steps,
                "warmup_type": "linear",
                "cos_min_ratio": cfg.min_lr_ratio,
            },
        },
        "steps_per_print": 2**31 - 1,  # we report progress ourselves
    }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embedding tables; none on norms and biases (the 1-D tensors)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: nn.Module, cfg: TrainConfig) -> deepspeed.DeepSpeedEngine:
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    return engine
