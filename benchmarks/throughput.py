"""1. Training throughput: mmscale (packed rows) against transformers' LLaVA (padded batches).

Both arms train the same model (the benchmark recipe's decoder VLM, and the same weights
exported with `mmscale.models.hf.llava` into `LlavaForConditionalGeneration`) under the same
DeepSpeed config (`mmscale.training.engine.deepspeed_config` of the recipe: ZeRO-2, fp32 on
CPU, AdamW) on the same samples of the LLaVA-665K-like corpus, read once through mmscale's
loader and held in memory, so the timed passes measure training alone (the data loader's
share is benchmark 3's):

- mmscale: `DecoderVLM` in mmscale's engine (`build_engine`), the samples packed
  first-fit-decreasing into rows of data.max_seq_len tokens (the mix's 2,048, scaled), each
  sample attending only to itself;
- baseline: `LlavaForConditionalGeneration` (SDPA attention), micro-batches of 16 samples
  (LLaVA-1.5's per-device batch) in the stream's random order, right-padded to the longest,
  with an attention mask, as LLaVA's and LLaMA-Factory's trainers feed it.

The arms train on the whole corpus (1,024 samples, 16 of them for warm-up), once: packing's
gain follows how much a padded batch wastes, which varies with the draw of samples, and a
subset of 128 padded to a fill of 0.59 or 0.67 depending on the seed against the corpus's 0.55.

A third arm, mmscale's model on the baseline's padded batches, splits the difference into
what packing gains and what the implementation gains. A fourth runs the packed rows as the CPU
path did before it attended sample by sample: one SDPA call per row under the block-diagonal
mask, which computes each row's whole attention square (and what CUDA's SDPA path still does).
All arms take the same number of optimizer steps (the packed rows are spread over as many micro-batches as the padded
batches) and take turns step by step (see `interleaved_rounds`). torch runs on one thread
and the rates count the process's CPU time as well as the wall clock: on a machine shared
with other jobs, CPU time barely moves with their load, the wall clock does.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ContextManager
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import Context, collate, one_thread, world_of_one
from benchmarks.report import Table
from mmscale.config import Recipe
from mmscale.config.model import ModelConfig
from mmscale.config.schema import MODEL_PARTS
from mmscale.data.loader import build_dataloader
from mmscale.data.packing import Packer
from mmscale.data.tokenizer import IGNORE_INDEX, load_tokenizer
from mmscale.models import DecoderVLM, attention
from mmscale.models.flops import output_layer_training, training_flops_per_sample

PADDED_MICRO_BATCH = 16  # LLaVA-1.5's per_device_train_batch_size
PACK_BLOCK = 256  # samples packed together, as data.pack_block
TRAIN_LR = ["train.lr=1e-4"]  # constant, no warmup: the same rate for both arms and every step


@dataclass(frozen=True)
class Workload:
    """The same samples in the two forms the arms train on."""

    samples: list[dict]
    padded: list[dict]
    packed: list[dict]
    warmup_padded: dict
    warmup_packed: dict


@dataclass(frozen=True)
class Arm:
    name: str
    engine: object  # a deepspeed.DeepSpeedEngine
    batches: list[dict]
    warmup: dict
    inputs: Callable[[dict], dict]  # batch -> the model's keyword arguments
    loss: Callable[[object], torch.Tensor]  # the model's output -> the loss
    context: Callable[[], ContextManager] = contextlib.nullcontext  # entered around each of its steps


@dataclass
class Spent:
    """Seconds an arm spent training in one round."""

    cpu: float = 0.0  # this process's CPU time
    wall: float = 0.0


def run(ctx: Context) -> list[Table]:
    world_of_one()
    recipe = ctx.recipe(TRAIN_LR)
    micro_batch = 4 if ctx.smoke else PADDED_MICRO_BATCH
    work = workload(recipe, ctx.mix_samples - micro_batch, micro_batch)
    mmscale_model = build_mmscale_model(recipe)
    llava = to_llava(mmscale_model, recipe)
    difference = first_loss_difference(mmscale_model, llava, work.padded[0])
    arms = [
        mmscale_arm("mmscale, packed", copy.deepcopy(mmscale_model), recipe, work.packed, work.warmup_packed),
        mmscale_arm(FULL_LOGITS, with_full_logits(copy.deepcopy(mmscale_model)), recipe, work.packed, work.warmup_packed),
        mmscale_arm("mmscale, padded", mmscale_model, recipe, work.padded, work.warmup_padded),
        mmscale_arm(ROW_MASK, copy.deepcopy(mmscale_model), recipe, work.packed, work.warmup_packed, row_mask),
        llava_arm(llava, recipe, work),
    ]
    with one_thread():
        rounds = interleaved_rounds(arms, rounds=1)
    vocab = mmscale_model.language_model.lm_head.out_features
    return [throughput_table(arms, rounds, work, recipe, vocab, difference, micro_batch)]


# ---- data --------------------------------------------------------------------------------


def workload(recipe: Recipe, samples: int, micro_batch: int) -> Workload:
    """`samples` encoded samples (plus one micro-batch for warm-up) as padded and as packed micro-batches."""
    encoded = read_samples(recipe, samples + micro_batch)
    warmup, timed = encoded[:micro_batch], encoded[micro_batch:]
    pad = load_tokenizer(recipe.data.tokenizer).pad_token_id
    padded = [collate(timed[i : i + micro_batch], pad) for i in range(0, len(timed), micro_batch)]
    packer = Packer(recipe.data.max_seq_len, PACK_BLOCK)
    rows = [row for i in range(0, len(timed), PACK_BLOCK) for row in packer(timed[i : i + PACK_BLOCK])]
    steps = len(padded)  # the rows spread over as many micro-batches, as evenly as they go
    chunks = [rows[i * len(rows) // steps : (i + 1) * len(rows) // steps] for i in range(steps)]
    packed = [collate(chunk, pad) for chunk in chunks if chunk]
    return Workload(timed, padded, packed, collate(warmup, pad), collate(packer(warmup), pad))


def read_samples(recipe: Recipe, count: int) -> list[dict]:
    """The first `count` samples of the recipe's (shuffled) train stream, encoded by mmscale's loader."""
    tokenizer = load_tokenizer(recipe.data.tokenizer, recipe.data.chat_template, recipe.data.image_token)
    data = recipe.data.model_copy(update={"pack": False, "num_workers": 0})
    loader = build_dataloader(data, recipe.model, tokenizer, split="train", batch_size=1, seed=recipe.run.seed)
    samples = []
    for batch in loader:  # batches of one sample: no padding to undo
        samples.append({
            "input_ids": batch["input_ids"][0], "labels": batch["labels"][0],
            "pixel_values": batch["pixel_values"], "samples": batch["meta"]["samples"],
        })
        if len(samples) == count:
            return samples
    raise AssertionError("the loader is endless")


def counts(batches: list[dict]) -> tuple[int, int, int]:
    """(real tokens, tokens that carry loss, token slots) of `batches`, as the trainer counts them."""
    real = sum(int(b["meta"]["lengths"].sum()) for b in batches)
    labelled = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    return real, labelled, sum(b["meta"]["slots"] for b in batches)


def useful_flops_share(batches: list[dict], cfg: ModelConfig, vocab: int, per_sample: bool, head_everywhere: bool) -> float:
    """Model FLOPs the samples need / FLOPs the batches make the model compute.

    Needed: each sample over its own tokens and attention square, the output layer at its
    labelled positions only (`mmscale.models.flops`, less the head elsewhere). Computed: rows
    over their whole length, padding included, the output layer at every slot where
    `head_everywhere`, else at the labelled ones; attention over each row's whole square
    (SDPA's dense mask, or a padded row), or with `per_sample` (CPU's packed path, like
    flash-attn's variable-length kernel) each sample's square and the padding's. Images cost
    the same in both.
    """
    everything = MODEL_PARTS  # the benchmark trains the whole model
    per_image = training_flops_per_sample(cfg, tokens=0, image_tiles=(1,), vocab_size=vocab, trainable=everything)
    head = output_layer_training(cfg, 1, vocab, everything)  # per position
    needed = computed = 0
    for batch in batches:
        rows, length = batch["input_ids"].shape
        samples = batch["meta"]["samples"]
        real, labelled, slots = counts([batch])
        by_sample = sum(training_flops_per_sample(cfg, tokens, tiles, vocab, everything) for _, tokens, tiles in samples)
        images = per_image * sum(len(tiles) for _, _, tiles in samples)
        needed += by_sample - (real - labelled) * head
        if per_sample:
            padding = [length - int(n) for n in batch["meta"]["lengths"]]
            computed += by_sample + sum(training_flops_per_sample(cfg, n, (), vocab, everything) for n in padding if n)
        else:
            computed += rows * training_flops_per_sample(cfg, length, (), vocab, everything) + images
        if not head_everywhere:
            computed -= (slots - labelled) * head
    return needed / computed


# ---- the two models ----------------------------------------------------------------------


def build_mmscale_model(recipe: Recipe) -> nn.Module:
    from mmscale.models import build_model

    torch.manual_seed(recipe.run.seed)
    return build_model(recipe.model, load_tokenizer(recipe.data.tokenizer))


def to_llava(model: nn.Module, recipe: Recipe) -> nn.Module:
    """transformers' LlavaForConditionalGeneration with `model`'s sizes and weights."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from mmscale.models.hf import LLAVA

    vocab = model.language_model.lm_head.out_features
    config = LlavaConfig.from_dict(LLAVA.config_to_hf(recipe.model, vocab, model.image_token_id))
    llava = LlavaForConditionalGeneration(config)
    result = llava.load_state_dict(LLAVA.state_dict_to_hf(model.state_dict(), recipe.model), strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:  # a tied head is not stored
        raise RuntimeError(f"the LLaVA export does not fit: {result}")
    return llava


def mmscale_inputs(batch: dict) -> dict:
    keys = ("input_ids", "labels", "pixel_values", "position_ids", "segment_ids")
    return {k: batch[k] for k in keys if k in batch}


def llava_inputs(batch: dict) -> dict:
    """LLaVA's inputs for a padded batch: the attention mask LLaVA's collator makes from the lengths."""
    lengths = batch["meta"]["lengths"]
    mask = (torch.arange(batch["input_ids"].shape[1])[None] < lengths[:, None]).long()
    pixels = batch["pixel_values"] if len(batch["pixel_values"]) else None  # a batch without images
    return {"input_ids": batch["input_ids"], "attention_mask": mask, "labels": batch["labels"], "pixel_values": pixels}


@torch.no_grad()
def first_loss_difference(model: nn.Module, llava: nn.Module, batch: dict) -> float:
    """|loss difference| of the two models on one padded batch before training: they compute the same function."""
    ours = model(**mmscale_inputs(batch))
    theirs = llava(**llava_inputs(batch)).loss
    return abs(float(ours) - float(theirs))


FULL_LOGITS = "mmscale, packed, logits at every position"


def with_full_logits(model: DecoderVLM) -> DecoderVLM:
    """`model` with the loss it had before the output layer ran at labelled positions only: logits
    at every position, then the cross-entropy of the labelled ones (its own arm, so the table shows
    that change's gain alone). A subclass rather than a wrapper: the engine groups parameters by
    the model's own part names."""

    class FullLogits(type(model)):
        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **inputs) -> torch.Tensor:
            logits = self.logits(input_ids, **inputs)
            return F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
            )

    model.__class__ = FullLogits
    return model


