"""The image encoders of a recipe's `model` section: a decoder VLM's ViT (`model.vision`, from a
named preset of a released tower) and a cross-attention VLM's tiled encoder (`model.tiled_vision`,
whose defaults are Llama 3.2 Vision's)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mmscale.config.section import Section

# Pixel statistics of the image processors: CLIP's (OpenAI's, also Llama 3.2 Vision's), and
# SigLIP's, which normalises to [-1, 1].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN_STD = (0.5, 0.5, 0.5)

VisionPreset = Literal["siglip-base-patch16-224", "siglip-so400m-patch14-384", "clip-vit-large-patch14-336"]

# Released towers, as their Hugging Face folders' config.json (vision_config) and
# preprocessor_config.json give them: google/siglip-base-patch16-224,
# google/siglip-so400m-patch14-384 and openai/clip-vit-large-patch14-336 (LLaVA-1.5's, Molmo's).
VISION_PRESETS: dict[str, dict[str, object]] = {
    "siglip-base-patch16-224": dict(
        family="siglip", image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12,
        intermediate_size=3072, activation="gelu_tanh", layer_norm_eps=1e-6,
        image_mean=SIGLIP_MEAN_STD, image_std=SIGLIP_MEAN_STD,
    ),
    "siglip-so400m-patch14-384": dict(
        family="siglip", image_size=384, patch_size=14, hidden_size=1152, num_layers=27, num_heads=16,
        intermediate_size=4304, activation="gelu_tanh", layer_norm_eps=1e-6,
        image_mean=SIGLIP_MEAN_STD, image_std=SIGLIP_MEAN_STD,
    ),
    "clip-vit-large-patch14-336": dict(
        family="clip", image_size=336, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
        intermediate_size=4096, activation="quick_gelu", layer_norm_eps=1e-5, image_mean=CLIP_MEAN, image_std=CLIP_STD,
    ),
}


class VisionConfig(Section):
    # The released tower the fields below describe (VISION_PRESETS): its values fill the fields a
    # recipe leaves unset. null: none; then every field without a default here must be given.
    preset: VisionPreset | None = "siglip-base-patch16-224"
    # The ViT's weight layout. "clip": a class token, a LayerNorm before the blocks
    # (`pre_layrnorm`), no patch-embedding bias; "siglip": patch tokens only, a patch bias.
    family: Literal["clip", "siglip"]
    image_size: int = Field(gt=0)
    patch_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)  # the pretrained tower's depth; see feature_layers
    num_heads: int = Field(gt=0)
    intermediate_size: int | None = Field(None, gt=0)  # MLP width; null: 4 x hidden_size
    # MLP activation: CLIP uses quick_gelu (x * sigmoid(1.702 x)), SigLIP gelu_tanh.
    activation: Literal["gelu", "gelu_tanh", "quick_gelu"]
    layer_norm_eps: float = Field(gt=0)  # CLIP 1e-5, SigLIP 1e-6
    # Which hidden states feed the connector, indexed like transformers' `hidden_states`:
    # 0 is the embedding output, i the output of block i, negative counts from the end.
    # Several are concatenated on the feature axis (LLaVA-1.5: [-2]; Molmo: [-3, -9]).
    # Blocks after the deepest one listed are not built: they would never get a gradient.
    feature_layers: tuple[int, ...] = (-1,)
    # Apply the final LayerNorm (`post_layernorm`) to the features; LLaVA's features skip it.
    post_norm: bool = True
    # How a non-square image becomes square: "pad" to a square of the mean colour, then resize
    # (LLaVA-1.5, keeps the whole image); "crop" the centre square (CLIP's preprocessing);
    # "squash" resize, ignoring the aspect ratio.
    resize: Literal["pad", "crop", "squash"] = "pad"
    # Normalisation of pixel values (the tower's image processor's image_mean and image_std).
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    # Recompute each block's activations in the backward pass instead of storing them (as
    # model.llm's); only a tower that trains checkpoints, a frozen one stores nothing anyway.
    activation_checkpointing: bool = False

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, values: object) -> object:
        if not isinstance(values, dict):
            return values
        preset = values.get("preset", cls.model_fields["preset"].default)
        return {**VISION_PRESETS.get(preset, {}), **values}  # an unknown name: the Literal names the choices

    @model_validator(mode="after")
    def _check(self) -> "VisionConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not self.feature_layers:
            raise ValueError("feature_layers is empty; list at least one hidden state, e.g. [-1]")
        bad = [i for i in self.feature_layers if not -self.num_layers - 1 <= i <= self.num_layers]
        if bad:
            raise ValueError(
                f"feature_layers {bad} out of range for num_layers={self.num_layers} "
                f"(valid: {-self.num_layers - 1} to {self.num_layers})"
            )
        if len(set(self.feature_layer_ids)) != len(self.feature_layers):
            raise ValueError(f"feature_layers {list(self.feature_layers)} name the same hidden state twice")
        return self

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def mlp_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    @property
    def feature_layer_ids(self) -> tuple[int, ...]:
        """feature_layers as non-negative indices into the num_layers + 1 hidden states."""
        return tuple(i % (self.num_layers + 1) for i in self.feature_layers)

    @property
    def depth(self) -> int:
        """Blocks the tower builds and runs: up to the deepest feature layer."""
        return max(self.feature_layer_ids)

    @property
    def feature_size(self) -> int:
        """Width of the features the connector receives (hidden_size per feature layer)."""
        return self.hidden_size * len(self.feature_layers)


class TiledVisionConfig(Section):
    """The tiled vision encoder of Llama 3.2 Vision (transformers' MllamaVisionModel), used by
    arch "cross_attention": an image is split into up to max_num_tiles square tiles."""

    image_size: int = Field(560, gt=0)  # side of one tile, in pixels
    patch_size: int = Field(14, gt=0)
    hidden_size: int = Field(1280, gt=0)
    num_layers: int = Field(32, gt=0)  # the local transformer, run on each image's tiles
    num_global_layers: int = Field(8, gt=0)  # the gated global transformer after it
    num_heads: int = Field(16, gt=0)
    intermediate_size: int = Field(5120, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    max_num_tiles: int = Field(4, gt=0)
    # Local layers whose outputs are appended to the final features (0-based).
    intermediate_layers: tuple[int, ...] = (3, 7, 15, 23, 30)
    # (rows, columns) tile grids; aspect_ratio_ids index them from 1 (0 is a padding image).
    supported_aspect_ratios: tuple[tuple[int, int], ...] = (
        (1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)
    )
    # Normalisation of pixel values; Llama 3.2 Vision's processor uses CLIP's statistics.
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    # Recompute each local and global layer's activations in the backward pass instead of storing
    # them: at Llama 3.2 Vision's sizes the encoder stores ~11 GB per 4-tile image in bf16, ~0.8 GB so.
    activation_checkpointing: bool = False

    @model_validator(mode="after")
    def _check(self) -> "TiledVisionConfig":
        if self.image_size % self.patch_size:
            raise ValueError(
                f"tiled_vision.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"tiled_vision.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if any(not 0 <= i < self.num_layers for i in self.intermediate_layers):
            raise ValueError(
                f"tiled_vision.intermediate_layers {list(self.intermediate_layers)} must lie in [0, {self.num_layers})"
            )
        if any(r * c > self.max_num_tiles for r, c in self.supported_aspect_ratios):
            raise ValueError(
                f"tiled_vision.supported_aspect_ratios has a grid of more than max_num_tiles={self.max_num_tiles} tiles"
            )
        if self.num_patches % 8 == 0:
            # transformers' Mllama masks every patch when no padding to a multiple of 8 is
            # needed, so such a model would not export with the same logits.
            raise ValueError(
                f"tiled_vision: (image_size / patch_size)^2 + 1 = {self.num_patches} must not be a multiple of 8"
            )
        return self

    @property
    def num_patches(self) -> int:
        """Tokens per tile: the patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def output_dim(self) -> int:
        """Feature width: the global output concatenated with the intermediate layers."""
        return self.hidden_size * (1 + len(self.intermediate_layers))
