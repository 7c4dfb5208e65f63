import random

import pytest
import torch
import torch.nn.functional as F

from benchmarks.length_mix import llava_665k_like_lengths
from mmscale.config import load_recipe
from mmscale.data.collate import Collator
from mmscale.data.packing import Packer, first_fit_decreasing
from mmscale.data.stream import RestorePoint
from mmscale.data.tokenizer import IGNORE_INDEX
from mmscale.models.decoder_vlm import DecoderVLM
from tests.helpers.recipes import REPO, TINY_OVERRIDES


def test_first_fit_decreasing_places_every_sample_once_within_budget():
    lengths = llava_665k_like_lengths(300, seed=1)
    rows = first_fit_decreasing(lengths, 4096)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 4096 for row in rows)
    assert all(row == sorted(row) for row in rows)  # samples keep their order within a row
    assert first_fit_decreasing(lengths, 4096) == rows


def test_fill_ratio_on_a_llava_665k_like_mix():
    # 8192-token rows (e.g. 1 row per micro-batch with flash-attn varlen) over blocks of 512
    # samples; at 4096 tokens FFD reaches about 0.97, the granularity of ~700-token samples.
    lengths = llava_665k_like_lengths(4096)
    budget, block = 8192, 512
    rows = []
    for start in range(0, len(lengths), block):
        chunk = lengths[start : start + block]
        rows += [sum(chunk[i] for i in row) for row in first_fit_decreasing(chunk, budget)]
    packed_fill = sum(rows) / (len(rows) * budget)
    # Padded: micro-batches of 8 samples, each padded to its longest.
    padded = [max(lengths[i : i + 8]) * len(lengths[i : i + 8]) for i in range(0, len(lengths), 8)]
    padded_fill = sum(lengths) / sum(padded)
    assert packed_fill >= 0.97
    assert padded_fill < packed_fill


@pytest.fixture
def model():
    torch.manual_seed(0)
    cfg = load_recipe(REPO / "recipes" / "demo.yaml", TINY_OVERRIDES).model
    return DecoderVLM(cfg, vocab_size=64, image_token_id=3).eval()


def _sample(model, rng, images):
    n = model.image_token_count
    text = rng.randint(4, 20)
    ids = [1] + [3] * (n * images) + [rng.randint(10, 63) for _ in range(text)]
    labels = [IGNORE_INDEX] * (len(ids) - text // 2) + ids[len(ids) - text // 2 :]
    size = model.cfg.vision.image_size
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "samples": [(f"s{len(ids)}", len(ids), (1,) * images)],
            "pixel_values": torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(len(ids)))}


def _per_token_losses(model, batch) -> torch.Tensor:
    embeds = model.embed(batch["input_ids"], batch["pixel_values"])
    positions = batch.get("position_ids", torch.arange(embeds.shape[1]).expand(embeds.shape[:2]))
    logits = model.language_model(embeds, positions, batch.get("segment_ids"))
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX,
                           reduction="none")


def test_packed_and_unpacked_per_sample_losses_are_equal(model):
    rng = random.Random(0)
    samples = [_sample(model, rng, images=rng.choice([0, 1, 1, 2])) for _ in range(9)]
    for s in samples:
        s["reader"] = (0, RestorePoint())
        # A label on the first token, which only packing could turn into a target (of the
        # previous sample's last token): the packer must mask it.
        s["labels"][0] = s["input_ids"][0]
    budget = 96
    layout = first_fit_decreasing([len(s["input_ids"]) for s in samples], budget)
    rows = Packer(budget=budget, block=9)(samples)
    assert len(rows) == len(layout) < len(samples)  # something was packed
    for row in rows:
        row["reader"] = (0, RestorePoint())
    packed = Collator(pad_id=0)(rows)
    with torch.no_grad():
        packed_losses = _per_token_losses(model, packed)
        for r, members in enumerate(layout):
            start = 0
            for i in members:
                length = len(samples[i]["input_ids"])
                assert torch.equal(packed["input_ids"][r, start : start + length], samples[i]["input_ids"])
                alone = _per_token_losses(model, Collator(pad_id=0)([samples[i]]))[0]
                together = packed_losses[r, start : start + length - 1]
                torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
                boundary = start + length - 1  # the sample's last token: its next token is another sample's
                if boundary < packed_losses.shape[1]:
                    assert packed_losses[r, boundary] == 0
                start += length
        # The model's mean loss over the packed batch is the token-weighted mean over samples.
        mean_packed = model(**{k: v for k, v in packed.items() if k != "meta"})
        singles = [Collator(pad_id=0)([s]) for s in samples]
        total = sum(float(_per_token_losses(model, b).sum()) for b in singles)
        count = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in singles)
    assert float(mean_packed) == pytest.approx(total / count, rel=1e-5)
