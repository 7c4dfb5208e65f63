"""6. GPU: MFU of a ~1B-parameter decoder VLM in bf16, variable-length attention kernels against SDPA.

With CUDA: a LLaVA-style model of 0.97B parameters (a ViT-B/14-sized tower at 336 px:
576 image tokens, as LLaVA-1.5's; a Llama-style LLM 2,048 wide, 16 blocks, GQA 16/8 heads,
a 32,000-token vocabulary) trains in mmscale's engine (ZeRO-2, bf16) on packed rows of
4,096 tokens drawn from the LLaVA-665K-like mix (random token ids and pixels: the kernels'
speed does not depend on them). Variants of the same steps: attention through flash-attn 2's
variable-length kernel (each sample attends over its own square), flash-attn 4's (Hopper and
newer), PyTorch's own (torch.nn.attention.varlen, the same idea inside libtorch), PyTorch
SDPA with the block-diagonal mask over the whole row, and FlexAttention with a document mask
(each set as `model.attention` sets it: `set_kernel`). MFU counts the model's own
FLOPs (`mmscale.models.flops`, per sample) over the GPU's dense bf16 peak
(`mmscale.training.metrics.peak_flops`).

Without CUDA (and with --smoke) the same code runs its toy-size path: a tiny model in fp32,
SDPA only, on CPU where there is no GPU; the table says so.
"""

from __future__ import annotations

import math
import random
import time

import torch

from benchmarks.common import DEMO_RECIPE, Context, collate, world_of_one
from benchmarks.length_mix import LLAVA_IMAGE_TOKENS, llava_665k_like_samples
from benchmarks.report import Table
from mmscale.config import Recipe, load_recipe
from mmscale.config.schema import MODEL_PARTS
from mmscale.data.packing import Packer
from mmscale.data.tokenizer import IGNORE_INDEX
from mmscale.models import attention
from mmscale.models.flops import training_flops_per_sample
from mmscale.training.metrics import peak_flops, peak_memory_gb

IMAGE_ID, PAD_ID = 3, 0
# 0.97B parameters: tower 79M (11 of its 12 blocks: LLaVA's features come from the second-to-last),
# connector 6M, LLM 0.89B (untied 32,000-token embeddings).
GPU_MODEL = [
    "model.vision.family=clip", "model.vision.image_size=336", "model.vision.patch_size=14",
    "model.vision.hidden_size=768", "model.vision.num_layers=12", "model.vision.num_heads=12",
    "model.vision.feature_layers=[-2]", "model.vision.post_norm=false", "model.llm.hidden_size=2048",
    "model.llm.num_layers=16", "model.llm.num_heads=16", "model.llm.num_kv_heads=8",
    "model.llm.intermediate_size=5632", "model.llm.vocab_size=32000", "model.llm.tie_embeddings=false",
    "data.max_seq_len=4096", "train.micro_batch_size=2",
]
TOY_MODEL = [
    "model.vision.family=clip", "model.vision.image_size=32", "model.vision.patch_size=8",
    "model.vision.hidden_size=32", "model.vision.num_layers=2", "model.vision.num_heads=2",
    "model.vision.feature_layers=[-2]", "model.vision.post_norm=false", "model.llm.hidden_size=64",
    "model.llm.num_layers=2", "model.llm.num_heads=4", "model.llm.num_kv_heads=2", "model.llm.intermediate_size=128",
    "model.llm.vocab_size=512", "data.max_seq_len=256", "train.micro_batch_size=2",
]
ROW_LEN = 4096  # tokens per packed row at full size (scaled with the image tokens for the toy)
WARMUP = 2  # steps before the clock starts: the first pay for allocations and kernel selection


# Each kernel `model.attention` can name, in `auto`'s order of preference, then the two that
# `auto` never takes by itself.
ARMS = [("flash-attn 2 varlen", "flash2"), ("flash-attn 4 varlen", "flash4"), ("torch varlen_attn", "torch_varlen"),
        ("SDPA (CUDA: block-diagonal mask; CPU: one call per sample)", "sdpa"),
        ("FlexAttention, document mask (compiled)", "flex")]


def run(ctx: Context) -> list[Table]:
    return [kernel_table(full=torch.cuda.is_available() and not ctx.smoke)]


