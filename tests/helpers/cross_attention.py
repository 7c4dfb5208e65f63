"""A tiny cross-attention VLM config and samples in transformers' Mllama shapes: padded batches, packed rows."""

from __future__ import annotations

import torch

from mmscale.config.model import CrossAttentionConfig, CrossAttentionModelConfig, LLMConfig
from mmscale.config.towers import TiledVisionConfig

VOCAB = 128

IMAGE_TOKEN = VOCAB  # the first embedding row past the output vocabulary, as in Mllama

TILES = 4


# Tile count -> aspect ratio id in the default supported_aspect_ratios (ids count from 1).
ASPECT_ID = {1: 1, 2: 2, 3: 3, 4: 6}

TINY = CrossAttentionModelConfig(
    llm=LLMConfig(
        hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=128, tie_embeddings=False
    ),
    cross_attention=CrossAttentionConfig(layers=(1, 3)),
    tiled_vision=TiledVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_global_layers=1, num_heads=4,
        intermediate_size=64, max_num_tiles=TILES, intermediate_layers=(0, 1),
    ),
)


def make_sample(tiles_per_image: list[int], text_len: int, seed: int, size: int = 32) -> dict:
    """One sample in transformers' shapes (without the batch axis): BOS, then per image its
    token and text. Text after image j sees image j; the last stretch sees every image."""
    gen = torch.Generator().manual_seed(seed)
    ids, owner = [1], [-1]
    for j in range(len(tiles_per_image)):
        ids += [IMAGE_TOKEN] + torch.randint(2, VOCAB, (text_len,), generator=gen).tolist()
        owner += [j] * (text_len + 1)
    n = len(tiles_per_image)
    cross = torch.zeros(len(ids), n, TILES, dtype=torch.long)
    tile_mask = torch.zeros(n, TILES, dtype=torch.long)
    for j, count in enumerate(tiles_per_image):
        tile_mask[j, :count] = 1
    for pos, j in enumerate(owner):
        if j == n - 1:
            cross[pos] = tile_mask
        elif j >= 0:
            cross[pos, j] = tile_mask[j]
    pixels = torch.randn(n, TILES, 3, size, size, generator=gen) * tile_mask[:, :, None, None, None]
    return {
        "input_ids": torch.tensor(ids),
        "pixel_values": pixels,
        "aspect_ratio_ids": torch.tensor([ASPECT_ID[c] for c in tiles_per_image], dtype=torch.long),
        "aspect_ratio_mask": tile_mask,
        "cross_attention_mask": cross,
    }


def pad_batch(samples: list[dict]) -> dict:
    """Right-padded rows; absent images are zeros with aspect ratio id 0, as Mllama's processor pads."""
    seq = max(len(s["input_ids"]) for s in samples)
    images = max(len(s["aspect_ratio_ids"]) for s in samples)
    b = len(samples)
    size = samples[0]["pixel_values"].shape[-1]
    out = {
        "input_ids": torch.zeros(b, seq, dtype=torch.long),
        "pixel_values": torch.zeros(b, images, TILES, 3, size, size),
        "aspect_ratio_ids": torch.zeros(b, images, dtype=torch.long),
        "aspect_ratio_mask": torch.zeros(b, images, TILES, dtype=torch.long),
        "cross_attention_mask": torch.zeros(b, seq, images, TILES, dtype=torch.long),
    }
    for row, s in enumerate(samples):
        n, m = len(s["input_ids"]), len(s["aspect_ratio_ids"])
        out["input_ids"][row, :n] = s["input_ids"]
        out["pixel_values"][row, :m] = s["pixel_values"]
        out["aspect_ratio_ids"][row, :m] = s["aspect_ratio_ids"]
        out["aspect_ratio_mask"][row, :m] = s["aspect_ratio_mask"]
        out["cross_attention_mask"][row, :n, :m] = s["cross_attention_mask"]
    return out


def pack_row(samples: list[dict]) -> dict:
    """All samples in one row: restarting positions, segment ids 1..n, images in sample order."""
    seq = sum(len(s["input_ids"]) for s in samples)
    images = sum(len(s["aspect_ratio_ids"]) for s in samples)
    cross = torch.zeros(1, seq, images, TILES, dtype=torch.long)
    pos = img = 0
    for s in samples:
        n, m = len(s["input_ids"]), len(s["aspect_ratio_ids"])
        cross[0, pos : pos + n, img : img + m] = s["cross_attention_mask"]
        pos, img = pos + n, img + m

    def cat(key: str) -> torch.Tensor:
        return torch.cat([s[key] for s in samples])[None]

    return {
        "input_ids": cat("input_ids"),
        "pixel_values": cat("pixel_values"),
        "aspect_ratio_ids": cat("aspect_ratio_ids"),
        "aspect_ratio_mask": cat("aspect_ratio_mask"),
        "cross_attention_mask": cross,
        "position_ids": torch.cat([torch.arange(len(s["input_ids"])) for s in samples])[None],
        "segment_ids": torch.cat([torch.full((len(s["input_ids"]),), i + 1) for i, s in enumerate(samples)])[None],
    }


def alone(sample: dict) -> dict:
    """A batch of this one sample; a sample without images is a text-only batch."""
    if not len(sample["aspect_ratio_ids"]):
        return {"input_ids": sample["input_ids"][None]}
    return pad_batch([sample])


def open_gates(model: torch.nn.Module, seed: int = 0) -> None:
    """Random non-zero values for every gate, so that cross-attention and tile embeddings matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Only the tanh gates: a match on the full name would also catch the MLPs'
            # gate_proj and the gated_positional_embedding tables, and all-positive
            # matrices of that size make the model so ill-conditioned that fp32 rounding
            # alone (transformers' too) moves the logits by ~5e-5.
            if "gate" in name.rsplit(".", 1)[-1]:
                param.copy_(torch.rand(param.shape, generator=gen) * 1.5 + 0.3)
