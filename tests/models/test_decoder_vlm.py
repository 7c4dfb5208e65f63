import pytest
import torch

from mmscale.config import load_recipe
from mmscale.data.tokenizer import IGNORE_INDEX
from mmscale.models.decoder_vlm import DecoderVLM
from tests.helpers.recipes import REPO, TINY_OVERRIDES

IMAGE_ID, VOCAB = 3, 64


@pytest.fixture
def model() -> DecoderVLM:
    torch.manual_seed(0)
    cfg = load_recipe(REPO / "recipes" / "demo.yaml", TINY_OVERRIDES).model
    return DecoderVLM(cfg, VOCAB, IMAGE_ID)


def _batch(model: DecoderVLM, images_per_row=(1, 2), seq=40):
    n = model.image_token_count
    input_ids = torch.randint(10, VOCAB, (len(images_per_row), seq))
    for row, count in enumerate(images_per_row):
        input_ids[row, 1 : 1 + count * n] = IMAGE_ID
    labels = input_ids.clone()
    labels[:, : seq // 2 + 1] = IGNORE_INDEX
    size = model.cfg.vision.image_size
    return input_ids, labels, torch.randn(sum(images_per_row), 3, size, size)


def test_forward_backward_shapes_and_gradients(model):
    input_ids, labels, pixels = _batch(model)
    embeds = model.embed(input_ids, pixels)
    assert embeds.shape == (2, 40, model.cfg.llm.hidden_size)
    loss = model(input_ids, labels, pixels)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    for name in ("vision_tower.embeddings.patch_embedding.weight", "connector.linear_1.weight", "language_model.layers.0.mlp.up_proj.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_image_features_are_spliced_at_placeholders_in_order(model):
    input_ids, _, pixels = _batch(model, images_per_row=(1, 2))
    embeds = model.embed(input_ids, pixels)
    features = model.connector(model.vision_tower(pixels))  # (3 images, n, hidden)
    n = model.image_token_count
    torch.testing.assert_close(embeds[0, 1 : 1 + n], features[0])
    torch.testing.assert_close(embeds[1, 1 : 1 + n], features[1])
    torch.testing.assert_close(embeds[1, 1 + n : 1 + 2 * n], features[2])
    text = input_ids != IMAGE_ID
    torch.testing.assert_close(embeds[text], model.language_model.embed_tokens(input_ids)[text])


def test_placeholder_and_image_count_mismatch_is_an_error(model):
    input_ids, labels, pixels = _batch(model, images_per_row=(1, 1))
    with pytest.raises(ValueError, match="image placeholder tokens for 1 images"):
        model(input_ids, labels, pixels[:1])


def test_loss_is_mean_cross_entropy_over_labelled_next_tokens(model):
    input_ids, labels, pixels = _batch(model)
    loss = model(input_ids, labels, pixels)
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    logits = model.language_model(model.embed(input_ids, pixels), positions)
    rows, cols = torch.nonzero(labels[:, 1:] != IGNORE_INDEX, as_tuple=True)
    log_probs = logits[rows, cols].log_softmax(-1)
    expected = -log_probs.gather(1, labels[rows, cols + 1, None]).mean()
    torch.testing.assert_close(loss, expected)


def test_causal_right_padding_does_not_change_real_positions(model):
    input_ids, labels, pixels = _batch(model, images_per_row=(1,), seq=30)
    padded = torch.cat([input_ids, torch.zeros(1, 10, dtype=torch.long)], dim=1)
    pos = torch.arange(30).unsqueeze(0)
    short = model.language_model(model.embed(input_ids, pixels), pos)
    long = model.language_model(model.embed(padded, pixels), torch.arange(40).unsqueeze(0))
    torch.testing.assert_close(long[:, :30], short)


def test_text_only_batch_still_uses_every_parameter(model):
    """ZeRO needs the same parameters used on every rank; an image-less batch must not skip the tower."""
    input_ids, labels, _ = _batch(model, images_per_row=(0, 0))
    loss = model(input_ids, labels, None)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
    assert model.vision_tower.embeddings.patch_embedding.weight.grad.abs().sum() == 0
    no_images = model.embed(input_ids, torch.zeros(0, 3, 32, 32))
    torch.testing.assert_close(no_images, model.language_model.embed_tokens(input_ids))
