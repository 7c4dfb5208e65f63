import io

import pytest
import torch
from PIL import Image

from mmscale.config.towers import VisionConfig
from mmscale.data.images import image_to_tensor
from tests.helpers.recipes import toy_vision


def _png(width, height) -> bytes:
    img = Image.new("RGB", (width, height), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, width // 2, height))  # left half blue, right half red
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def _unnormalise(x: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    return x * torch.tensor(cfg.image_std).view(3, 1, 1) + torch.tensor(cfg.image_mean).view(3, 1, 1)


@pytest.mark.parametrize("mode", ["pad", "crop", "squash"])
def test_wide_image_becomes_square_as_configured(mode):
    cfg = toy_vision(image_size=32, patch_size=8, hidden_size=8, num_layers=1, num_heads=1, resize=mode)
    pixels = _unnormalise(image_to_tensor(_png(128, 64), cfg), cfg)
    assert pixels.shape == (3, 32, 32)
    top_row, middle_row = pixels[:, 0, :], pixels[:, 16, :]
    if mode == "pad":  # bands of the mean colour above and below; the full width survives
        torch.testing.assert_close(top_row[:, 16], torch.tensor(cfg.image_mean), atol=0.01, rtol=0)
        assert middle_row[2, 2] > 0.9 and middle_row[0, -3] > 0.9  # blue at the left edge, red at the right
    elif mode == "crop":  # the centre square: blue then red, no bands
        assert top_row[2, 2] > 0.9 and top_row[0, -3] > 0.9
    else:
        assert top_row[2, 2] > 0.9 and top_row[0, -3] > 0.9
        assert (pixels[2, :, :14] > 0.9).all()  # blue fills the left half over the whole height


def test_normalisation_uses_the_configured_statistics():
    cfg = toy_vision(image_size=16, patch_size=8, hidden_size=8, num_layers=1, num_heads=1,
                       image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    pixels = image_to_tensor(_png(16, 16), cfg)
    assert pixels.min() >= -1.0 - 1e-6 and pixels.max() <= 1.0 + 1e-6
    assert pixels[2, 8, 2] == pytest.approx(1.0) and pixels[0, 8, 2] == pytest.approx(-1.0)
