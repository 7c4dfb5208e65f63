"""The recipe's `model` section, one class per architecture (`model.arch`): a decoder VLM
(DecoderModelConfig: a tower, connector and crops, VIRAL's alignment) or a cross-attention VLM
(CrossAttentionModelConfig: a tiled encoder and cross-attention layers); both have the LLM, the
folders it starts from and the attention kernel. A section of the other architecture is an error."""

from __future__ import annotations

from typing import Annotated, Any, Callable, Literal, Union

from pydantic import Discriminator, Field, Tag, TypeAdapter, field_validator, model_validator

from mmscale.config.section import Section
from mmscale.config.towers import TiledVisionConfig, VisionConfig


# Side of the patch neighbourhood that the pooling connectors merge into one token.
POOL_WINDOW = 2


class ConnectorConfig(Section):
    # "mlp": LLaVA-1.5's "mlp2x_gelu" (Linear-GELU-Linear); "linear": one Linear (LLaVA-1.0);
    # "pool_mlp": the mlp over each 2x2 patch neighbourhood's concatenated features, so an
    # image takes 4x fewer tokens (done as InternVL's pixel shuffle); "molmo": Molmo's own
    # 2x2 attention pooling (vision.num_heads heads) and SwiGLU projector (as wide as the
    # LLM's MLP), 2.7x the parameters of pool_mlp at Molmo-7B's sizes.
    # "molmo2": Molmo2's adapter: the same pooling over the windows the multi-crop layout lists
    # (model.crops), a SwiGLU projector `intermediate_size` wide, image features added to the
    # embeddings of their `<im_patch>` tokens, and image tokens attending to each other both ways.
    type: Literal["mlp", "linear", "pool_mlp", "molmo", "molmo2"] = "mlp"
    # Biases in the Linear layers (LLaVA's multimodal_projector_bias); the molmo connectors'
    # attention pooling always has them, as Molmo's does.
    bias: bool = True
    # The molmo connectors' SwiGLU width; null: model.llm.intermediate_size (Molmo's choice).
    intermediate_size: int | None = Field(None, gt=0)

    @property
    def pools(self) -> bool:
        return self.type in ("pool_mlp", "molmo", "molmo2")

    def tokens_per_crop(self, vision: VisionConfig) -> int:
        """Tokens the connector makes of one pass of the tower (a whole image, or one of Molmo2's
        crops): its patches (never the class token), divided by the pooling window's area. The
        tokens an image takes in the sequence are the model's `image_tokens`."""
        if not self.pools:
            return vision.num_patches
        if self.type == "molmo2":  # per crop, for FLOPs (overlapping crops pool fewer: model.crops)
            return (-(-vision.grid_size // POOL_WINDOW)) ** 2
        if vision.grid_size % POOL_WINDOW:
            raise ValueError(
                f"connector.type={self.type} merges {POOL_WINDOW}x{POOL_WINDOW} patches, but the vision grid is "
                f"{vision.grid_size}x{vision.grid_size} (image_size / patch_size); make it even"
            )
        return vision.num_patches // POOL_WINDOW**2


class CropsConfig(Section):
    """Molmo2's multi-crop image input (connector.type=molmo2): a low-resolution overview of the
    whole image at model.vision.image_size, then the image resized onto a grid of at most
    `max_crops` crops of that size that overlap by `overlap_margins` patches (left/top, right/bottom);
    each crop keeps only its inner patches, so the high-resolution view is one seamless grid."""

    max_crops: int = Field(8, gt=0)
    overlap_margins: tuple[int, int] = (4, 4)
    # An <im_col> token after each row of image tokens, in the crops' view and in the overview's
    # (released Molmo2 processors: true, false).
    column_tokens: bool = True
    overview_column_tokens: bool = False

    @model_validator(mode="after")
    def _check(self) -> "CropsConfig":
        if min(self.overlap_margins) < 0:
            raise ValueError(f"crops.overlap_margins {list(self.overlap_margins)} must not be negative")
        return self

    def canvas_patches(self, tiling: tuple[int, int], vision: VisionConfig) -> tuple[int, int]:
        """Patch rows and columns of the high-resolution view: `tiling` crops, each contributing
        its inner patches, plus the outer margins of the crops at the edges."""
        margins = sum(self.overlap_margins)
        inner = vision.grid_size - margins
        return tiling[0] * inner + margins, tiling[1] * inner + margins

    def token_grid(self, tiling: tuple[int, int], vision: VisionConfig) -> tuple[int, int, int, int]:
        """(overview rows, cols, crops' rows, cols) of image tokens, one per POOL_WINDOW^2 window
        (partial windows at the edges included): transformers' `image_grids` row."""
        def pooled(n: int) -> int:
            return -(-n // POOL_WINDOW)
        high = self.canvas_patches(tiling, vision)
        return pooled(vision.grid_size), pooled(vision.grid_size), pooled(high[0]), pooled(high[1])

    def layout_length(self, grid: tuple[int, int, int, int]) -> int:
        """Tokens of one image's layout: both views' tokens, their <im_col>s and four start/end markers."""
        low_h, low_w, high_h, high_w = grid
        return (low_h * (low_w + self.overview_column_tokens) + high_h * (high_w + self.column_tokens) + 4)

    def longest_tiling(self, vision: VisionConfig) -> tuple[int, int]:
        """The tiling whose layout is the longest an image can take."""
        tilings = [(r, c) for r in range(1, self.max_crops + 1) for c in range(1, self.max_crops // r + 1)]
        return max(tilings, key=lambda t: self.layout_length(self.token_grid(t, vision)))

    def max_layout_length(self, vision: VisionConfig) -> int:
        return self.layout_length(self.token_grid(self.longest_tiling(vision), vision))


class RopeScalingConfig(Section):
    """Llama 3.1's RoPE frequency scaling (transformers' "llama3" rope type); defaults are Llama 3.1's.

    Wavelengths shorter than original_max_position_embeddings / high_freq_factor keep their
    frequency, those longer than original_max_position_embeddings / low_freq_factor are
    slowed down by `factor`, and those in between are blended.
    """

    factor: float = Field(8.0, ge=1)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    original_max_position_embeddings: int = Field(8192, gt=0)  # the context length of pretraining

    @model_validator(mode="after")
    def _check(self) -> "RopeScalingConfig":
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"rope_scaling.high_freq_factor={self.high_freq_factor} must be above "
                f"rope_scaling.low_freq_factor={self.low_freq_factor}"
            )
        return self


class LLMConfig(Section):
    hidden_size: int = Field(2048, gt=0)
    num_layers: int = Field(16, gt=0)
    num_heads: int = Field(32, gt=0)
    num_kv_heads: int = Field(8, gt=0)
    intermediate_size: int = Field(8192, gt=0)
    rope_theta: float = Field(500000.0, gt=0)
    rope_scaling: RopeScalingConfig | None = None  # null: plain RoPE (Llama 2, Llama 3.0)
    rms_norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = True
    # null: the tokenizer's length rounded up to a multiple of 64 (tensor-core friendly).
    vocab_size: int | None = Field(None, gt=0)
    # Width of each attention head; null: hidden_size / num_heads. Qwen3 sets it apart
    # (Qwen3-4B: 2560 wide, 32 heads of 128).
    head_dim: int | None = Field(None, gt=0)
    # Biases on the q, k and v projections (Qwen2 and Qwen2.5; o_proj has none).
    qkv_bias: bool = False
    # An RMSNorm of q and of k before RoPE: over each head, one weight per head dimension
    # (qk_norm_over=head: Qwen3), or over all heads at once (projection: OLMo 2, some Molmo2).
    qk_norm: bool = False
    qk_norm_over: Literal["head", "projection"] = "head"
    # Norms on each sublayer's output, before the residual add, instead of on its input
    # (OLMo 2's reordered norm; transformers' Molmo2 `norm_after`).
    norm_after: bool = False
    # Embedding rows past the output vocabulary: tokens the model reads but never predicts
    # (Molmo2's 128 image-marker tokens, transformers' `additional_vocab_size`).
    additional_vocab_size: int = Field(0, ge=0)
    # Recompute each decoder block's activations in the backward pass instead of storing
    # them: about a third more compute for much less activation memory.
    activation_checkpointing: bool = False

    @model_validator(mode="after")
    def _check(self) -> "LLMConfig":
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                             "or set head_dim")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_size % 2:
            raise ValueError(f"the head dimension {self.head_size} must be even for RoPE")
        if self.additional_vocab_size and self.tie_embeddings:
            raise ValueError(f"additional_vocab_size={self.additional_vocab_size} needs tie_embeddings=false: the "
                             "embedding table is longer than the output layer, so they cannot share weights")
        return self

    @property
    def head_size(self) -> int:
        """`head_dim` resolved: the width of each attention head."""
        return self.head_dim or self.hidden_size // self.num_heads


class CrossAttentionConfig(Section):
    # Positions of the gated cross-attention layers in the combined layer list (model.llm's
    # self-attention blocks plus these), as transformers' MllamaTextConfig.cross_attention_layers;
    # null: one before every 4th self-attention block, Llama 3.2 Vision's [3, 8, 13, ...].
    layers: tuple[int, ...] | None = None

    @model_validator(mode="after")
    def _check(self) -> "CrossAttentionConfig":
        layers = self.layers
        if layers is not None and (any(i < 0 for i in layers) or list(layers) != sorted(set(layers))):
            raise ValueError(f"cross_attention.layers {list(layers)} must be distinct, increasing and non-negative")
        return self


class PretrainedConfig(Section):
    """Local Hugging Face folders to start from; nothing is ever downloaded. Parts not named
    here start from random weights. The folders' config.json must agree with the recipe's
    model sections, which are checked against them before training."""

    # A whole VLM: LlavaForConditionalGeneration (arch decoder), MllamaForConditionalGeneration
    # (arch cross_attention) or Molmo2ForConditionalGeneration (connector.type molmo2), e.g. an
    # exported stage-1 run for stage 2.
    vlm: str | None = None
    vision: str | None = None  # a CLIPVisionModel / SiglipVisionModel folder (arch decoder)
    llm: str | None = None  # a Llama-, Qwen2- or Qwen3ForCausalLM folder (e.g. Vicuna, Llama 3.1, Qwen2.5)

    @property
    def folders(self) -> list[str]:
        """The folders named, whole VLM first."""
        return [f for f in (self.vlm, self.vision, self.llm) if f is not None]

    @model_validator(mode="after")
    def _check(self) -> "PretrainedConfig":
        if self.vlm is not None and (self.vision is not None or self.llm is not None):
            raise ValueError("model.pretrained.vlm holds every part already; leave model.pretrained.vision and "
                             ".llm unset")
        return self


class AlignmentConfig(Section):
    """VIRAL (visual representation alignment, arch decoder only): the image tokens' hidden
    states after LLM block `layer`, through a small MLP projector (`alignment_head`), are pulled
    towards a frozen teacher's patch features of the same image by negative cosine similarity;
    the loss adds `weight` times that to the LM loss. See mmscale.alignment."""

    enabled: bool = False
    # Whose output is aligned, one of: `layer`, a block number counting from 1 (16: the output of
    # the 16th block, VIRAL's "layer 16 of 32"); or `layer_fraction` in (0, 1], a fraction of
    # llm.num_layers, rounded. Neither given: the middle block (layer_fraction 0.5).
    layer: int | None = None
    layer_fraction: float | None = None
    weight: float = Field(0.5, gt=0)  # lambda: total loss = LM loss + weight * alignment loss
    # "dinov2": a frozen DINOv2 (VIRAL's best teacher); "encoder": the student's own vision
    # tower features, detached (the paper's weaker baseline, for ablations).
    target: Literal["dinov2", "encoder"] = "dinov2"
    # A local Dinov2Model folder (e.g. facebook/dinov2-base saved with save_pretrained); null:
    # a seeded tiny random DINOv2 (tests and the demo; it aligns to noise-free but meaningless features).
    teacher: str | None = None
    # Teacher input side in pixels; null: the student's patch grid times the teacher's patch
    # size, so both grids match (CLIP-L/14 at 336 and DINOv2-B/14 at 336: 24 x 24).
    teacher_image_size: int | None = Field(None, gt=0)
    # The tiny random teacher's shape (teacher: null only; a folder brings its own config).
    random_teacher_patch_size: int = Field(14, gt=0)
    random_teacher_hidden_size: int = Field(64, gt=0)
    # Projector widths: llm.hidden_size -> projector_hidden -> projector_hidden -> teacher width,
    # SiLU between; null: half the LLM width (VIRAL's 2048 for a 4096-wide LLM).
    projector_hidden: int | None = Field(None, gt=0)

    def block(self, num_layers: int) -> int:
        """The aligned decoder block, counted from 1: its output is aligned."""
        if self.layer is None:
            return max(1, round(self.layer_fraction * num_layers))
        return self.layer

    @property
    def chosen(self) -> str:
        """The key that picks the block, as the recipe writes it (for messages)."""
        if self.layer is None:
            return f"model.alignment.layer_fraction={self.layer_fraction}"
        return f"model.alignment.layer={self.layer}"

    @model_validator(mode="before")
    @classmethod
    def _middle_by_default(cls, values: object) -> object:
        if isinstance(values, dict) and values.get("layer") is None and values.get("layer_fraction") is None:
            return {**values, "layer_fraction": 0.5}
        return values

    @field_validator("layer", mode="before")
    @classmethod
    def _block_number(cls, layer: object) -> object:
        # YAML reads 1 and 1.0 alike to most eyes: a float here is refused, not read as block 1.
        if isinstance(layer, float):
            raise ValueError(f"model.alignment.layer={layer} is a block number (an int, from 1); for a fraction of "
                             f"model.llm.num_layers set model.alignment.layer_fraction={layer} (and layer=null)")
        return layer

    @model_validator(mode="after")
    def _check(self) -> "AlignmentConfig":
        if self.layer is not None and self.layer_fraction is not None:
            raise ValueError(f"model.alignment.layer={self.layer} and layer_fraction={self.layer_fraction} are both "
                             "set; give one (override the other with null)")
        if self.layer_fraction is not None and not 0 < self.layer_fraction <= 1:
            raise ValueError(f"model.alignment.layer_fraction={self.layer_fraction}: a fraction must lie in (0, 1]; "
                             "or give a block number (model.alignment.layer)")
        if self.layer is not None and self.layer < 1:
            raise ValueError(f"model.alignment.layer={self.layer}: blocks count from 1 (the first block's output)")
        if self.target == "encoder" and self.teacher is not None:
            raise ValueError("model.alignment.teacher is for target dinov2; target encoder aligns to the vision tower")
        return self


# The kernel of self-attention in training (mmscale.models.attention): `auto` takes the fastest one
# that runs where the run does; a named one must run there, or the run is refused at start-up.
AttentionKernel = Literal["auto", "flash2", "flash4", "torch_varlen", "flex", "sdpa"]


# The sections that only one architecture has.
ARCH_SECTIONS = {
    "decoder": ("vision", "connector", "crops", "alignment"),
    "cross_attention": ("tiled_vision", "cross_attention"),
}


def _check_molmo2_llm_settings(llm: LLMConfig) -> None:
    if llm.norm_after or llm.qk_norm_over == "projection" or llm.additional_vocab_size or (
            llm.qkv_bias and llm.qk_norm):
        raise ValueError("model.llm.norm_after, qk_norm_over=projection, additional_vocab_size and qkv_bias with "
                         "qk_norm are Molmo2's (connector.type=molmo2): no Llama or Qwen model has them")


class _BothArchs(Section):
    """What a model of either architecture has."""

    # "decoder": image tokens spliced into the LLM's sequence (vision, connector, llm);
    # "cross_attention": Llama 3.2 Vision style (tiled_vision, cross_attention, llm).
    arch: Literal["decoder", "cross_attention"]
    llm: LLMConfig = LLMConfig()
    pretrained: PretrainedConfig = PretrainedConfig()
    attention: AttentionKernel = "auto"

    @model_validator(mode="wrap")
    @classmethod
    def _no_section_of_the_other_arch(cls, values: Any, handler: Callable[[Any], "_BothArchs"]) -> "_BothArchs":
        """A section of the other architecture is an error naming it and its arch, reported after
        this model's own checks (whose errors name what else is wrong with the model)."""
        if not isinstance(values, dict):
            return handler(values)
        owner = {key: arch for arch, keys in ARCH_SECTIONS.items() for key in keys if key not in cls.model_fields}
        stray = [key for key in values if key in owner]
        model = handler({key: value for key, value in values.items() if key not in stray})
        if stray:
            named = "; ".join(f"'model.{key}' needs model.arch={owner[key]}" for key in stray)
            them = "it" if len(stray) == 1 else "them"
            raise ValueError(f"{named}: this model is model.arch={model.arch}; remove {them} or change model.arch")
        return model


class DecoderModelConfig(_BothArchs):
    arch: Literal["decoder"] = "decoder"
    vision: VisionConfig = VisionConfig()
    connector: ConnectorConfig = ConnectorConfig()
    crops: CropsConfig = CropsConfig()
    alignment: AlignmentConfig = AlignmentConfig()

    @model_validator(mode="after")
    def _check(self) -> "DecoderModelConfig":
        if self.alignment.enabled and self.alignment.block(self.llm.num_layers) > self.llm.num_layers:
            raise ValueError(f"{self.alignment.chosen} is beyond model.llm.num_layers={self.llm.num_layers}")
        if self.connector.type == "molmo2":
            self._check_molmo2()
        else:
            _check_molmo2_llm_settings(self.llm)
        return self

    def _check_molmo2(self) -> None:
        if self.alignment.enabled:
            raise ValueError("model.alignment (VIRAL) does not support connector.type=molmo2 yet: its images take "
                             "a number of tokens that varies with their shape, which the teacher's grid does not")
        if self.attention in ("flash2", "flash4", "torch_varlen"):
            raise ValueError(
                f"model.attention={self.attention} cannot serve connector.type=molmo2: its image tokens attend to "
                "each other both ways inside the causal LLM, which only a mask can say (transformers' Molmo2 "
                "refuses flash attention too); use auto, flex or sdpa")
        inner = self.vision.grid_size - sum(self.crops.overlap_margins)
        if inner <= 0:
            raise ValueError(f"model.crops.overlap_margins {list(self.crops.overlap_margins)} leave no patch of a "
                             f"{self.vision.grid_size}-patch crop; make them smaller")
        # What transformers' Molmo2 is, so that a run can be released as one.
        required = {
            "model.vision.family=siglip": self.vision.family == "siglip",
            "model.vision.post_norm=false": not self.vision.post_norm,
            "model.vision.activation=gelu_tanh": self.vision.activation == "gelu_tanh",
            "model.connector.bias=false (the projector has none)": not self.connector.bias,
            "model.llm.qk_norm=true": self.llm.qk_norm,
            "model.llm.rope_scaling=null": self.llm.rope_scaling is None,
        }
        missing = [setting for setting, holds in required.items() if not holds]
        if missing:
            raise ValueError(f"connector.type=molmo2 is transformers' Molmo2, which needs {', '.join(missing)}")

    @property
    def is_molmo2(self) -> bool:
        return self.connector.type == "molmo2"

    @property
    def aligned(self) -> bool:
        """VIRAL's alignment loss is on."""
        return self.alignment.enabled

    @property
    def image_tokens(self) -> int:
        """Tokens each image occupies in the LLM's sequence: its patch features (with
        connector.type=molmo2 the longest multi-crop layout, markers included)."""
        if self.is_molmo2:  # varies with the image's shape: the longest
            return self.crops.max_layout_length(self.vision)
        return self.connector.tokens_per_crop(self.vision)

    @property
    def self_attention_head_dims(self) -> list[int]:
        """Head widths of the layers `attention` kernels serve: the LLM's and the tower's."""
        return [self.llm.head_size, self.vision.hidden_size // self.vision.num_heads]


class CrossAttentionModelConfig(_BothArchs):
    arch: Literal["cross_attention"] = "cross_attention"
    tiled_vision: TiledVisionConfig = TiledVisionConfig()
    cross_attention: CrossAttentionConfig = CrossAttentionConfig()

    @model_validator(mode="after")
    def _check(self) -> "CrossAttentionModelConfig":
        if self.pretrained.vision is not None:
            raise ValueError("model.pretrained.vision is for arch decoder (CLIP/SigLIP towers); a cross-attention "
                             "model's tiled encoder comes with model.pretrained.vlm")
        llm = self.llm
        if llm.qkv_bias or llm.qk_norm or llm.head_dim or llm.norm_after or llm.additional_vocab_size:
            raise ValueError("model.llm.qkv_bias, qk_norm, head_dim, norm_after and additional_vocab_size (Qwen, OLMo "
                             "and Molmo2 LLMs) are for model.arch=decoder: a cross-attention model's LLM is Llama "
                             "3.1's (transformers' Mllama)")
        _check_molmo2_llm_settings(llm)
        if llm.tie_embeddings:
            raise ValueError(
                "model.llm.tie_embeddings must be false for model.arch=cross_attention: its embedding table "
                "has 8 rows more than the output layer (as in transformers' Mllama)"
            )
        return self

    @property
    def is_molmo2(self) -> bool:
        return False

    @property
    def aligned(self) -> bool:
        return False

    @property
    def image_tokens(self) -> int:
        """Tokens each image occupies in the LLM's sequence: one `<image>` token marking where the
        image is seen from (its features reach the LLM through cross-attention)."""
        return 1

    @property
    def self_attention_head_dims(self) -> list[int]:
        """Head widths of the layers `attention` kernels serve: the LLM's (the tiled encoder attends
        with masks: always SDPA)."""
        return [self.llm.head_size]


def _arch_of(model: Any) -> str | None:
    """The class a `model` section validates as: its `arch`, by default decoder."""
    if isinstance(model, dict):
        return model.get("arch", "decoder")
    return getattr(model, "arch", None)


ModelConfig = Annotated[
    Union[Annotated[DecoderModelConfig, Tag("decoder")], Annotated[CrossAttentionModelConfig, Tag("cross_attention")]],
    Discriminator(_arch_of),
]
_MODEL = TypeAdapter(ModelConfig)


def model_config_of(tree: dict) -> DecoderModelConfig | CrossAttentionModelConfig:
    """The model section `tree` (a dumped `model` section) describes, as its arch's class."""
    return _MODEL.validate_python(tree)
