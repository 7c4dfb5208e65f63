"""Molmo2's multi-crop image input, with Pillow + torch: crops, the pooling table, the token layout.

An image becomes a low-resolution overview (the whole image resized to one crop) and a canvas
of up to `max_crops` crops that overlap by `overlap_margins` patches: the tiling whose canvas
needs the least upscaling (or, if every one shrinks the image, the least downscaling) is
chosen, the image is resized onto it, and each crop keeps its inner patches (plus the outer
margins at the canvas edges), so the kept patches tile the canvas once. Image tokens pool
2x2 windows of the overview's patches and of the canvas's kept patches; edge windows are
padded with -1 symmetrically, as transformers does.

transformers' Molmo2ImageProcessor needs torchvision, which does not import beside the CPU
build of torch, so the arithmetic is written here after it (the same float32 scale choice, the
same bilinear resize without antialiasing, rounded back to 8 bits before normalising); a GPU
test compares the two crop for crop.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import PreTrainedTokenizerBase

from mmscale.config.model import POOL_WINDOW, CropsConfig
from mmscale.config.towers import VisionConfig
from mmscale.data.schema import SampleError

# The tokens that frame an image in Molmo2's layout, as its tokenizer spells them.
PATCH, COLUMN, START, LOW_RES_START, END = "<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>", "<im_end>"
IMAGE_MARKERS = (PATCH, COLUMN, START, LOW_RES_START, END)


@dataclass(frozen=True)
class ImageTokenIds:
    """Token ids of Molmo2's image layout: `patch` carries a feature, all of `markers` (in
    IMAGE_MARKERS order, the patch first) see each other both ways."""

    patch: int
    markers: tuple[int, ...]

    @classmethod
    def of_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> ImageTokenIds:
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in IMAGE_MARKERS}
        return cls.of({t: None if i == tokenizer.unk_token_id else i for t, i in ids.items()})  # unk: absent

    @classmethod
    def of(cls, ids: dict[str, int | None]) -> ImageTokenIds:
        """From a token -> id map holding IMAGE_MARKERS."""
        missing = [t for t in IMAGE_MARKERS if ids.get(t) is None]
        if missing:
            raise ValueError(f"the tokenizer lacks Molmo2's image tokens {missing}; connector.type=molmo2 needs all "
                             f"of {list(IMAGE_MARKERS)}")
        return cls(ids[PATCH], tuple(ids[t] for t in IMAGE_MARKERS))


# transformers' per-image Molmo2 inputs, which eval prompts and export probes carry beside ours.
TRANSFORMERS_ONLY = ("image_token_pooling", "image_grids", "image_num_crops")


def ours_only(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`inputs` without TRANSFORMERS_ONLY: the keyword arguments of our models' `logits`."""
    return {k: v for k, v in inputs.items() if k not in TRANSFORMERS_ONLY}


def image_ids(image_token_id: int | ImageTokenIds) -> set[int]:
    """The ids that stand for images (the image token, or Molmo2's layout): never generated."""
    return set(image_token_id.markers) if isinstance(image_token_id, ImageTokenIds) else {image_token_id}


def select_tiling(height: int, width: int, window: int, max_crops: int) -> tuple[int, int]:
    """(rows, cols) of crops whose canvas of `window`-pixel steps fits the image best."""
    tilings = sorted(((r, c) for r in range(1, max_crops + 1) for c in range(1, max_crops + 1) if r * c <= max_crops),
                     key=lambda t: (t[0] * t[1], t[0]))
    # float32 as transformers computes it: ties between tilings are decided by these roundings.
    scales = (torch.tensor(tilings, dtype=torch.int32) * window).float() / torch.tensor([height, width]).float()
    scale = scales.amin(dim=-1)
    if torch.all(scale < 1):  # every canvas shrinks the image: the one that shrinks it least
        return tilings[int(scale.argmax())]
    return tilings[int(torch.where(scale < 1, 1e10, scale).argmin())]


def pooling_windows(grid: torch.Tensor) -> torch.Tensor:
    """(rows, cols) patch indices -> (windows, POOL_WINDOW^2) row-major windows, the grid padded
    with -1 to whole windows (the odd one split, the extra on the far side)."""
    pad_h, pad_w = (-n % POOL_WINDOW for n in grid.shape)
    grid = F.pad(grid, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=-1)
    rows, cols = grid.shape[0] // POOL_WINDOW, grid.shape[1] // POOL_WINDOW
    windows = grid.reshape(rows, POOL_WINDOW, cols, POOL_WINDOW).permute(0, 2, 1, 3)
    return windows.reshape(rows * cols, POOL_WINDOW**2)


@dataclass(frozen=True)
class CroppedImage:
    pixel_values: torch.Tensor  # (crops, 3, size, size): the overview, then the canvas's crops row by row
    image_pooling: torch.Tensor  # (image tokens, POOL_WINDOW^2) indices into the crops' patches, -1: none
    grid: tuple[int, int, int, int]  # token rows and columns of the overview and of the canvas


