"""The training loss runs the output layer on the labelled positions only (mmscale.models.loss):
its value and every parameter's gradient must be those of the loss over the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmscale.config import load_recipe
from mmscale.data.collate import Collator
from mmscale.data.packing import Packer
from mmscale.data.stream import RestorePoint
from mmscale.data.tokenizer import IGNORE_INDEX
from mmscale.models.cross_attention_vlm import CrossAttentionVLM
from mmscale.models.decoder_vlm import DecoderVLM
from tests.helpers.cross_attention import ASPECT_ID, open_gates
from tests.helpers.recipes import CROSS_ATTENTION_OVERRIDES, REPO, TINY_OVERRIDES, tiny_with

VOCAB, IMAGE_ID = 64, 3
CROSS_IMAGE_ID = VOCAB  # the first embedding row past the output vocabulary, as in Mllama
ARCHS = ["decoder_tied", "decoder_untied", "cross_attention"]


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "cross_attention":
        overrides = tiny_with(TINY_OVERRIDES, CROSS_ATTENTION_OVERRIDES)
        model = CrossAttentionVLM(load_recipe(REPO / "recipes" / "demo_cross_attention.yaml", overrides).model, VOCAB)
        open_gates(model)  # closed gates would leave the cross-attention layers out of the loss
        return model
    tied = "true" if arch == "decoder_tied" else "false"
    cfg = load_recipe(REPO / "recipes" / "demo.yaml", [*TINY_OVERRIDES, f"model.llm.tie_embeddings={tied}"]).model
    return DecoderVLM(cfg, VOCAB, IMAGE_ID)


def _sample(model: torch.nn.Module, images: int, text: int, gen: torch.Generator) -> dict:
    """An encoded sample: BOS, image tokens, text whose second half is the answer (labelled).
    The BOS is labelled too: only packing could make it a target, and the packer must mask it."""
    cross = isinstance(model, CrossAttentionVLM)
    image_tokens = [CROSS_IMAGE_ID] * images if cross else [IMAGE_ID] * (images * model.image_token_count)
    ids = torch.tensor([1, *image_tokens, *torch.randint(10, VOCAB, (text,), generator=gen).tolist()])
    labels = ids.clone()
    labels[1 : len(ids) - text // 2] = IGNORE_INDEX
    sample = {"input_ids": ids, "labels": labels, "samples": [("s", len(ids), (1,) * images)],
              "reader": (0, RestorePoint())}
    if not cross:
        size = model.cfg.vision.image_size
        return {**sample, "pixel_values": torch.randn(images, 3, size, size, generator=gen)}
    vcfg = model.cfg.tiled_vision
    tiles = torch.tensor([(1, 2, 4)[j % 3] for j in range(images)], dtype=torch.long)
    pixels = torch.randn(images, vcfg.max_num_tiles, 3, vcfg.image_size, vcfg.image_size, generator=gen)
    pixels *= (torch.arange(vcfg.max_num_tiles) < tiles[:, None])[..., None, None, None]
    return {
        **sample,
        "pixel_values": pixels,
        "aspect_ratio_ids": torch.tensor([ASPECT_ID[int(t)] for t in tiles], dtype=torch.long),
        "num_tiles": tiles,
        "image_spans": torch.tensor([[1 + j, len(ids)] for j in range(images)], dtype=torch.long).reshape(-1, 2),
    }


def _batch(model: torch.nn.Module, layout: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    samples = [_sample(model, images=i % 3, text=6 + 3 * i, gen=gen) for i in range(6)]
    if layout == "packed":
        rows = Packer(budget=sum(len(s["input_ids"]) for s in samples) // 2, block=len(samples))(samples)
        assert len(rows) < len(samples)
        for row in rows:
            row["reader"] = (0, RestorePoint())
        samples = rows
    batch = Collator(pad_id=0)(samples)
    del batch["meta"]
    return batch


def _reference_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss as it was: the output layer on every position, then cross-entropy ignoring the unlabelled."""
    labels = batch["labels"]
    logits = model.logits(**{k: v for k, v in batch.items() if k != "labels"})
    assert logits.shape == (*labels.shape, VOCAB)
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / int((labels[:, 1:] != IGNORE_INDEX).sum())


def _loss_and_grads(model: torch.nn.Module, loss_of) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    model.zero_grad(set_to_none=True)
    loss = loss_of()
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("arch", ARCHS)
def test_loss_and_gradients_equal_those_over_the_full_logits(arch, layout):
    model = _model(arch).train()
    batch = _batch(model, layout)
    expected, expected_grads = _loss_and_grads(model, lambda: _reference_loss(model, batch))
    loss, grads = _loss_and_grads(model, lambda: model(**batch))
    print(f"{arch} {layout}: loss {loss.item():.6f}, diff {(loss - expected).abs().item():.1e}")
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    # Every part of the model is compared: the image and text paths all carry gradients.
    assert all(grad is not None and grad.any() for grad in expected_grads.values())
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-6, msg=name)
    worst = max((grads[name] - grad).abs().max().item() for name, grad in expected_grads.items())
    print(f"  worst gradient diff {worst:.1e} over {len(grads)} parameters")

@pytest.mark.parametrize("arch", ARCHS)
def test_the_output_layer_sees_only_the_labelled_positions(arch):
    model = _model(arch)
    batch = _batch(model, "padded")
    rows = []
    handle = model.language_model.lm_head.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape))
    try:
        model(**batch)
    finally:
        handle.remove()
    assert rows == [torch.Size([int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()), model.cfg.llm.hidden_size])]


@pytest.mark.parametrize("arch", ARCHS)
def test_no_packed_position_predicts_the_next_samples_token(arch):
    """The loss shifts labels within a row, packed or not: that holds only because the packer
    leaves each sample's first token unlabelled."""
    batch = _batch(_model(arch), "packed")
    targets = batch["labels"][:, 1:] != IGNORE_INDEX
    segments = batch["segment_ids"]
    assert targets.any() and (segments[:, :-1] == segments[:, 1:])[targets].all()
