"""Image decoding and normalisation with Pillow + torch (torchvision does not import beside the CPU torch)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mmscale.config.towers import VisionConfig


def pad_to_square(img: Image.Image, mean: tuple[float, float, float]) -> Image.Image:
    """LLaVA-1.5's expand2square: the image centred on a square of the mean colour."""
    width, height = img.size
    side = max(width, height)
    if width == height:
        return img
    # int(), not round(): LLaVA's expand2square (and transformers' LlavaImageProcessor) truncate.
    canvas = Image.new("RGB", (side, side), tuple(int(255 * m) for m in mean))
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


def resize_and_crop(img: Image.Image, side: int) -> Image.Image:
    """CLIP's preprocessing, in its order (as transformers' image processors do it): the short
    edge resized to `side`, then the centre `side` x `side` cut out."""
    width, height = img.size
    if width <= height:
        size = (side, int(side * height / width))
    else:
        size = (int(side * width / height), side)
    if size != img.size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side))


def image_to_tensor(data: bytes, cfg: VisionConfig) -> torch.Tensor:
    """Encoded image bytes -> (3, image_size, image_size) float tensor, normalised per channel.

    The square is made as transformers' LlavaImageProcessor makes it for the same setting
    (see mmscale.convert.release_files), so an exported model's processor feeds it the same pixels.
    """
    side = cfg.image_size
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if cfg.resize == "crop":
            img = resize_and_crop(img, side)
        elif cfg.resize == "pad":
            img = pad_to_square(img, cfg.image_mean)
        if img.size != (side, side):  # "squash" ignores the aspect ratio
            img = img.resize((side, side), Image.Resampling.BICUBIC)
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
