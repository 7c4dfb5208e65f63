"""Image decoding and normalisation with Pillow + torch (torchvision does not import beside the CPU torch)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mmscale.config.schema import VisionConfig


def square(img: Image.Image, mode: str, mean: tuple[float, float, float]) -> Image.Image:
    """Make an RGB image square: pad with the mean colour, crop the centre, or leave it (squash)."""
    width, height = img.size
    side = max(width, height) if mode == "pad" else min(width, height)
    if mode == "squash" or width == height:
        return img
    if mode == "crop":
        left, top = (width - side) // 2, (height - side) // 2
        return img.crop((left, top, left + side, top + side))
    # int(), not round(): LLaVA's expand2square (and transformers' LlavaImageProcessor) truncate.
    canvas = Image.new("RGB", (side, side), tuple(int(255 * m) for m in mean))
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


def image_to_tensor(data: bytes, cfg: VisionConfig) -> torch.Tensor:
    """Encoded image bytes -> (3, image_size, image_size) float tensor, normalised per channel."""
    with Image.open(io.BytesIO(data)) as img:
        img = square(img.convert("RGB"), cfg.resize, cfg.image_mean)
        if img.size != (cfg.image_size, cfg.image_size):
            img = img.resize((cfg.image_size, cfg.image_size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(cfg.image_mean).view(3, 1, 1)
    std = torch.tensor(cfg.image_std).view(3, 1, 1)
    return (pixels - mean) / std


@dataclass(frozen=True)
class SquareImages:
    """Per-image transform of decoder VLMs: one normalised square of image_size px."""

    vision: VisionConfig

    def __call__(self, data: bytes) -> dict[str, torch.Tensor]:
        return {"pixel_values": image_to_tensor(data, self.vision)}

    def empty(self) -> dict[str, torch.Tensor]:
        size = self.vision.image_size
        return {"pixel_values": torch.zeros(0, 3, size, size)}