def kernel_table(full: bool, steps: int | None = None) -> Table:
    """Training speed with each attention kernel that runs here: the ~1B model on CUDA when `full`,
    else the toy model; `steps` timed steps each (default 8 at full size, 3 at toy size)."""
    world_of_one()
    recipe = load_recipe(DEMO_RECIPE, [*(GPU_MODEL if full else TOY_MODEL), "train.lr=1e-5", "train.warmup_steps=0"])
    engine, params = gpu_engine(recipe)
    batches = synthetic_batches(recipe, steps=steps or (8 if full else 3))
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    title = "6. GPU: MFU of a decoder VLM, varlen kernels vs SDPA" + ("" if full else " — toy-size smoke path")
    table = Table(title, ["attention", "tokens/s/GPU", "TFLOP/s", "MFU", "peak memory GB", "step s"])
    for name, kernel in ARMS:
        why_not = attention.unavailable(kernel, engine.device, dtype, recipe.model.self_attention_head_dims)
        if why_not:
            table.rows.append([f"{name} (not run: {why_not})", None, None, None, None, None])
            continue
        attention.set_kernel(engine.module, kernel)
        table.rows.append([name, *measure(engine, batches, recipe)])
    table.notes += [
        f"{'Full size' if full else 'Toy size (no CUDA, or --smoke): not a GPU measurement'}: "
        f"{params / 1e6:,.1f}M parameters, {recipe.model.image_tokens} image tokens per image, "
        f"{str(dtype).removeprefix('torch.')} on {device_name()}; ZeRO-2, one process; micro-batches of "
        f"{recipe.train.micro_batch_size} packed rows of {batches[0]['input_ids'].shape[1]} tokens or fewer "
        f"(LLaVA-665K-like lengths), {len(batches)} timed steps after {WARMUP} of warm-up, the arms one after "
        "another on the same engine.",
        "MFU: the model's FLOPs per sample (each sample's own attention square, mmscale.models.flops) over the "
        "dense bf16 peak; none on CPU. Peak memory: CUDA's max allocated; on CPU the process's peak RSS so far.",
    ]
    return table


def gpu_engine(recipe: Recipe):
    from mmscale.models import build_vlm
    from mmscale.training.engine import build_engine

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialise a 1B model where it will train
        model = build_vlm(recipe.model, recipe.model.llm.vocab_size, IMAGE_ID)
    params = sum(p.numel() for p in model.parameters())
    return build_engine(model, recipe.train), params


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"


def synthetic_batches(recipe: Recipe, steps: int) -> list[dict]:
    """`steps` micro-batches of packed rows: random ids and pixels with LLaVA-665K-like lengths,
    scaled to the model's image tokens."""
    model, data = recipe.model, recipe.data
    scale = model.image_tokens / LLAVA_IMAGE_TOKENS
    row_len = min(data.max_seq_len, math.ceil(ROW_LEN * scale))
    generator = torch.Generator().manual_seed(0)
    samples = []
    for length, has_image in llava_665k_like_samples(steps * recipe.train.micro_batch_size * 16):
        text = round((length - LLAVA_IMAGE_TOKENS * has_image) * scale)
        # At least BOS and one labelled token around the image.
        tokens = min(row_len, model.image_tokens * has_image + max(2, text))
        samples.append(synthetic_sample(recipe, tokens, has_image, generator))
    rows = Packer(row_len, block=len(samples))(samples)
    # First-fit-decreasing opens rows longest samples first: shuffled, the steps see the usual mix.
    random.Random(0).shuffle(rows)
    per_step = recipe.train.micro_batch_size
    return [collate(rows[i * per_step : (i + 1) * per_step], PAD_ID) for i in range(steps)]


def synthetic_sample(recipe: Recipe, tokens: int, has_image: bool, generator: torch.Generator) -> dict:
    """One encoded sample as the loader makes them: an image's placeholders after BOS, labels on the text."""
    model = recipe.model
    input_ids = torch.randint(IMAGE_ID + 1, model.llm.vocab_size, (tokens,), generator=generator)
    labels = input_ids.clone()
    if has_image:
        input_ids[1 : 1 + model.image_tokens] = IMAGE_ID
        labels[: 1 + model.image_tokens] = IGNORE_INDEX
    side = model.vision.image_size
    pixels = torch.randn(int(has_image), 3, side, side, generator=generator)
    return {"input_ids": input_ids, "labels": labels, "pixel_values": pixels,
            "samples": [("synthetic", tokens, (1,) * int(has_image))]}


def measure(engine, batches: list[dict], recipe: Recipe) -> list[float | None]:
    """[tokens/s, TFLOP/s, MFU, peak memory GB, seconds per step] over `batches`, after WARMUP steps."""
    device = engine.device
    vocab = recipe.model.llm.vocab_size
    for batch in batches[:WARMUP]:
        step(engine, batch)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for batch in batches:
        step(engine, batch)
    sync(device)
    seconds = time.perf_counter() - start
    tokens = sum(int(b["meta"]["lengths"].sum()) for b in batches)
    samples = [sample for batch in batches for sample in batch["meta"]["samples"]]
    flops = sum(training_flops_per_sample(recipe.model, tokens, tiles, vocab, MODEL_PARTS)  # nothing is frozen
                for _, tokens, tiles in samples)
    peak = peak_flops(device)
    return [tokens / seconds, flops / seconds / 1e12, flops / seconds / peak if peak else None, peak_memory_gb(device),
            seconds / len(batches)]


def step(engine, batch: dict) -> None:
    inputs = {k: v.to(engine.device) for k, v in batch.items() if k != "meta"}
    engine.backward(engine(**inputs))
    engine.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
