"""A toy VIRAL teacher for the demo corpus: a small DINOv2-architecture ViT trained to know what is where.

VIRAL's claim rests on a teacher whose patch features encode the image's content. No
pretrained DINOv2 can be downloaded here, and a random one encodes nothing, so this trains
one: a `transformers` Dinov2Model whose every patch feature, through a linear head, must
name the demo glyph that covers the patch (one of the corpus's caption glyphs) or say
"background". The head is dropped and the model saved as a plain Dinov2Model folder that
`model.alignment.teacher` loads like a real DINOv2.

Patch labels come from the rendered pixels and the sample's own record: a patch is covered
when enough of its pixels differ from the background colour (the image's most common one),
and it belongs to the glyph whose centre is nearest (captions have one; scenes list each
object's centre). The teacher sees pixels in its own (ImageNet) normalisation, exactly as
`Teacher.pixels` converts the student's at the same side.
"""

from __future__ import annotations

import glob
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from transformers import Dinov2Config, Dinov2Model

from mmscale.alignment.teacher import IMAGENET_MEAN, IMAGENET_STD
from mmscale.demo.corpus import SCENE_OBJECTS, caption_set
from mmscale.errors import UserError

BACKGROUND = 0  # label of an uncovered patch; glyph i of the caption set is i + 1
FOREGROUND_PIXELS = 0.1  # share of a patch's pixels off the background that makes it covered
OFF_BACKGROUND = 40  # summed |RGB difference| from the background colour that counts a pixel as glyph


@dataclass(frozen=True)
class ToyTeacherConfig:
    image_size: int = 128
    patch_size: int = 32  # 4 x 4 patches at 128 px: one per scene grid cell, the demo student's grid
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0


def rgb(png: bytes) -> np.ndarray:
    """A PNG's (height, width, 3) uint8 pixels."""
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def patch_labels(rgb_pixels: np.ndarray, meta: dict, glyph_ids: dict[int, int], patch_size: int) -> np.ndarray:
    """(grid * grid,) row-major labels of one demo image (`rgb` pixels): BACKGROUND or 1 + the glyph's index."""
    pixels = rgb_pixels.astype(np.int16)
    side = pixels.shape[0]
    if side % patch_size or pixels.shape[1] != side:
        raise UserError(f"a {pixels.shape[1]}x{side} demo image does not tile into {patch_size}-px patches")
    colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    background = colours[counts.argmax()]
    off = np.abs(pixels - background).sum(-1) > OFF_BACKGROUND
    grid = side // patch_size
    covered = off.reshape(grid, patch_size, grid, patch_size).mean(axis=(1, 3)) >= FOREGROUND_PIXELS
    if "objects" in meta:  # a scene: each object's kind and centre
        by_name = {kind.name: kind.codepoint for kind in SCENE_OBJECTS}
        centres = [(o["x"], o["y"], glyph_ids[by_name[o["name"]]]) for o in meta["objects"]]
    else:  # a caption: one glyph, near the centre
        centres = [(side / 2, side / 2, glyph_ids[int(meta["codepoint"], 16)])]
    labels = np.full((grid, grid), BACKGROUND, dtype=np.int64)
    for row, col in zip(*covered.nonzero()):
        y, x = (row + 0.5) * patch_size, (col + 0.5) * patch_size
        labels[row, col] = 1 + min(centres, key=lambda c: (c[0] - x) ** 2 + (c[1] - y) ** 2)[2]
    return labels.reshape(-1)


def load_split(folder: Path, caption_glyphs: int, cfg: ToyTeacherConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a demo split folder: (images, 3, side, side) ImageNet-normalised pixels and their labels."""
    shards = sorted(glob.glob(str(folder / "*.tar")))
    if not shards:
        raise UserError(f"{folder} holds no .tar shards; build the demo data first (mmscale shards demo)")
    glyph_ids = {codepoint: i for i, (codepoint, _) in enumerate(caption_set(caption_glyphs))}
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    images, labels = [], []
    for sample in wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples()):
        meta = json.loads(sample["json"])["meta"]
        decoded = rgb(sample["img0.png"])  # once, for the labels and the pixels
        labels.append(torch.from_numpy(patch_labels(decoded, meta, glyph_ids, cfg.patch_size)))
        pixels = torch.from_numpy(decoded.astype(np.float32) / 255).permute(2, 0, 1)
        if pixels.shape[-1] != cfg.image_size:
            raise UserError(f"{folder}: {pixels.shape[-1]}-px images; the toy teacher is set for {cfg.image_size} px")
        images.append((pixels - mean) / std)
    return torch.stack(images), torch.stack(labels)


def patch_accuracy(model: Dinov2Model, head: torch.nn.Linear, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy of the head's per-patch labels: over covered patches and over all."""
    with torch.no_grad():
        predicted = torch.cat([head(model(pixel_values=x).last_hidden_state[:, 1:]).argmax(-1)
                               for x in images.split(256)])
    covered = labels != BACKGROUND
    return {
        "covered_patch_accuracy": float((predicted == labels)[covered].float().mean()),
        "patch_accuracy": float((predicted == labels).float().mean()),
    }


def train_toy_teacher(data: Path, out: Path, cfg: ToyTeacherConfig = ToyTeacherConfig()) -> dict:
    """Train on the demo build `data` (its train split; measured on val), save the Dinov2Model
    folder `out`; return the facts."""
    started = time.perf_counter()
    manifest = data / "manifest.json"
    if not manifest.is_file():
        raise UserError(f"{data} is not a finished demo build (no manifest.json); build it with mmscale shards demo")
    caption_glyphs = json.loads(manifest.read_text())["params"]["caption_glyphs"]
    torch.manual_seed(cfg.seed)
    train_x, train_y = load_split(data / "train", caption_glyphs, cfg)
    val_x, val_y = load_split(data / "val", caption_glyphs, cfg)
    config = Dinov2Config(
        image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, mlp_ratio=4,
    )
    model = Dinov2Model(config).train()
    head = torch.nn.Linear(cfg.hidden_size, 1 + caption_glyphs)
    params = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for _ in range(cfg.steps):
        batch = torch.randint(len(train_x), (cfg.batch_size,), generator=generator)
        logits = head(model(pixel_values=train_x[batch]).last_hidden_state[:, 1:])
        loss = F.cross_entropy(logits.flatten(0, 1), train_y[batch].flatten())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    facts = {
        "steps": cfg.steps, "first_train_loss": round(losses[0], 4), "final_train_loss": round(losses[-1], 4),
        **{k: round(v, 4) for k, v in patch_accuracy(model, head, val_x, val_y).items()},
        "covered_share": round(float((val_y != BACKGROUND).float().mean()), 4),
        "seconds": round(time.perf_counter() - started, 1),
    }
    model.save_pretrained(out)
    # The statistics Teacher uses to convert the student's pixels (see mmscale.alignment.teacher).
    processor = {"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "size": cfg.image_size}
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    (out / "toy_teacher.json").write_text(json.dumps({"config": cfg.__dict__, **facts}, indent=2) + "\n")
    return facts
