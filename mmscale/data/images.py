"""Image decoding and normalisation with Pillow + torch (torchvision does not import beside the CPU torch)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from mmscale.config.schema import VisionConfig


def image_to_tensor(data: bytes, cfg: VisionConfig) -> torch.Tensor:
    """Encoded image bytes -> (3, image_size, image_size) float tensor, normalised per channel."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if img.size != (cfg.image_size, cfg.image_size):
            img = img.resize((cfg.image_size, cfg.image_size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(cfg.image_mean).view(3, 1, 1)
    std = torch.tensor(cfg.image_std).view(3, 1, 1)
    return (pixels - mean) / std
