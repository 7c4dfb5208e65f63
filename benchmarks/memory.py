"""7. The memory plan against a measured step: per-rank bytes, plan vs two real DeepSpeed steps on
2 gloo ranks (mmscale.plan.measure), for small decoder and cross-attention configurations
under ZeRO-2 and ZeRO-3, with and without activation checkpointing, in bf16."""

from __future__ import annotations

from benchmarks.common import REPO, Context
from benchmarks.report import Table
from mmscale.config import load_recipe

WORLD = 2
VOCAB, IMAGE_TOKEN = 4096, 4095  # no tokenizer: the ids only need to fit the vocabulary
COMMON = ["data.tokenizer=unused", "data.train=unused", "train.precision=bf16", "train.zero_bucket=1000000"]
DECODER = ["model.llm.hidden_size=512", "model.llm.intermediate_size=1408", "model.llm.num_heads=8",
           "model.llm.num_kv_heads=4", "data.max_seq_len=512", "train.micro_batch_size=4"]
CROSS = ["model.tiled_vision.image_size=64", "model.tiled_vision.hidden_size=256", "model.tiled_vision.num_heads=4",
         "model.tiled_vision.intermediate_size=1024", "data.max_seq_len=256", "train.micro_batch_size=4",
         "model.llm.hidden_size=512", "model.llm.intermediate_size=1408", "model.llm.num_heads=8", "model.llm.num_kv_heads=4"]
# (name, recipe, overrides); toy-sized under --smoke.
CONFIGS = [
    ("decoder, ZeRO-2, no checkpointing", "demo", [*DECODER, "train.zero_stage=2"]),
    ("decoder, ZeRO-3, checkpointing", "demo", [*DECODER, "train.zero_stage=3", "model.llm.activation_checkpointing=true"]),
    ("decoder packed, ZeRO-2, frozen tower, checkpointing", "demo", [
        *DECODER, "train.zero_stage=2", "train.trainable=finetune", "data.pack=true",
        "model.llm.activation_checkpointing=true"]),
    ("cross-attention adapter, ZeRO-3, checkpointing", "demo_cross_attention", [
        *CROSS, "train.zero_stage=3", "train.trainable=adapter", "model.llm.activation_checkpointing=true",
        "model.tiled_vision.activation_checkpointing=true"]),
    ("cross-attention, ZeRO-2, no checkpointing", "demo_cross_attention", [*CROSS, "train.zero_stage=2"]),
]
SMOKE = ["data.max_seq_len=64"]


def run(ctx: Context) -> list[Table]:
    from mmscale.plan.measure import measure_ranks
    from mmscale.plan.memory import plan_memory

    table = Table(
        "7. Memory plan vs measured, per rank (MiB; 2 gloo ranks, bf16)",
        ["configuration", "plan states", "measured states", "plan peak", "measured peak", "peak error %"],
    )
    for name, recipe, overrides in CONFIGS[::3] if ctx.smoke else CONFIGS:  # smoke: a decoder and a cross-attention one
        path = REPO / "recipes" / f"{recipe}.yaml"
        overrides = [*COMMON, *overrides, *(SMOKE if ctx.smoke else [])]
        plan = plan_memory(load_recipe(path, overrides), WORLD, VOCAB, IMAGE_TOKEN, bf16=True)
        got = measure_ranks(path, overrides, WORLD, VOCAB, IMAGE_TOKEN)
        mib = 2**20
        table.rows.append([name, plan.states / mib, got.states / mib, plan.total / mib, got.peak / mib,
                           100 * (plan.total / got.peak - 1)])
    table.notes += [
        "Measured: every tensor a rank allocates, counted while it lives (mmscale.plan.measure), over two "
        "real DeepSpeed steps on the plan's largest micro-batch; states = held between the steps.",
        "Plan: model states by formula from the parameter counts, activations from the same model run on "
        "meta tensors (mmscale.plan.activations).",
    ]
    return [table]
