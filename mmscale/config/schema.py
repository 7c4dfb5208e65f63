"""The recipe schema: typed, validated, and strict (an unknown key is an error).

A recipe is YAML with the sections below; every field has a default, so a recipe states
only what differs. `mmscale.config.load_recipe` reads it and applies `key.sub=value`
overrides from the command line.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, model_validator

from mmscale.config.model import DecoderModelConfig, ModelConfig
from mmscale.config.section import Section
from mmscale.errors import UserError


class WandbConfig(Section):
    """Weights & Biases tracking (rank 0). metrics.jsonl is written either way."""

    enabled: bool = False
    project: str = Field("mmscale", min_length=1)
    entity: str | None = None  # null: the W&B account's default entity
    name: str | None = None  # null: run.name
    tags: tuple[str, ...] = ()
    # offline: compute nodes are usually air-gapped; the run is written under
    # RUN_DIR/wandb and uploaded later with `wandb sync RUN_DIR/wandb`.
    mode: Literal["offline", "online"] = "offline"


class RunConfig(Section):
    name: str = "run"
    dir: str = "runs/run"  # run directory: checkpoints, resolved recipe, metrics
    seed: int = 0
    wandb: WandbConfig = WandbConfig()


class DataSource(Section):
    """One dataset of a weighted training mixture."""

    shards: str
    weight: float = Field(1.0, gt=0)


class DataConfig(Section):
    # A folder of .tar shards, a brace pattern ("dir/train-{000000..000007}.tar"), or a URL
    # that webdataset opens ("pipe:aws s3 cp s3://bucket/x.tar -"); for train also a list of
    # {shards, weight}: each sample is drawn from a source with probability weight / sum.
    train: str | list[DataSource]
    val: str | None = None
    # Eval samples (one question, meta.question_type and meta.answer; `mmscale shards demo`
    # writes OUT/eval) that train.eval_every answers during training.
    eval: str | None = None
    tokenizer: str  # local Hugging Face tokenizer folder
    # null: the tokenizer's own chat template; or "plain" (LLaVA stage 1) or "llama3".
    chat_template: Literal["plain", "llama3"] | None = None
    # The tokenizer's token for an image, which each "<image>" placeholder of the samples
    # becomes: "<image>" in LLaVA's tokenizers and the demo's, "<|image|>" in Llama 3.2 Vision's.
    image_token: str = "<image>"
    max_seq_len: int = Field(2048, gt=0)
    num_workers: int = Field(1, ge=0)
    # Training samples are shuffled in consecutive blocks of this many per reader (after the
    # shards themselves): a restore reads at most one block again (mmscale.data.stream).
    shuffle_buffer: int = Field(1000, ge=1)
    # false: skip bad samples and shards, counted by reason in the metrics; true: stop on the first.
    strict: bool = False
    # A sample longer than max_seq_len: "truncate" cuts its end, never inside an image's
    # tokens (as LLaVA truncates at model_max_length); "skip" drops it (counted as too_long).
    overlong: Literal["truncate", "skip"] = "truncate"
    # Pack several samples into each row of pack_len tokens (default max_seq_len), chosen by
    # first-fit-decreasing over blocks of pack_block samples; micro_batch_size counts rows.
    pack: bool = False
    pack_len: int | None = Field(None, gt=0)
    pack_block: int = Field(64, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.pack_len is not None and self.pack_len < self.max_seq_len:
            raise ValueError(f"data.pack_len={self.pack_len} is below data.max_seq_len={self.max_seq_len}: a long sample would not fit")
        return self


# Parts of a model that `train.trainable` names: the vision encoder, the connector
# (projector), the LLM's own layers and embeddings, and the gated cross-attention layers.
MODEL_PARTS = ("vision_tower", "connector", "llm", "cross_attention")
# VIRAL's projector (model.alignment): not named in train.trainable, it trains whenever it exists.
ALIGNMENT_PART = "alignment_head"
# Named stages (prismatic-vlms' align / finetune / full-finetune; Llama 3.2 Vision's adapter).
STAGES = {
    "align": ("connector",),
    "finetune": ("connector", "llm"),
    "full": MODEL_PARTS,
    "adapter": ("vision_tower", "connector", "cross_attention"),
}


# bf16 gradients are summed in fp32 (training.engine); with ZeRO-1 DeepSpeed does that in its
# BF16_Optimizer, whose checkpoints its own consolidation (zero_to_fp32) rejects.
ZERO1_BF16 = (
    "train.zero_stage=1 cannot train in bf16: DeepSpeed's ZeRO-1 sums bf16 gradients in fp32 only in its "
    "BF16_Optimizer, whose checkpoints mmscale convert and eval cannot consolidate; use train.zero_stage=2 "
    "(it also partitions the gradients, for the same communication), or train.precision=fp32"
)


class TrainConfig(Section):
    # How long to train: set one of them. steps counts optimizer steps; samples counts
    # training samples over all ranks (with packing, several per row; Megatron's
    # --train-samples); epochs counts passes over data.train, sized from the shards'
    # manifest.json. With samples or epochs the cosine decay follows the samples seen.
    steps: int | None = Field(None, gt=0)
    samples: int | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    # What trains; the rest is frozen. "auto": "full" for arch decoder, "adapter" for arch
    # cross_attention (its LLM stays frozen, keeping its text ability). Or a stage of
    # STAGES ("align": connector; "finetune": connector + llm; "full"; "adapter": vision_tower
    # + connector + cross_attention), or a list of MODEL_PARTS.
    trainable: Literal["auto", "align", "finetune", "full", "adapter"] | list[
        Literal["vision_tower", "connector", "llm", "cross_attention"]
    ] = "auto"
    micro_batch_size: int = Field(8, gt=0)  # samples (or packed rows) per rank per forward
    # Rows per optimizer step over all ranks. Set, it fixes the step's size whatever the
    # number of GPUs: grad_accum = global_batch_size / (micro_batch_size x ranks), and a world
    # size that does not divide it is refused at launch; null: grad_accum as given.
    global_batch_size: int | None = Field(None, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(1e-4, gt=0)
    # Peak learning rates of single parts, e.g. {vision_tower: 5.0e-6, connector: 2.0e-4} as
    # Molmo trains them; other parts use lr. Every part follows the same schedule.
    lr_by_part: dict[
        Literal["vision_tower", "connector", "llm", "cross_attention", "alignment_head"], PositiveFloat
    ] = Field(
        default_factory=dict
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # the decay ends at lr * min_lr_ratio
    schedule: Literal["cosine", "linear"] = "cosine"  # the decay after the linear warmup
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    # ZeRO 1-3 (no stage 0: its optimizer would apply a NaN update, where ZeRO skips the step).
    zero_stage: Literal[1, 2, 3] = 2
    # Move optimizer states (and, with ZeRO-3, parameters) to CPU memory: slower steps, far
    # less accelerator memory (ZeRO-Offload / ZeRO-Infinity).
    offload: Literal["none", "optimizer", "optimizer_and_params"] = "none"
    # DeepSpeed's communication buckets, in parameters: ZeRO-2's gradient reduce and
    # all-gather buckets, ZeRO-3's gradient reduce bucket and parameter prefetch. Each is a
    # buffer of this many bf16/fp32 values on every GPU (two with overlap_comm); larger ones
    # mean fewer, larger collectives. DeepSpeed's own default, 5e8, is 1-2 GB per buffer.
    zero_bucket: int = Field(50_000_000, gt=0)
    # Reduce gradients (and, under ZeRO-3, gather parameters) while computing, at the price
    # of a second bucket.
    overlap_comm: bool = True
    # Optimizer steps in a row with a non-finite loss or gradient norm (each skipped) that stop the run.
    max_bad_steps: int = Field(5, ge=1)
    # auto: bf16 on CUDA, fp32 on CPU (CPU bf16 matmuls are slow and imprecise).
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    log_every: int = Field(10, gt=0)
    val_every: int = Field(0, ge=0)  # 0: validate only at the end
    val_batches: int = Field(8, gt=0)  # per rank
    # Answer data.eval's first eval_samples questions greedily every eval_every steps and log
    # the accuracy per question type (eval_accuracy); 0: never during training.
    eval_every: int = Field(0, ge=0)
    eval_samples: int = Field(128, gt=0)
    # Of those, how many show in the predictions table (mmscale.monitor.predictions), the same
    # ones at every eval, spread over the question types; 0: no table.
    eval_table_rows: int = Field(16, ge=0)
    checkpoint_every: int = Field(0, ge=0)  # 0: only at the end
    checkpoint_keep: int = Field(0, ge=0)  # complete checkpoints kept, the newest ones; 0: keep all
    # Also save when this many minutes passed since the last save (rank 0's clock); 0: off.
    checkpoint_every_minutes: float = Field(0, ge=0)
    # A periodic save that fails (a full disk): "stop" the run, naming the newest intact
    # checkpoint; or "continue" training and try again at the next save. The last save of a
    # run, and one asked for by a stop signal, stop it either way: nothing would come after.
    on_save_error: Literal["stop", "continue"] = "stop"
    # Append each step's sample ids to RUN_DIR/samples/rank_N.jsonl (which data each step saw).
    log_sample_ids: bool = False
    dist_timeout_s: int = Field(600, gt=0)  # every collective fails after this instead of hanging

    @model_validator(mode="before")
    @classmethod
    def _default_length(cls, values: dict) -> dict:
        if isinstance(values, dict) and all(values.get(k) is None for k in ("steps", "samples", "epochs")):
            values = {**values, "steps": 1000}
        return values

    @model_validator(mode="after")
    def _check_length(self) -> "TrainConfig":
        chosen = [k for k in ("steps", "samples", "epochs") if getattr(self, k) is not None]
        if len(chosen) > 1:
            others = " ".join(f"train.{k}=null" for k in chosen[1:])
            raise ValueError(f"train.{' and train.'.join(chosen)} are all set; set one (e.g. override {others})")
        if self.offload == "optimizer_and_params" and self.zero_stage != 3:
            raise ValueError(f"train.offload=optimizer_and_params needs train.zero_stage=3 (got {self.zero_stage})")
        if self.zero_stage == 1 and self.precision == "bf16":
            raise ValueError(ZERO1_BF16)
        if self.global_batch_size is not None and self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        if self.steps is not None and self.warmup_steps >= self.steps:
            raise ValueError(f"train.warmup_steps={self.warmup_steps} must be below train.steps={self.steps}")
        return self


    def for_world(self, world: int) -> "TrainConfig":
        """This config on `world` ranks: grad_accum derived from global_batch_size, if it is set."""
        if self.global_batch_size is None:
            return self
        per_pass = self.micro_batch_size * world
        if self.global_batch_size % per_pass:
            fits = [n for n in range(1, self.global_batch_size // self.micro_batch_size + 1)
                    if self.global_batch_size % (self.micro_batch_size * n) == 0]
            raise UserError(
                f"train.global_batch_size={self.global_batch_size} is not a multiple of train.micro_batch_size="
                f"{self.micro_batch_size} x {world} ranks: run on {', '.join(map(str, fits[-6:]))} ranks, or change "
                "train.micro_batch_size or train.global_batch_size"
            )
        return self.model_copy(update={"grad_accum": self.global_batch_size // per_pass})


class Recipe(Section):
    run: RunConfig = RunConfig()
    data: DataConfig
    model: ModelConfig = DecoderModelConfig()
    train: TrainConfig = TrainConfig()

    @property
    def trainable_parts(self) -> tuple[str, ...]:
        chosen = self.train.trainable
        if chosen == "auto":
            chosen = "full" if self.model.arch == "decoder" else "adapter"
        parts = STAGES[chosen] if isinstance(chosen, str) else tuple(chosen)
        if self.model.arch == "decoder":
            parts = tuple(p for p in parts if p != "cross_attention")
        if self.model.aligned:
            parts += (ALIGNMENT_PART,)
        return parts

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        if not self.trainable_parts:
            raise ValueError(f"train.trainable={self.train.trainable} leaves nothing to train for arch {self.model.arch}")
        if self.train.eval_every and self.data.eval is None:
            raise ValueError("train.eval_every needs data.eval: the eval samples to answer (e.g. data/demo/eval)")
        image_tokens = self.model.image_tokens
        if self.data.max_seq_len <= image_tokens:
            raise ValueError(
                f"data.max_seq_len={self.data.max_seq_len} leaves no room for text after the "
                f"{image_tokens} tokens of an image"
            )
        return self
