"""`mmscale plan`: will a recipe fit and how fast will it go on N nodes x G GPUs, before launch.

Memory per GPU by part (mmscale.plan.memory), the global batch, FLOPs and the step time they
take at a stated MFU, the checkpoint's size and write time, the samples per second the loader
must deliver, and whether the shards give every reader equal work. When the run does not fit,
it re-plans with each knob that could fix it and says what each one gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmscale.config import Recipe
from mmscale.config.load import apply_override, parse_overrides
from mmscale.data.readers import uneven_readers
from mmscale.data.shards import manifest_counts, resolve_shards
from mmscale.data.tokenizer import recipe_tokenizer
from mmscale.launch.ending import STOP_MARGIN_S, stop_lead_needed
from mmscale.models import vocab_size_for
from mmscale.models.flops import output_layer_training, training_flops_per_sample
from mmscale.plan.batch import images_per_row, labelled_tokens_of, row_len
from mmscale.plan.memory import Memory, plan_memory

GiB = 2**30
HEADROOM = 0.10  # kept free for the allocator's fragmentation, NCCL's buffers and the CUDA context


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_memory_gb: float = 80.0  # H100 / A100-80GB
    peak_tflops: float = 989.0  # H100 SXM dense bf16
    mfu: float = 0.40  # a well-tuned 7-11B VLM run; see benchmarks/RESULTS.md for measured ones
    write_gbps: float = 2.0  # per node, to the checkpoint file system

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable_bytes(self) -> float:
        """A GPU's memory less the HEADROOM kept free."""
        return (1 - HEADROOM) * self.gpu_memory_gb * 1e9

    def holds(self, memory: Memory) -> bool:
        return memory.total <= self.usable_bytes


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    cluster: Cluster
    memory: Memory
    vocab_size: int

    @property
    def fits(self) -> bool:
        return self.cluster.holds(self.memory)


def make_plan(recipe: Recipe, cluster: Cluster, vocab_size: int | None = None) -> Plan:
    """The plan of `recipe` on `cluster`; the vocabulary is model.llm.vocab_size, else `vocab_size`,
    else the size the recipe's tokenizer gives it."""
    vocab = recipe.model.llm.vocab_size or vocab_size
    if vocab is None:
        vocab = vocab_size_for(recipe.model, recipe_tokenizer(recipe))
    # Any id in the vocabulary: the planned batch writes it where the images go.
    memory = plan_memory(recipe, cluster.world, vocab, vocab - 1, bf16=_bf16(recipe))
    return Plan(recipe, cluster, memory, vocab)


def _bf16(recipe: Recipe) -> bool:
    # A plan is for a GPU cluster, where precision "auto" means bf16.
    return recipe.train.precision != "fp32"


def knobs(plan: Plan) -> list[tuple[str, Memory]]:
    """Overrides that lower the memory, each with the memory it gives, best first."""
    recipe, options = plan.recipe, []
    model, train = recipe.model, recipe.train
    if not model.llm.activation_checkpointing:
        options.append("model.llm.activation_checkpointing=true")
    tower = "tiled_vision" if model.arch == "cross_attention" else "vision"
    if "vision_tower" in recipe.trainable_parts and not getattr(model, tower).activation_checkpointing:
        options.append(f"model.{tower}.activation_checkpointing=true")
    if train.micro_batch_size > 1:
        options.append(f"train.micro_batch_size={train.micro_batch_size // 2}")
    if train.zero_stage < 3:
        options.append("train.zero_stage=3")
    if train.offload == "none":
        options.append("train.offload=optimizer")
    results = []
    for option in options:
        tree = recipe.model_dump(mode="json")
        for path, value in parse_overrides([option]):
            apply_override(tree, path, value)
        results.append((option, make_plan(Recipe.model_validate(tree), plan.cluster, plan.vocab_size).memory))
    return sorted(results, key=lambda r: r[1].total)


def report(plan: Plan) -> str:
    recipe, cluster, memory = plan.recipe, plan.cluster, plan.memory
    train = recipe.train.for_world(cluster.world)
    lines = [f"plan: {recipe.run.name} on {cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs "
             f"({cluster.gpu_memory_gb:g} GB each), ZeRO-{train.zero_stage}, "
             f"{'bf16' if _bf16(recipe) else 'fp32'}"]
    lines.append("memory per GPU (GiB), at the largest micro-batch the loader can make:")
    for name, size in memory.rows():
        lines.append(f"  {name:<12}{size / GiB:8.1f}")
    capacity = cluster.gpu_memory_gb * 1e9
    lines.append(f"  {'total':<12}{memory.total / GiB:8.1f}   {100 * memory.total / capacity:.0f}% of the GPU")
    if plan.fits:
        lines.append(f"fits, with {100 * (1 - memory.total / capacity):.0f}% headroom (at least {HEADROOM:.0%} is asked)")
    else:
        lines.append(f"DOES NOT FIT: it needs {memory.total / GiB:.1f} GiB, {100 * (1 - HEADROOM):.0f}% of the GPU is "
                     f"{cluster.usable_bytes / GiB:.1f} GiB. Each of these alone gives:")
        for option, changed in knobs(plan):
            verdict = "fits" if cluster.holds(changed) else "still too much"
            lines.append(f"  {option:<48}{changed.total / GiB:8.1f} GiB  {verdict}")
    if recipe.model.aligned:
        lines.append("  (VIRAL's projector and teacher are not in these figures; the teacher's weights and "
                     "features add ~1 GB with a ViT-L teacher, nothing with cached features)")
    lines += _speed(plan, train)
    lines += _shards(recipe, cluster)
    return "\n".join(lines)


