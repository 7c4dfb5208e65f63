"""VIRAL's frozen teacher: a DINOv2 that gives each image's patch features on the student's token grid.

The loader normalises pixels for the student's tower (CLIP's statistics, at the tower's
size). The teacher was trained on ImageNet-normalised pixels, so it gets them undone and
redone in its own statistics (the official VIRAL code feeds DINOv2 CLIP-normalised pixels),
resized to its input side if that differs. Its class and register tokens are dropped, and
its patch map is resampled bilinearly to the student's token grid when the grids differ
(a pooled connector's grid is half the tower's).

The teacher is a plain object, not an `nn.Module` child of the trained model: it never
enters the optimizer, the DeepSpeed checkpoint or the export.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, Dinov2Config, Dinov2Model, PreTrainedModel

from mmscale.config.model import AlignmentConfig, DecoderModelConfig
from mmscale.errors import UserError

# DINOv2's preprocessing statistics (ImageNet's), used when a folder has no preprocessor_config.json.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEACHER_TYPES = ("dinov2", "dinov2_with_registers")
RANDOM_TEACHER_SEED = 0
RANDOM_TEACHER_LAYERS = 2


def resample_grid(features: torch.Tensor, side: int) -> torch.Tensor:
    """(images, s*s, dim) row-major patch features -> (images, side*side, dim), bilinear.

    align_corners=False: a 2x smaller grid then averages each 2x2 neighbourhood exactly,
    the same patches a pooled connector merges into one token.
    """
    images, tokens, dim = features.shape
    source = math.isqrt(tokens)
    if source * source != tokens:
        raise ValueError(f"{tokens} teacher patches do not form a square grid")
    if source == side:
        return features
    grid = features.transpose(1, 2).reshape(images, dim, source, source)
    grid = F.interpolate(grid.float(), size=(side, side), mode="bilinear", align_corners=False).to(features.dtype)
    return grid.flatten(2).transpose(1, 2)


class Teacher:
    """A frozen DINOv2 in eval mode; `features` maps the student's pixel batch to its targets."""

    def __init__(
        self,
        model: PreTrainedModel,
        name: str,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        student_mean: tuple[float, ...],
        student_std: tuple[float, ...],
        grid: int,
    ):
        self.model = model.requires_grad_(False).eval()
        self.name, self.image_size, self.mean, self.std = name, image_size, mean, std
        self.student_mean, self.student_std = student_mean, student_std
        self.grid = grid  # the student's token grid side
        self.patch_size = model.config.patch_size
        # DINOv2's class token, then register tokens (Dinov2WithRegisters), then the patches.
        self.num_prefix_tokens = 1 + getattr(model.config, "num_register_tokens", 0)
        self.forward_calls = 0  # counted, so tests and benchmarks can tell cached from online runs

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def identity(self) -> dict:
        """What the features depend on: a cache made by another teacher must not be used."""
        return {
            "model": self.name, "image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
            "grid": self.grid,
        }

    def to(self, device: torch.device, dtype: torch.dtype) -> "Teacher":
        self.model.to(device=device, dtype=dtype)
        return self

    def pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The student's normalised pixels in the teacher's normalisation and size, fp32."""
        x = pixel_values.float()
        x = x * _channels(self.student_std, x) + _channels(self.student_mean, x)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            shrink = x.shape[-1] > self.image_size
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=shrink)
        return (x - _channels(self.mean, x)) / _channels(self.std, x)

    @torch.no_grad()
    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, 3, H, W) student pixels -> (images, grid*grid, hidden_size) patch features."""
        self.forward_calls += 1
        weight = next(self.model.parameters())
        x = self.pixels(pixel_values).to(device=weight.device, dtype=weight.dtype)
        patches = self.model(pixel_values=x).last_hidden_state[:, self.num_prefix_tokens :]
        return resample_grid(patches, self.grid)


def _channels(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def build_teacher(cfg: DecoderModelConfig) -> Teacher | None:
    """The teacher of `cfg.alignment`: a local DINOv2 folder, or the seeded tiny random one;
    None for target "encoder" (the student's own tower is the target)."""
    alignment = cfg.alignment
    if alignment.target == "encoder":
        return None
    grid = math.isqrt(cfg.image_tokens)
    if alignment.teacher is None:
        model, name, mean, std = _random_teacher(alignment, cfg), _random_name(alignment), IMAGENET_MEAN, IMAGENET_STD
    else:
        model, mean, std = _load_teacher(Path(alignment.teacher))
        name = alignment.teacher
    patch = model.config.patch_size
    image_size = alignment.teacher_image_size or cfg.vision.grid_size * patch
    if image_size % patch:
        raise UserError(
            f"model.alignment.teacher_image_size={image_size} is not a multiple of the teacher's patch size {patch}"
        )
    return Teacher(model, name, image_size, mean, std, cfg.vision.image_mean, cfg.vision.image_std, grid)


def _random_name(alignment: AlignmentConfig) -> str:
    return (
        f"random-dinov2(seed={RANDOM_TEACHER_SEED}, hidden={alignment.random_teacher_hidden_size}, "
        f"patch={alignment.random_teacher_patch_size}, layers={RANDOM_TEACHER_LAYERS})"
    )


def _random_teacher(alignment: AlignmentConfig, cfg: DecoderModelConfig) -> Dinov2Model:
    hidden = alignment.random_teacher_hidden_size
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=RANDOM_TEACHER_LAYERS,
        num_attention_heads=math.gcd(hidden, 4),
        patch_size=alignment.random_teacher_patch_size,
        image_size=alignment.teacher_image_size or cfg.vision.grid_size * alignment.random_teacher_patch_size,
    )
    # Its own seed, so the teacher is the same on every rank and in every run, and the
    # global generator (which initialises the student) is left where it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_TEACHER_SEED)
        return Dinov2Model(config)


def _load_teacher(folder: Path) -> tuple[PreTrainedModel, tuple[float, ...], tuple[float, ...]]:
    if not (folder / "config.json").is_file():
        raise UserError(
            f"model.alignment.teacher: {folder} is not a Hugging Face model folder (no config.json); save a "
            "DINOv2 there with save_pretrained, or set model.alignment.teacher=null for the tiny random teacher"
        )
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.model_type not in TEACHER_TYPES:
        raise UserError(
            f"model.alignment.teacher: {folder} holds a {config.model_type!r} model; VIRAL's teacher is a DINOv2 "
            f"({' or '.join(TEACHER_TYPES)})"
        )
    model = AutoModel.from_pretrained(folder, local_files_only=True)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        settings = json.loads(processor.read_text())
        mean, std = tuple(settings.get("image_mean", mean)), tuple(settings.get("image_std", std))
    return model, mean, std
