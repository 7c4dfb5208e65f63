"""Everything in a release folder besides the weights: processor (tokenizer, chat template,
image preprocessing), generation config and model card; and the folder written whole or not at all.

The image processor is transformers' own for the architecture, configured to prepare
images the way mmscale's loader does (data/images.py, data/tiling.py), so
`AutoProcessor.from_pretrained(folder)` feeds the model what it was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LlavaImageProcessorPil,
    LlavaProcessor,
    MllamaImageProcessorPil,
    MllamaProcessor,
    PreTrainedTokenizerBase,
)

from mmscale.config.model import POOL_WINDOW, DecoderModelConfig, ModelConfig
from mmscale.data.tokenizer import image_token_of
from mmscale.errors import UserError
from mmscale.utils.files import folder_written_whole


def llava_image_processor(cfg: DecoderModelConfig) -> LlavaImageProcessorPil:
    vision, side = cfg.vision, cfg.vision.image_size
    square = {"height": side, "width": side}
    by_mode = {
        # LLaVA-1.5's expand2square: pad with the mean colour, then resize (the crop is a no-op).
        "pad": {"do_pad": True, "size": {"shortest_edge": side}, "crop_size": square},
        "crop": {"do_pad": False, "size": {"shortest_edge": side}, "crop_size": square},
        "squash": {"do_pad": False, "size": square, "do_center_crop": False},
    }
    return LlavaImageProcessorPil(
        image_mean=list(vision.image_mean), image_std=list(vision.image_std), resample=3, **by_mode[vision.resize]
    )


def write_processor(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Tokenizer (with its chat template), image processor and processor config into `folder`."""
    # The processors find the image token as `tokenizer.image_token`, a named special token
    # that transformers sets only while loading a tokenizer: save, then load it back named.
    tokenizer.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, extra_special_tokens={"image_token": image_token_of(tokenizer)})
    if cfg.is_molmo2:
        _write_molmo2_processor(cfg, tokenizer, folder)
        return
    _processor(cfg, tokenizer).save_pretrained(folder)


def _write_molmo2_processor(cfg: DecoderModelConfig, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Molmo2Processor's files, written as its `save_pretrained` writes them: its image and video
    processors need torchvision, which does not import beside CPU torch, so the objects cannot be
    built here. Its image processor cuts crops as mmscale.data.multicrop does (a GPU test checks)."""
    tokenizer.save_pretrained(folder)  # now with its image token named
    vision, crops = cfg.vision, cfg.crops
    config = {
        "image_processor": {
            "image_processor_type": "Molmo2ImageProcessor",
            "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "do_normalize": True,
            "rescale_factor": 1 / 255, "resample": 2,  # bilinear
            "size": {"height": vision.image_size, "width": vision.image_size},
            "patch_size": vision.patch_size, "pooling_size": [POOL_WINDOW, POOL_WINDOW],
            "max_crops": crops.max_crops, "overlap_margins": list(crops.overlap_margins),
            "image_mean": list(vision.image_mean), "image_std": list(vision.image_std),
        },
        # Video is not trained here; the processor needs one all the same, with its defaults.
        "video_processor": {"video_processor_type": "Molmo2VideoProcessor"},
        "image_use_col_tokens": crops.column_tokens,
        "use_single_crop_col_tokens": crops.overview_column_tokens,
        "use_single_crop_start_token": True,
        "processor_class": "Molmo2Processor",
    }
    (folder / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "chat_template.jinja").write_text(tokenizer.chat_template)


def _processor(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlavaProcessor | MllamaProcessor:
    if cfg.arch == "decoder":
        return LlavaProcessor(
            image_processor=llava_image_processor(cfg),
            tokenizer=tokenizer,
            patch_size=cfg.vision.patch_size,
            vision_feature_select_strategy="default" if cfg.vision.family == "clip" else "full",
            # The processor counts CLIP's class token and then drops it again ("default").
            num_additional_image_tokens=1 if cfg.vision.family == "clip" else 0,
            image_token=image_token_of(tokenizer),
            chat_template=tokenizer.chat_template,
        )
    vision = cfg.tiled_vision
    images = MllamaImageProcessorPil(
        size={"height": vision.image_size, "width": vision.image_size},
        max_image_tiles=vision.max_num_tiles,
        image_mean=list(vision.image_mean),
        image_std=list(vision.image_std),
    )
    return MllamaProcessor(images, tokenizer, chat_template=tokenizer.chat_template)


def write_generation_config(folder: Path, token_ids: dict[str, int | None]) -> None:
    # Greedy by default: a released VLM's answers should be reproducible unless asked otherwise.
    GenerationConfig(do_sample=False, **token_ids).save_pretrained(folder)


def write_model_card(folder: Path, facts: dict[str, str], verification: dict, excluded: tuple[str, ...]) -> None:
    """README.md: where the weights come from and how the export was checked."""
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags: [mmscale]",
        "---",
        f"# {facts['name']}",
        "",
        f"Converted by `mmscale convert` from {facts['source']}.",
        "",
    ]
    lines += [f"- **{key}**: {value}" for key, value in facts.items() if key not in ("name", "source", "recipe")]
    lines += [
        "",
        "## Verification",
        "",
        "The folder was loaded back with transformers and run beside the mmscale model on fixed random "
        "images and text:",
        "",
        "```json",
        json.dumps(verification, indent=1),
        "```",
        "",
    ]
    if excluded:
        lines += ["Weights used only in training, left out: " + ", ".join(f"`{k}`" for k in excluded) + ".", ""]
    if "recipe" in facts:
        lines += ["## Recipe", "", "```yaml", facts["recipe"].rstrip(), "```", ""]
    (folder / "README.md").write_text("\n".join(lines))


def check_absent(out: Path) -> None:
    if out.exists():
        raise UserError(f"{out} exists; choose a new folder or remove it")


@contextmanager
def written_whole(out: Path) -> Iterator[Path]:
    """A folder to write the new folder `out` into: `out` appears complete or not at all."""
    out = out.resolve()
    check_absent(out)
    with folder_written_whole(out) as tmp:
        yield tmp