def _step_flops(plan: Plan) -> tuple[float, int]:
    """(FLOPs per sample, samples per step) of the planned step."""
    recipe, cluster = plan.recipe, plan.cluster
    train = recipe.train.for_world(cluster.world)
    samples_per_row = images_per_row(recipe)
    tokens = row_len(recipe) // samples_per_row
    if recipe.model.arch == "cross_attention":
        tiles = (recipe.model.tiled_vision.max_num_tiles,)
    elif recipe.model.is_molmo2:  # the overview and the longest layout's crops
        rows, cols = recipe.model.crops.longest_tiling(recipe.model.vision)
        tiles = (1 + rows * cols,)
    else:
        tiles = (1,)
    per_sample = training_flops_per_sample(recipe.model, tokens, tiles, plan.vocab_size, recipe.trainable_parts)
    # The output layer runs only at the labelled positions (as the trainer counts MFU).
    unlabelled = tokens - labelled_tokens_of(recipe, tokens)
    per_sample -= output_layer_training(recipe.model, unlabelled, plan.vocab_size, recipe.trainable_parts)
    return per_sample, train.micro_batch_size * train.grad_accum * cluster.world * samples_per_row


def step_seconds(plan: Plan) -> float:
    per_sample, samples = _step_flops(plan)
    cluster = plan.cluster
    return per_sample * samples / (cluster.world * cluster.mfu * cluster.peak_tflops * 1e12)


def save_seconds(plan: Plan) -> float:
    return _checkpoint_bytes(plan) / (plan.cluster.nodes * plan.cluster.write_gbps * 1e9)


def stop_lead_s(plan: Plan) -> int:
    """The stop lead the plan's step and save times need (launch.ending.stop_lead_needed)."""
    return stop_lead_needed(step_seconds(plan), save_seconds(plan))


def _speed(plan: Plan, train) -> list[str]:
    recipe, cluster = plan.recipe, plan.cluster
    rows = train.micro_batch_size * train.grad_accum * cluster.world
    samples_per_row = images_per_row(recipe)
    per_sample, samples = _step_flops(plan)
    step_s = step_seconds(plan)
    checkpoint = _checkpoint_bytes(plan)
    save_s = save_seconds(plan)
    return [
        f"global batch: {train.micro_batch_size} x {train.grad_accum} accumulation x {cluster.world} GPUs = {rows} rows"
        + (f" (up to {samples} samples: the plan's packed rows hold {samples_per_row}, the most that fit)"
           if recipe.data.pack else ""),
        f"step: {per_sample * samples / 1e15:.1f} PFLOPs, ~{step_s:.1f} s at {cluster.mfu:.0%} MFU of "
        f"{cluster.peak_tflops:g} TFLOPs; the loader must deliver {samples / step_s:.0f} samples/s "
        f"({samples / step_s / cluster.world:.1f} per GPU)",
        f"checkpoint: ~{checkpoint / 1e9:.2g} GB, ~{save_s:.2g} s to write at {cluster.write_gbps:g} GB/s per node"
        + (" (without the frozen weights: model.pretrained gives them)"
           if plan.memory.saved_frozen == 0 and plan.memory.trainable < plan.memory.parameters else "")
        + f"; every {recipe.train.checkpoint_every or 'end-of-run'} steps, keeping {recipe.train.checkpoint_keep or 'all'}",
        f"stop: SIGUSR2 at least {stop_lead_s(plan)} s before the time limit (a step, twice the save, "
        f"{STOP_MARGIN_S} s); mmscale submit sends it so unless --signal-delay says otherwise",
    ]


def _checkpoint_bytes(plan: Plan) -> int:
    # DeepSpeed writes the trainable weights' fp32 master copies and Adam moments, offloaded or
    # not; their 16-bit copies in the module's state under ZeRO-1/2 (ZeRO-3's module holds
    # none); and the frozen weights once (ZeRO-2's frozen fragments share the module's
    # storage), unless model.pretrained gives them. Measured on tiny models within pickling's overhead.
    memory, width = plan.memory, 2 if _bf16(plan.recipe) else 4
    sixteen_bit = memory.trainable if plan.recipe.train.zero_stage < 3 else 0
    return width * (sixteen_bit + memory.saved_frozen) + 12 * memory.trainable


def _shards(recipe: Recipe, cluster: Cluster) -> list[str]:
    data = recipe.data.train
    if not isinstance(data, str) or "://" in data or data.startswith("pipe:") or not Path(data).is_dir():
        return ["shards: not checked (data.train is not a local folder here)"]
    shards = resolve_shards(data, "data.train")
    readers = cluster.world * max(1, recipe.data.num_workers)
    if len(shards) < readers:
        return [f"shards: {len(shards)} for {readers} readers: too few, `mmscale shards build --readers {readers}`"]
    counts = manifest_counts(shards)
    problem = uneven_readers(counts, readers) if counts else None
    return [f"shards: {len(shards)} for {readers} readers: " + (problem or "every reader gets equal work")]
