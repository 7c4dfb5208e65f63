"""A tiny transformers Molmo2 and our import of it, and prompts with images in both models' inputs."""

from __future__ import annotations

import json

import torch
from transformers import Molmo2Config, Molmo2ForConditionalGeneration

from mmscale.models.hf.molmo2 import crops_to_hf, read_folder
from mmscale.models.molmo2 import Molmo2VLM

VOCAB, EXTRA = 100, 8

START, END, PATCH, COL, LOW_START = 100, 101, 102, 103, 104

SIZE, PATCH_PX = 56, 14  # 4 x 4 patches per crop

PATCHES = (SIZE // PATCH_PX) ** 2


def hf_config(qk_norm_type: str = "qwen3", norm_after: bool = False, qkv_bias: bool = False) -> Molmo2Config:
    return Molmo2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=4, head_dim=8, image_size=[SIZE, SIZE], patch_size=PATCH_PX),
        adapter_config=dict(vision_feature_layer=[-1, 0], hidden_size=32, num_attention_heads=4,
                            num_key_value_heads=4, head_dim=8, intermediate_size=48, text_hidden_size=64),
        text_config=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         vocab_size=VOCAB, additional_vocab_size=EXTRA, num_hidden_layers=2, intermediate_size=96,
                         qk_norm_type=qk_norm_type, norm_after=norm_after, attention_bias=qkv_bias,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        image_start_token_id=START, image_end_token_id=END, image_patch_id=PATCH,
        low_res_image_start_token_id=LOW_START, frame_start_token_id=105, frame_end_token_id=106,
    )


def make_pair(tmp_path, **kwargs) -> tuple[Molmo2ForConditionalGeneration, Molmo2VLM]:
    torch.manual_seed(0)
    theirs = Molmo2ForConditionalGeneration(hf_config(**kwargs)).eval()
    with torch.no_grad():
        # transformers' N(0, 0.02) weights shrink the image features to nothing by the LLM, and its
        # norms start at 1 and biases at 0: give every weight a unit-gain scale and the rest noise,
        # so an error anywhere on the image path shows in the logits.
        for name, p in theirs.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(std=p.shape[1] ** -0.5)
            elif "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    theirs.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"max_crops": 4, "overlap_margins": [1, 1]}))
    cfg, tokens, state = read_folder(str(tmp_path), column_id=COL)
    ours = Molmo2VLM(cfg, VOCAB, tokens).eval()
    ours.load_state_dict(state)
    return theirs, ours


def image_tokens(overview: tuple[int, int], high: tuple[int, int]) -> list[int]:
    """Molmo2's layout of one image: the overview's rows, then the crops' (each row ends in <im_col>)."""
    def rows(h: int, w: int) -> list[int]:
        return ([PATCH] * w + [COL]) * h
    return [LOW_START, *rows(*overview), END, START, *rows(*high), END]


def image(crops: int, high: tuple[int, int], gen: torch.Generator) -> dict:
    """Random crops and a pooling table: the overview pools crop 0's 2x2 windows, the high-resolution
    rows pool random patches of the other crops, with some -1 (padding) slots."""
    overview = torch.arange(PATCHES).view(2, 2, 2, 2).permute(0, 2, 1, 3).reshape(4, 4)
    tokens = high[0] * high[1]
    pooled = torch.randint(PATCHES, crops * PATCHES, (tokens, 4), generator=gen)
    pooled[torch.rand(tokens, 4, generator=gen) < 0.25] = -1
    pooled[:, 0] = pooled[:, 0].clamp(min=PATCHES)  # at least one patch per window
    return {"crops": torch.randn(crops, 3, SIZE, SIZE, generator=gen), "pooling": torch.cat([overview, pooled]),
            "grid": [2, 2, *high], "ids": image_tokens((2, 2), high)}


def samples(gen: torch.Generator) -> list[dict]:
    """Two prompts: one image amid text; two images, the first right after the start token."""
    first = [image(3, (2, 3), gen)]
    second = [image(2, (1, 2), gen), image(4, (3, 2), gen)]
    text = lambda n: torch.randint(1, 90, (n,), generator=gen).tolist()  # noqa: E731
    return [
        {"ids": text(3) + first[0]["ids"] + text(5), "images": first},
        {"ids": [1] + second[0]["ids"] + text(2) + second[1]["ids"] + text(4), "images": second},
    ]


def hf_inputs(batch: list[dict]) -> dict:
    """transformers' inputs: right-padded rows, per-image pooling tables (their own crops' indices)."""
    longest = max(len(s["ids"]) for s in batch)
    ids = torch.zeros(len(batch), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(batch):
        ids[i, : len(s["ids"])] = torch.tensor(s["ids"])
        mask[i, : len(s["ids"])] = 1
    images = [im for s in batch for im in s["images"]]
    return {
        "input_ids": ids, "attention_mask": mask,
        "mm_token_type_ids": torch.isin(ids, torch.tensor([START, END, PATCH, COL, LOW_START])).long() * mask,
        "pixel_values": torch.cat([crops_to_hf(im["crops"], PATCH_PX) for im in images]),
        "image_token_pooling": torch.cat([im["pooling"] for im in images]),
        "image_grids": torch.tensor([im["grid"] for im in images]),
        "image_num_crops": torch.tensor([len(im["crops"]) for im in images]),
    }


def our_images(batch: list[dict]) -> dict:
    """Ours: all crops in order, pooling indices into the batch's flattened patches."""
    crops, pooling, offset = [], [], 0
    for im in (im for s in batch for im in s["images"]):
        crops.append(im["crops"])
        pooling.append(torch.where(im["pooling"] >= 0, im["pooling"] + offset, -1))
        offset += len(im["crops"]) * PATCHES
    return {"pixel_values": torch.cat(crops), "image_pooling": torch.cat(pooling)}
