"""The recipe schema: typed, validated, and strict (an unknown key is an error).

A recipe is YAML with the sections below; every field has a default, so a recipe states
only what differs. `mmscale.config.load_recipe` reads it and applies `key.sub=value`
overrides from the command line.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(Section):
    name: str = "run"
    dir: str = "runs/run"  # run directory: checkpoints, resolved recipe, metrics
    seed: int = 0


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
    tokenizer: str  # local Hugging Face tokenizer folder
    # null: the tokenizer's own chat template; or "plain" (LLaVA stage 1) or "llama3".
    chat_template: Literal["plain", "llama3"] | None = None
    max_seq_len: int = Field(2048, gt=0)
    num_workers: int = Field(1, ge=0)
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


class VisionConfig(Section):
    image_size: int = Field(224, gt=0)
    patch_size: int = Field(16, gt=0)
    hidden_size: int = Field(768, gt=0)
    num_layers: int = Field(12, gt=0)
    num_heads: int = Field(12, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    # How a non-square image becomes square: "pad" to a square of the mean colour, then resize
    # (LLaVA-1.5, keeps the whole image); "crop" the centre square (CLIP's preprocessing);
    # "squash" resize, ignoring the aspect ratio.
    resize: Literal["pad", "crop", "squash"] = "pad"
    # Normalisation of pixel values; CLIP's statistics by default.
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @model_validator(mode="after")
    def _check(self) -> "VisionConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class ConnectorConfig(Section):
    # LLaVA-1.5's "mlp2x_gelu" (Linear-GELU-Linear) or a single Linear (LLaVA-1.0).
    type: Literal["mlp", "linear"] = "mlp"


class LLMConfig(Section):
    hidden_size: int = Field(2048, gt=0)
    num_layers: int = Field(16, gt=0)
    num_heads: int = Field(32, gt=0)
    num_kv_heads: int = Field(8, gt=0)
    intermediate_size: int = Field(8192, gt=0)
    rope_theta: float = Field(500000.0, gt=0)
    rms_norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = True
    # null: the tokenizer's length rounded up to a multiple of 64 (tensor-core friendly).
    vocab_size: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "LLMConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("the head dimension (hidden_size / num_heads) must be even for RoPE")
        return self


class ModelConfig(Section):
    arch: Literal["decoder"] = "decoder"
    vision: VisionConfig = VisionConfig()
    connector: ConnectorConfig = ConnectorConfig()
    llm: LLMConfig = LLMConfig()


class TrainConfig(Section):
    # How long to train: set one of them. steps counts optimizer steps; samples counts
    # training samples over all ranks (with packing, several per row; Megatron's
    # --train-samples); epochs counts passes over data.train, sized from the shards'
    # manifest.json. With samples or epochs the cosine decay follows the samples seen.
    steps: int | None = Field(None, gt=0)
    samples: int | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)
    micro_batch_size: int = Field(8, gt=0)  # samples per rank per forward
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(1e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    zero_stage: Literal[0, 1, 2, 3] = 2
    # auto: bf16 on CUDA, fp32 on CPU (CPU bf16 matmuls are slow and imprecise).
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    log_every: int = Field(10, gt=0)
    val_every: int = Field(0, ge=0)  # 0: validate only at the end
    val_batches: int = Field(8, gt=0)  # per rank
    checkpoint_every: int = Field(0, ge=0)  # 0: only at the end
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
        if self.steps is not None and self.warmup_steps >= self.steps:
            raise ValueError(f"train.warmup_steps={self.warmup_steps} must be below train.steps={self.steps}")
        return self


class Recipe(Section):
    run: RunConfig = RunConfig()
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        image_tokens = self.model.vision.num_patches
        if self.data.max_seq_len <= image_tokens:
            raise ValueError(
                f"data.max_seq_len={self.data.max_seq_len} leaves no room for text after the "
                f"{image_tokens} image tokens of model.vision"
            )
        return self
