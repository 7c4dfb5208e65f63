"""Per-GPU memory of a training run, by part, before launch.

Model states follow from the parameter counts, the ZeRO stage and the precision, as ZeRO's
paper and DeepSpeed's code lay them out (P parameters, T of them trainable, N ranks; bf16):

    weights      ZeRO-1/2: 2P (every rank holds them all)   ZeRO-3: 2P/N + gathered ones
    gradients    8T/N at the backward's end: the rank's fp32 partition, and as much again in
                 fp32 copies of the reduced buckets on their way into it (measured: with
                 activation checkpointing the step's peak moves there)
    optimizer    12T/N (fp32 master weights, Adam's two moments)
    buffers      the reduce bucket (two with overlap_comm); ZeRO-3's gathered parameters

In fp32 the weights are 4P and the master weights are DeepSpeed's fp32 partition copy all the
same. Activations are measured, not estimated (mmscale.plan.activations).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from mmscale.config import Recipe
from mmscale.config.model import PretrainedConfig
from mmscale.config.schema import TrainConfig
from mmscale.models import build_vlm
from mmscale.plan.activations import step_activation_bytes
from mmscale.plan.batch import worst_case_batch
from mmscale.training.engine import buckets
from mmscale.training.freeze import freeze, model_parts

# ZeRO-3 keeps parameters below this many elements gathered on every rank (DeepSpeed's
# stage3_param_persistence_threshold, left at its default: norms, biases, gates).
PERSISTENCE_THRESHOLD = 100_000


@dataclass(frozen=True)
class Counts:
    trainable: int
    frozen: int
    persistent: int  # parameters ZeRO-3 never partitions (below PERSISTENCE_THRESHOLD)
    largest: int  # the largest single parameter: ZeRO-3 gathers at least this much at once

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


def parameter_counts(model: nn.Module) -> Counts:
    params = list(model.parameters())  # a tied weight once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return Counts(
        trainable=trainable,
        frozen=sum(p.numel() for p in params) - trainable,
        persistent=sum(p.numel() for p in params if p.numel() < PERSISTENCE_THRESHOLD),
        largest=max(p.numel() for p in params),
    )


COUNTS = ("parameters", "trainable", "saved_frozen")


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU."""

    weights: int
    gradients: int
    optimizer: int
    buffers: int
    activations: int = 0
    # Counts, not memory of this GPU: the checkpoint's size follows from them.
    parameters: int = 0
    trainable: int = 0
    saved_frozen: int = 0  # frozen parameters each checkpoint holds (none when model.pretrained gives them)

    @property
    def states(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.buffers

    @property
    def total(self) -> int:
        return self.states + self.activations

    def rows(self) -> list[tuple[str, int]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self) if f.name not in COUNTS]


def model_states(counts: Counts, train: TrainConfig, world: int, bf16: bool) -> Memory:
    """Weights, gradients, optimizer states and DeepSpeed's buffers per GPU (no activations)."""
    width = 2 if bf16 else 4
    shard = -(-counts.trainable // world)  # a rank's partition of the trainable parameters
    zero = buckets(train)  # the sizes DeepSpeed is given
    if train.zero_stage == 3:
        sharded = -(-(counts.total - counts.persistent) // world)
        # Gathered for the module running now and prefetched ahead of it, at most stage3_max_live_parameters.
        ahead = max(zero["stage3_prefetch_bucket_size"], counts.largest)
        gathered = min(zero["stage3_max_live_parameters"], counts.total, ahead)
        weights = width * (sharded + counts.persistent)
        buffers = width * gathered
    else:
        weights = width * counts.total
        buffers = 0
    buffers += width * min(zero["reduce_bucket_size"], counts.trainable) * (2 if zero["overlap_comm"] else 1)
    gradients = 8 * shard
    optimizer = 12 * shard
    if train.offload != "none":  # in the host's memory
        optimizer = gradients = 0
    if train.offload == "optimizer_and_params":
        weights = width * counts.persistent
    return Memory(weights=weights, gradients=gradients, optimizer=optimizer, buffers=buffers,
                  parameters=counts.total, trainable=counts.trainable)


def frozen_from_folders(model: nn.Module, pretrained: PretrainedConfig) -> bool:
    """Whether model.pretrained's folders give every frozen part, which checkpoints then leave out
    (training.freeze.FrozenWeights; told here from the parts alone, without reading the folders)."""
    given = {"vision_tower": pretrained.vision, "llm": pretrained.llm}
    frozen = [part for part, params in model_parts(model).items() if not any(p.requires_grad for p in params)]
    return pretrained.vlm is not None or all(given.get(part) is not None for part in frozen)


def plan_memory(recipe: Recipe, world: int, vocab_size: int, image_token_id: int, bf16: bool) -> Memory:
    """The memory of one GPU of `recipe` on `world` ranks, at the planned (largest) micro-batch."""
    train = recipe.train.for_world(world)
    with torch.device("meta"):
        model = build_vlm(recipe.model, vocab_size, image_token_id)
    freeze(model, recipe.trainable_parts)
    counts = parameter_counts(model)
    states = model_states(counts, train, world, bf16)
    if not frozen_from_folders(model, recipe.model.pretrained):
        states = replace(states, saved_frozen=counts.frozen)
    batch = worst_case_batch(recipe, train.micro_batch_size, image_token_id)
    dtype = torch.bfloat16 if bf16 else torch.float32
    activations = step_activation_bytes(model, batch, dtype)
    inputs = sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size()) for t in batch.values())
    return replace(states, activations=activations + inputs)
