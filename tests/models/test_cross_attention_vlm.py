"""The cross-attention VLM on its own: layer layout, zero gates, text-only batches, packing."""

from __future__ import annotations

import pytest
import torch

from mmscale.config.model import CrossAttentionConfig, CrossAttentionModelConfig, LLMConfig
from mmscale.data.tokenizer import IGNORE_INDEX
from mmscale.errors import UserError
from mmscale.models.cross_attention_vlm import CrossAttentionBlock, CrossAttentionVLM, cross_attention_layer_indices
from mmscale.models.llama import DecoderBlock, LlamaLM
from tests.helpers.cross_attention import (
    IMAGE_TOKEN,
    TINY,
    VOCAB,
    alone,
    make_sample,
    open_gates,
    pack_row,
    pad_batch,
)


@pytest.fixture
def model() -> CrossAttentionVLM:
    torch.manual_seed(0)
    return CrossAttentionVLM(TINY, VOCAB).eval()


def test_layer_layout_follows_transformers_and_llama_3_2_vision():
    big = CrossAttentionModelConfig(llm=LLMConfig(num_layers=32, tie_embeddings=False))
    assert cross_attention_layer_indices(big) == (3, 8, 13, 18, 23, 28, 33, 38)  # Llama-3.2-11B-Vision
    lm = CrossAttentionVLM(TINY, VOCAB).language_model
    kinds = [type(layer) for layer in lm.layers]
    assert kinds == [DecoderBlock, CrossAttentionBlock, DecoderBlock, CrossAttentionBlock, DecoderBlock]
    assert lm.embed_tokens.num_embeddings == VOCAB + 8 and lm.lm_head.out_features == VOCAB
    with pytest.raises(UserError, match="index past the 5 layers"):
        cross_attention_layer_indices(TINY.model_copy(update={"cross_attention": CrossAttentionConfig(layers=(1, 5))}))


def test_tied_embeddings_are_a_user_error():
    cfg = TINY.model_copy(update={"llm": TINY.llm.model_copy(update={"tie_embeddings": True})})
    with pytest.raises(UserError, match="tie_embeddings must be false"):
        CrossAttentionVLM(cfg, VOCAB)


def test_fresh_model_equals_its_text_llm(model):
    """Gates start at 0: with images and cross-attention the logits are the text LLM's."""
    llm = LlamaLM(TINY.llm, VOCAB).eval()
    lm = model.language_model
    blocks = [layer for layer in lm.layers if isinstance(layer, DecoderBlock)]
    state = {"embed_tokens.weight": lm.embed_tokens.weight[:VOCAB], "norm.weight": lm.norm.weight,
             "lm_head.weight": lm.lm_head.weight}
    for i, block in enumerate(blocks):
        state.update({f"layers.{i}.{k}": v for k, v in block.state_dict().items()})
    llm.load_state_dict(state)
    batch = pad_batch([make_sample([2], 6, seed=1), make_sample([1, 4], 5, seed=2)])
    ids = batch["input_ids"].clamp(max=VOCAB - 1)  # the LLM has no image-token row
    batch["input_ids"] = ids
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        text_only = llm(llm.embed_tokens(ids), positions)
        ours = model.logits(**batch)
        diff = (ours - text_only).abs().max().item()
        print(f"zero gates vs text LLM: max abs diff {diff:.2e}")
        assert diff <= 1e-6
        open_gates(model)
        assert (model.logits(**batch) - text_only).abs().max() > 1e-3  # the check can fail


def test_text_only_batch_skips_cross_attention_but_uses_every_parameter(model):
    open_gates(model)
    model.train()
    ids = torch.randint(2, VOCAB, (2, 12))
    labels = ids.clone()
    loss = model(ids, labels)
    loss.backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert not unused, unused
    assert model.vision_tower.patch_embedding.weight.grad.abs().sum() == 0
    with torch.no_grad():
        lm = model.language_model
        logits = lm(ids, torch.arange(12).expand(2, 12))
        plain = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(loss, plain)


def test_loss_is_mean_cross_entropy_over_labelled_next_tokens(model):
    open_gates(model)
    batch = pad_batch([make_sample([1], 7, seed=3), make_sample([2, 1], 3, seed=4)])
    labels = batch["input_ids"].clone()
    labels[labels == IMAGE_TOKEN] = IGNORE_INDEX
    labels[:, :4] = IGNORE_INDEX
    with torch.no_grad():
        logits = model.logits(**batch)
        loss = model(labels=labels, **batch)
    keep = labels[:, 1:] != IGNORE_INDEX
    log_probs = logits[:, :-1].log_softmax(-1)[keep]
    expected = -log_probs.gather(-1, labels[:, 1:][keep][:, None]).mean()
    torch.testing.assert_close(loss, expected)


def test_packed_row_gives_each_sample_its_logits_alone(model):
    open_gates(model)
    samples = [make_sample(tiles, 4, seed=5 + i) for i, tiles in enumerate([[2], [], [4, 1], [1]])]
    row = pack_row(samples)
    with torch.no_grad():
        packed = model.logits(**row)[0]
        start, worst = 0, 0.0
        for s in samples:
            n = len(s["input_ids"])
            single = model.logits(**alone(s))[0]
            worst = max(worst, (packed[start : start + n] - single).abs().max().item())
            start += n
    print(f"packed vs alone: max abs diff {worst:.2e}")
    assert worst <= 1e-5


def test_activation_checkpointing_gives_the_same_gradients(model):
    open_gates(model)
    batch = pad_batch([make_sample([3], 5, seed=9)])
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN, IGNORE_INDEX)
    grads = []
    for checkpointing in (False, True):
        cfg = TINY.model_copy(update={"llm": TINY.llm.model_copy(update={"activation_checkpointing": checkpointing})})
        copy = CrossAttentionVLM(cfg, VOCAB)
        copy.load_state_dict(model.state_dict())
        copy.train()
        copy(labels=labels, **batch).backward()
        grads.append(copy.language_model.layers[1].cross_attn.q_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_inconsistent_image_inputs_are_errors(model):
    batch = pad_batch([make_sample([2], 5, seed=10)])
    bad = {**batch, "cross_attention_mask": batch["cross_attention_mask"][:, :-1]}
    with pytest.raises(ValueError, match="cross_attention_mask has shape"):
        model.logits(**bad)
    with pytest.raises(ValueError, match="need aspect_ratio_ids"):
        model.logits(batch["input_ids"], batch["pixel_values"])
    short = {**batch, "pixel_values": batch["pixel_values"][:, :, :2],
             "aspect_ratio_mask": batch["aspect_ratio_mask"][:, :, :2],
             "cross_attention_mask": batch["cross_attention_mask"][..., :2]}
    with pytest.raises(ValueError, match="pad every image to max_num_tiles=4"):
        model.logits(**short)