class MultiCrop:
    """Image bytes -> a `CroppedImage`, as Molmo2's image processor cuts it."""

    def __init__(self, crops: CropsConfig, vision: VisionConfig):
        self.crops, self.vision = crops, vision
        # transformers fuses the 1/255 rescale into the normalisation: (x - 255 mean) / (255 std).
        self.mean = torch.tensor(vision.image_mean).view(3, 1, 1) * 255.0
        self.std = torch.tensor(vision.image_std).view(3, 1, 1) * 255.0

    def _resized(self, pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """uint8 (3, H, W) -> normalised float32 (3, height, width)."""
        resized = F.interpolate(pixels[None].float(), size=(height, width), mode="bilinear", align_corners=False,
                                antialias=False)[0]
        return (resized.round().clamp(0, 255) - self.mean) / self.std

    def __call__(self, data: bytes) -> CroppedImage:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
        pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(rgb.height, rgb.width, 3)
        return self.cut(pixels.permute(2, 0, 1))

    def tiling(self, height: int, width: int) -> tuple[int, int]:
        """The crops (rows, cols) of an image of this size."""
        margin = sum(self.crops.overlap_margins) * self.vision.patch_size
        window = self.vision.image_size - margin
        return select_tiling(height - margin, width - margin, window, self.crops.max_crops)

    def grid(self, height: int, width: int) -> tuple[int, int, int, int]:
        """The token grid (`CroppedImage.grid`) of an image of this size."""
        return self.crops.token_grid(self.tiling(height, width), self.vision)

    def cut(self, pixels: torch.Tensor) -> CroppedImage:
        """uint8 (3, H, W) pixels -> the crops and pooling table."""
        size, patch = self.vision.image_size, self.vision.patch_size
        side, (left, right) = self.vision.grid_size, self.crops.overlap_margins
        window = (side - left - right) * patch
        margin = (left + right) * patch
        tiling = self.tiling(pixels.shape[1], pixels.shape[2])
        canvas = self._resized(pixels, tiling[0] * window + margin, tiling[1] * window + margin)
        crops = canvas.unfold(1, size, window).unfold(2, size, window)  # (3, rows, cols, size, size)
        crops = crops.permute(1, 2, 0, 3, 4).reshape(-1, 3, size, size)

        # Which patch of which crop each canvas patch is: inner patches, and margins at the canvas edges.
        index = torch.arange(len(crops) * side * side).view(*tiling, side, side)
        if left:
            index[1:, :, :left, :] = -1
            index[:, 1:, :, :left] = -1
        if right:
            index[:-1, :, -right:, :] = -1
            index[:, :-1, :, -right:] = -1
        kept = index.permute(0, 2, 1, 3).reshape(-1)
        high = pooling_windows(kept[kept >= 0].view(self.crops.canvas_patches(tiling, self.vision)))
        low = pooling_windows(torch.arange(side * side).view(side, side))
        # The overview is crop 0, so the canvas's patch indices move up by one crop.
        pooling = torch.cat([low, torch.where(high >= 0, high + side * side, -1)])
        overview = self._resized(pixels, size, size)
        return CroppedImage(torch.cat([overview[None], crops]), pooling, self.crops.token_grid(tiling, self.vision))

    def layout(self, grid: tuple[int, int, int, int], ids: ImageTokenIds) -> list[int]:
        """An image's tokens: the overview's rows of <im_patch> between <low_res_im_start> and
        <im_end>, then the canvas's between <im_start> and <im_end>; rows end in <im_col> as
        model.crops says."""
        patch, column, start, low_res_start, end = ids.markers
        low_h, low_w, high_h, high_w = grid
        low_row = [patch] * low_w + [column] * self.crops.overview_column_tokens
        high_row = [patch] * high_w + [column] * self.crops.column_tokens
        return [low_res_start, *low_row * low_h, end, start, *high_row * high_h, end]


@dataclass(frozen=True)
class MultiCropImages:
    """The loader's per-image transform for connector.type=molmo2: image bytes -> its crops
    (`pixel_values`), its pooling table indexing its own crops (`image_pooling`), and its crop and
    token counts (`image_crops`, `image_windows`), from which the collator makes the table's
    indices the batch's; and each image's tokens (`layout`)."""

    cut: MultiCrop
    ids: ImageTokenIds

    def __call__(self, data: bytes) -> dict[str, torch.Tensor]:
        image = self.cut(data)
        return {"pixel_values": image.pixel_values, "image_pooling": image.image_pooling,
                "image_crops": torch.tensor([len(image.pixel_values)]),
                "image_windows": torch.tensor([len(image.image_pooling)]), "image_grid": torch.tensor([image.grid])}

    def layout(self, data: bytes) -> list[int]:
        """The image's tokens, from its size alone (Pillow reads the header, not the pixels)."""
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
        return self.cut.layout(self.cut.grid(height, width), self.ids)

    def check_text(self, input_ids: list[int], layouts: list[list[int]], where: str) -> None:
        """SampleError if the sample's text itself holds image-layout tokens: they would stand for no image."""
        expected = Counter(i for layout in layouts for i in layout)
        found = Counter(i for i in input_ids if i in self.ids.markers)
        if found != expected:
            raise SampleError(f"{where}: its text holds Molmo2's image tokens ({', '.join(IMAGE_MARKERS)}), which stand "
                              "for images only", "placeholder_mismatch")

    def empty(self) -> dict[str, torch.Tensor]:
        size = self.cut.vision.image_size
        none = torch.zeros(0, dtype=torch.long)
        return {"pixel_values": torch.zeros(0, 3, size, size), "image_pooling": torch.zeros(0, POOL_WINDOW**2).long(),
                "image_crops": none, "image_windows": none, "image_grid": torch.zeros(0, 4, dtype=torch.long)}


def batch_pooling(
    image_pooling: torch.Tensor, crops: torch.Tensor, windows: torch.Tensor, patches: int
) -> torch.Tensor:
    """Pooling tables of consecutive images, each indexing its own crops' patches -> indices into
    all their crops' patches (the images' crops concatenated in the same order)."""
    offsets = ((crops.cumsum(0) - crops) * patches).repeat_interleave(windows)
    return torch.where(image_pooling >= 0, image_pooling + offsets[:, None], -1)
