"""2. Packing fill: real tokens / token slots, padded batches vs packed rows.

On the LLaVA-665K-like length mix (`benchmarks.length_mix.llava_665k_like_samples`: 88% one
576-token image plus log-normal text around 100 tokens, 12% text-only log-normal around
500, clipped to [8, 2048]), and on the benchmark corpus built from it (`benchmarks.corpus`,
its lengths measured after tokenisation). Padded batches are counted three ways, as the
common trainers form them: in random order (transformers' Trainer and LLaMA-Factory by
default), by modality (LLaVA-1.5's group_by_modality_length on one device: image and
text-only samples batched apart), and grouped by length (the Trainer's group_by_length:
megabatches of 50 batches sorted by length). Packed rows are mmscale's first-fit-decreasing
(`mmscale.data.packing.first_fit_decreasing`) over blocks of samples, as data.pack_block.
"""

from __future__ import annotations

from benchmarks.common import Context
from benchmarks.length_mix import llava_665k_like_samples
from benchmarks.report import Table
from mmscale.data.packing import first_fit_decreasing

MICRO_BATCH = 16  # LLaVA-1.5's per-device batch
MEGABATCH = 50  # transformers' LengthGroupedSampler: megabatches of 50 batches


def run(ctx: Context) -> list[Table]:
    mix = llava_665k_like_samples(2048 if ctx.smoke else 8192)
    corpus = ctx.mix()
    columns = {
        "LLaVA-665K-like mix": ([n for n, _ in mix], [image for _, image in mix], 2048),
        f"benchmark corpus (x {corpus.image_tokens}/576)": (corpus.lengths, corpus.has_image, corpus.max_seq_len),
    }
    table = Table("2. Packing fill (real tokens / token slots) on the LLaVA-665K-like length mix",
                  ["batching", *columns])
    table.rows += [
        [f"padded, micro-batch {MICRO_BATCH}, random order"]
        + [padded_fill(n, in_order(n)) for n, _, _ in columns.values()],
        [f"padded, micro-batch {MICRO_BATCH}, by modality (LLaVA-1.5)"]
        + [padded_fill(n, by_modality(n, images)) for n, images, _ in columns.values()],
        [f"padded, micro-batch {MICRO_BATCH}, grouped by length (megabatches of {MEGABATCH})"]
        + [padded_fill(n, by_length(n)) for n, _, _ in columns.values()],
    ]
    for factor, block in ((1, 256), (2, 1024), (4, 512)):
        table.rows.append([f"packed, rows of {2048 * factor:,} tokens (scaled in the corpus), blocks of {block}"]
                          + [packed_fill(n, longest * factor, block) for n, _, longest in columns.values()])
    table.notes += [
        f"{len(mix):,} samples of the mix; {len(corpus.lengths):,} of the corpus (mean "
        f"{mean(corpus.lengths):.0f} tokens, "
        f"rows of {corpus.max_seq_len} tokens stand for the mix's 2,048). Benchmark 1 trains the corpus in the forms "
        "of the first row (its baseline) and of the fourth (mmscale).",
        "Grouping by length nearly removes padding too, at the price of batches of similar samples; transformers' "
        "Trainer leaves it off by default (group_by_length=False), and LLaVA-1.5 groups by modality instead.",
    ]
    return [table]


def mean(values: list[int]) -> float:
    return sum(values) / len(values)


def in_order(lengths: list[int]) -> list[list[int]]:
    """Micro-batches of consecutive samples (the mix is drawn at random, so this is random order)."""
    return [list(range(i, min(i + MICRO_BATCH, len(lengths)))) for i in range(0, len(lengths), MICRO_BATCH)]


def by_modality(lengths: list[int], has_image: list[bool]) -> list[list[int]]:
    """LLaVA-1.5's group_by_modality_length on one device: image samples and text-only ones batched apart."""
    batches = []
    for modality in (True, False):
        group = [i for i, image in enumerate(has_image) if image == modality]
        batches += [group[i : i + MICRO_BATCH] for i in range(0, len(group), MICRO_BATCH)]
    return batches


def by_length(lengths: list[int]) -> list[list[int]]:
    """transformers' LengthGroupedSampler: megabatches of MEGABATCH batches, each sorted by length."""
    batches, size = [], MEGABATCH * MICRO_BATCH
    for start in range(0, len(lengths), size):
        mega = sorted(range(start, min(start + size, len(lengths))), key=lambda i: -lengths[i])
        batches += [mega[i : i + MICRO_BATCH] for i in range(0, len(mega), MICRO_BATCH)]
    return batches


def padded_fill(lengths: list[int], batches: list[list[int]]) -> float:
    """Each batch padded to its longest sample."""
    slots = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    return sum(lengths[i] for batch in batches for i in batch) / slots


def packed_fill(lengths: list[int], budget: int, block: int) -> float:
    """Rows of `budget` tokens, first-fit-decreasing over consecutive blocks of `block` samples."""
    rows = 0
    for start in range(0, len(lengths), block):
        rows += len(first_fit_decreasing(lengths[start : start + block], budget))
    return sum(lengths) / (rows * budget)
