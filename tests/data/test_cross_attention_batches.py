"""Batches for the cross-attention model, from real demo shards: tiles, spans, packing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds

from mmscale.config import load_recipe
from mmscale.data.collate import Collator
from mmscale.data.encode import SampleEncoder
from mmscale.data.packing import Packer
from mmscale.data.schema import IMAGE_PLACEHOLDER
from mmscale.data.stream import RestorePoint
from mmscale.data.tiling import TiledImages
from mmscale.data.tokenizer import IGNORE_INDEX, load_tokenizer
from mmscale.models import build_model
from tests.helpers.recipes import CROSS_ATTENTION_OVERRIDES, REPO, TINY_OVERRIDES, tiny_with


@pytest.fixture(scope="module")
def setup(demo_data):
    overrides = [*tiny_with(TINY_OVERRIDES, CROSS_ATTENTION_OVERRIDES), f"data.train={demo_data / 'train'}",
                 f"data.tokenizer={demo_data / 'tokenizer'}"]
    recipe = load_recipe(REPO / "recipes" / "demo_cross_attention.yaml", overrides)
    tok = load_tokenizer(recipe.data.tokenizer)
    image_id = tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    encode = SampleEncoder(tok, TiledImages(recipe.model.tiled_vision), 1, 96, True, spans_of=image_id)
    shard = sorted((demo_data / "val").glob("*.tar"))[0]
    raw = list(wds.WebDataset(str(shard), shardshuffle=False))[:6]
    torch.manual_seed(0)
    model = build_model(recipe.model, tok).eval()
    for layer in model.modules():  # open the tanh gates, which start at 0, so images matter
        for name, param in layer.named_parameters(recurse=False):
            if "gate" in name:
                torch.nn.init.constant_(param, 0.7)
    return encode, raw, model, image_id


def _samples(encode, raw, image_id) -> list[dict]:
    samples = [encode(r) for r in raw]
    # A two-image sample (two demo samples back to back) and a text-only one (image token
    # and image dropped), as LLaVA mixes have.
    first, second = samples[0], samples[1]
    samples.append({
        "input_ids": torch.cat([first["input_ids"], second["input_ids"]]),
        "labels": torch.cat([first["labels"], second["labels"]]),
        **{k: torch.cat([first[k], second[k]]) for k in ("pixel_values", "aspect_ratio_ids", "num_tiles")},
        "image_spans": torch.cat([first["image_spans"], second["image_spans"] + len(first["input_ids"])]),
        "samples": [("two-images", len(first["input_ids"]) + len(second["input_ids"]),
                     tuple(first["num_tiles"].tolist() + second["num_tiles"].tolist()))],
    })
    keep = samples[2]["input_ids"] != image_id
    samples.append({"input_ids": samples[2]["input_ids"][keep], "labels": samples[2]["labels"][keep],
                    **{k: v[:0] for k, v in samples[2].items() if k not in ("input_ids", "labels", "samples")},
                    "samples": [("text-only", int(keep.sum()), ())]})
    for s in samples:
        s["reader"] = (0, RestorePoint())
    return samples


def test_each_image_is_tiled_and_seen_from_its_token_to_the_end_of_its_sample(setup):
    encode, raw, _, image_id = setup
    sample = encode(raw[0])
    assert sample["pixel_values"].shape == (1, 4, 3, 16, 16)  # 32-px image: a 2 x 2 canvas of 16-px tiles
    assert sample["num_tiles"].tolist() == [4] and sample["aspect_ratio_ids"].tolist() == [6]  # (2, 2)
    assert sample["samples"][0][1:] == (len(sample["input_ids"]), (4,))  # (tokens, tiles of each image): for FLOPs
    start = int((sample["input_ids"] == image_id).nonzero()[0])
    assert sample["image_spans"].tolist() == [[start, len(sample["input_ids"])]]
    batch = Collator(pad_id=0)([{**sample, "reader": None}])
    mask = batch["cross_attention_mask"][0, :, 0]  # (seq, tiles)
    assert mask[:start].sum() == 0 and bool(mask[start:].all())


def _token_losses(model, batch) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k not in ("meta", "labels")}
    logits = model.logits(**inputs)
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX,
                           reduction="none")


def test_packed_rows_give_each_sample_the_losses_it_has_alone(setup):
    encode, raw, model, image_id = setup
    samples = _samples(encode, raw, image_id)
    for s in samples:
        s["labels"][0] = s["input_ids"][0]  # only packing could make this a target; the packer masks it
    rows = Packer(budget=200, block=len(samples))(samples)
    assert len(rows) < len(samples) and max(len(r["image_spans"]) for r in rows) >= 3
    for row in rows:
        row["reader"] = (0, RestorePoint())
    packed = Collator(pad_id=0)(rows)
    with torch.no_grad():
        together = _token_losses(model, packed)
        compared = 0
        for r, row in enumerate(rows):
            for segment in range(1, int(row["segment_ids"].max()) + 1):
                where = (row["segment_ids"] == segment).nonzero().flatten()
                start, length = int(where[0]), len(where)
                sample = next(s for s in samples if torch.equal(s["input_ids"], row["input_ids"][start : start + length]))
                alone = _token_losses(model, Collator(pad_id=0)([sample]))[0]
                torch.testing.assert_close(together[r, start : start + length - 1], alone, atol=1e-5, rtol=1e-5)
                compared += 1
    assert compared == len(samples)