def mmscale_arm(name: str, model: nn.Module, recipe: Recipe, batches: list[dict], warmup: dict,
                context: Callable[[], ContextManager] = contextlib.nullcontext) -> Arm:
    from mmscale.training.engine import build_engine

    return Arm(name, build_engine(model, recipe.train), batches, warmup, mmscale_inputs, lambda loss: loss, context)


ROW_MASK = "mmscale, packed, one masked SDPA call per row"


def row_mask() -> ContextManager:
    """Packed rows through one SDPA call per row under the block-diagonal mask (the CPU path
    before per-sample attention): the mask in place of the per-sample calls."""
    return mock.patch.object(attention, "segment_attention",
                             lambda q, k, v, causal, layout: attention.masked_attention(q, k, v, layout.mask))


def llava_arm(llava: nn.Module, recipe: Recipe, work: Workload) -> Arm:
    """LLaVA in a DeepSpeed engine of the same config, with AdamW and the same decay rule as mmscale's."""
    import deepspeed

    from mmscale.training.engine import deepspeed_config

    cfg = recipe.train
    params = [p for p in llava.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    engine, *_ = deepspeed.initialize(model=llava, optimizer=optimizer, config=deepspeed_config(cfg))
    name = "transformers LLaVA, padded"
    return Arm(name, engine, work.padded, work.warmup_padded, llava_inputs, lambda out: out.loss)


# ---- timing ------------------------------------------------------------------------------


def train_on(arm: Arm, batch: dict) -> None:
    """One micro-batch as one optimizer step (grad_accum 1, one rank: the step's token mean is the
    micro-batch's, which Trainer.train_step would also compute), with each arm's own loss."""
    with arm.context():
        loss = arm.loss(arm.engine(**arm.inputs(batch)))
        arm.engine.backward(loss)
    arm.engine.step()


def interleaved_rounds(arms: list[Arm], rounds: int) -> list[dict[str, Spent]]:
    """The time each arm spent on its batches, in each of `rounds` passes over them.

    Within a round the arms take turns step by step, in the order A B C, C B A, A B C, ...,
    so that load from other processes falls on all of them alike. Two steps of warm-up each
    first (a model's first steps pay for one-time set-up: allocations, kernel selection).
    """
    for arm in arms:
        arm.engine.train()
        for _ in range(2):
            train_on(arm, arm.warmup)
    results = []
    for _ in range(rounds):
        spent = {arm.name: Spent() for arm in arms}
        for step in range(max(len(arm.batches) for arm in arms)):
            for arm in arms if step % 2 == 0 else arms[::-1]:
                if step < len(arm.batches):
                    cpu, wall = time.process_time(), time.perf_counter()
                    train_on(arm, arm.batches[step])
                    spent[arm.name].cpu += time.process_time() - cpu
                    spent[arm.name].wall += time.perf_counter() - wall
        results.append(spent)
    return results


def throughput_table(
    arms: list[Arm], rounds: list[dict[str, Spent]], work: Workload, recipe: Recipe, vocab: int, difference: float,
    micro_batch: int,
) -> Table:
    table = Table(
        "1. Training throughput: mmscale packed vs transformers LLaVA padded (same model, samples, DeepSpeed config)",
        ["arm", "tokens/s/core", "loss tokens/s/core", "slots/s/core", "fill", "useful FLOPs share",
         "CPU s per round", "wall s per round", "vs LLaVA (CPU time)", "vs LLaVA (wall clock)"],
    )
    baseline = arms[-1].name
    per_sample = {arm.name: "packed" in arm.name and arm.name != ROW_MASK for arm in arms}
    shares = {
        arm.name: useful_flops_share(arm.batches, recipe.model, vocab, per_sample[arm.name],
                                     head_everywhere=arm.name in (FULL_LOGITS, baseline))
        for arm in arms
    }
    for arm in arms:
        real, labelled, slots = counts(arm.batches)
        cpu = statistics.median(r[arm.name].cpu for r in rounds)
        # Per round, then the median: the arms of a round took turns under the same load.
        by_cpu = statistics.median(r[baseline].cpu / r[arm.name].cpu for r in rounds)
        by_wall = statistics.median(r[baseline].wall / r[arm.name].wall for r in rounds)
        table.rows.append([
            arm.name, real / cpu, labelled / cpu, slots / cpu, real / slots, shares[arm.name],
            seconds(rounds, arm.name, "cpu"), seconds(rounds, arm.name, "wall"), by_cpu, by_wall,
        ])
    real, labelled, _ = counts(work.padded)
    model = recipe.model
    table.notes += [
        f"{len(rounds)} round(s); in each, every arm trains once on the same {len(work.samples)} samples "
        f"({real:,} tokens, {labelled:,} of them carry loss), the arms taking turns step by step, torch on one "
        "thread. Rates: tokens per second of the process's CPU time in the median round. Ratios: medians over "
        "the rounds of each round's ratio.",
        f"Padded micro-batches of {micro_batch} samples in stream order; packed rows of {recipe.data.max_seq_len} "
        f"tokens (first-fit-decreasing over blocks of {PACK_BLOCK} samples) spread over as many micro-batches; "
        "one optimizer step per micro-batch. Useful FLOPs share: FLOPs the samples need (mmscale.models.flops, the "
        "output layer at labelled positions) over those each arm computes (padding, a padded row's whole attention "
        "square, the output layer wherever the arm runs it; packed rows attend sample by sample on CPU, except in "
        "the arm with one masked call per row). "
        f"If time followed computed FLOPs, mmscale packed would run {shares[arms[0].name] / shares[baseline]:.2f}x "
        "as fast as LLaVA padded (the ratio of their shares).",
        f"Model: {model.vision.image_size}-px images, {model.image_tokens} image tokens, ViT "
        f"{model.vision.hidden_size} wide x {model.vision.depth} blocks, LLM {model.llm.hidden_size} wide x "
        f"{model.llm.num_layers} blocks; ZeRO stage {recipe.train.zero_stage}, "
        f"{'bf16' if torch.cuda.is_available() else 'fp32'}, one process. Before training, the two models' losses "
        f"on the first padded batch differ by {difference:.1e} (the same function and weights).",
        "mmscale padded (its model on the baseline's padded batches) splits the ratio into the implementation's "
        "share (mmscale padded / LLaVA) and packing's (mmscale packed / mmscale padded); the arm with logits at "
        "every position gives the output layer's restriction to labelled positions its own line (mmscale packed "
        "/ that arm). The arm with one masked SDPA call per row is the packed path as it ran on CPU before it "
        "attended sample by sample (mmscale packed / that arm: what per-sample attention gains).",
    ]
    return table


def seconds(rounds: list[dict[str, Spent]], name: str, clock: str) -> str:
    return " / ".join(f"{getattr(r[name], clock):.1f}" for r in rounds)
