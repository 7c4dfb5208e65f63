"""The model under test: an mmscale run's checkpoint (mmscale's own forward and `greedy`) or
an exported transformers folder (transformers' model and `generate`), each with the model
config and tokenizer that `prompts.py` needs to prepare inputs exactly as training did.
Both answer a batch of right-padded prompts; transformers' decoder-only `generate` wants
them left-padded with an attention mask, so they are moved to the right for it.

For a transformers folder the model config comes from its config.json through the same
adapters (mmscale.models.hf) `mmscale convert --from hf` uses, and the image preprocessing (resize mode,
normalisation) from the image processor `mmscale convert --to hf` wrote beside it, so
both paths feed the model the same input_ids and pixel_values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mmscale.config.model import ModelConfig
from mmscale.data.multicrop import ImageTokenIds, image_ids, ours_only
from mmscale.data.tokenizer import load_tokenizer
from mmscale.errors import UserError
from mmscale.eval.answers import stop_ids
from mmscale.models.generate import greedy, producible
from mmscale.models.hf import LLAVA, MOLMO2, adapter_for_hf, llava, molmo2
from mmscale.models.hf.folder import read_config

@dataclass(frozen=True)
class ModelUnderTest:
    description: str
    cfg: ModelConfig
    tokenizer: PreTrainedTokenizerBase
    # prepared inputs and prompt lengths -> each row's greedy new token ids; a row may go on
    # past its first stop id (transformers pads it), where answers.answer_text cuts it
    generate: Callable[[dict[str, torch.Tensor], torch.Tensor], list[list[int]]]
    stop: frozenset[int]


def load_model_under_test(path: Path, step: int | None, max_new_tokens: int,
                          tokenizer: str | None = None) -> ModelUnderTest:
    """A transformers folder (it has a config.json) or an mmscale run / checkpoint directory
    (with its tokenizer from `tokenizer` when not where its recipe says)."""
    if (path / "config.json").is_file():
        for flag, value in (("--step", step), ("--tokenizer", tokenizer)):
            if value is not None:
                raise UserError(f"{flag} applies to an mmscale run, and {path} is a transformers folder")
        return _transformers_folder(path, max_new_tokens)
    return _mmscale_run(path, step, max_new_tokens, tokenizer)


def _mmscale_run(path: Path, step: int | None, max_new_tokens: int, tokenizer: str | None) -> ModelUnderTest:
    from mmscale.convert.export import from_run  # deferred: it imports DeepSpeed (seconds), which folders do not need

    source = from_run(path, step, tokenizer)
    stop = stop_ids(source.tokenizer)

    def generate(inputs: dict[str, torch.Tensor], lengths: torch.Tensor) -> list[list[int]]:
        # The image token stands for an image nobody gave.
        return greedy(source.model, ours_only(inputs), max_new_tokens, image_ids(source.image_token_id), stop, lengths)

    return ModelUnderTest(f"mmscale {source.facts['source']}, step {source.facts['steps']}", source.cfg,
                          source.tokenizer, generate, stop)


def _transformers_folder(folder: Path, max_new_tokens: int) -> ModelUnderTest:
    config = read_config(folder)
    adapter = adapter_for_hf(config, folder)
    if adapter is MOLMO2:
        return _molmo2_folder(folder, max_new_tokens)
    cfg = _with_image_processing(adapter.config_from_hf(config, folder), folder)
    image_token_id = llava.image_token_id_from_hf(config) if adapter is LLAVA else config["image_token_index"]
    if not (folder / "tokenizer_config.json").is_file():
        raise UserError(f"{folder} has no tokenizer; eval needs the folder's tokenizer and chat template")
    image_token = AutoTokenizer.from_pretrained(folder, local_files_only=True).convert_ids_to_tokens(image_token_id)
    tokenizer = load_tokenizer(folder, None, image_token)
    model = adapter.model_class.from_pretrained(folder, dtype=torch.float32).eval()
    stop = stop_ids(tokenizer)
    banned = producible({image_token_id}, model.get_output_embeddings().weight.shape[0])

    @torch.no_grad()
    def generate(inputs: dict[str, torch.Tensor], lengths: torch.Tensor) -> list[list[int]]:
        out = model.generate(
            **left_padded(inputs, lengths), max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            suppress_tokens=banned or None, eos_token_id=sorted(stop), pad_token_id=tokenizer.pad_token_id,
        )
        return out[:, inputs["input_ids"].shape[1]:].tolist()

    return ModelUnderTest(f"transformers {type(model).__name__} from {folder}", cfg, tokenizer, generate, stop)


def _molmo2_folder(folder: Path, max_new_tokens: int) -> ModelUnderTest:
    """A Molmo2 folder: its model through transformers, its images cut by mmscale's multi-crop code
    as its processor's config says (transformers' own processor needs torchvision)."""
    image_processor, processor = molmo2.processor_configs(folder)
    if image_processor is None:
        raise UserError(f"{folder} has no image processor config (processor_config.json); write it with the "
                        "model's processor")
    cfg = molmo2.config_from_hf(molmo2.complete(read_config(folder)), image_processor, processor)
    if not (folder / "tokenizer_config.json").is_file():
        raise UserError(f"{folder} has no tokenizer; eval needs the folder's tokenizer and chat template")
    image_token = getattr(AutoTokenizer.from_pretrained(folder, local_files_only=True), "image_token", None)
    tokenizer = load_tokenizer(folder, None, image_token or "<|image|>")
    tokens = ImageTokenIds.of_tokenizer(tokenizer)
    model = MOLMO2.model_class.from_pretrained(folder, dtype=torch.float32).eval()
    stop = stop_ids(tokenizer)
    banned = producible(image_ids(tokens), model.get_output_embeddings().weight.shape[0])

    @torch.no_grad()
    def generate(inputs: dict[str, torch.Tensor], lengths: torch.Tensor) -> list[list[int]]:
        out = model.generate(
            **molmo2.inputs_to_hf(left_padded(inputs, lengths), cfg, tokens), max_new_tokens=max_new_tokens,
            do_sample=False, num_beams=1, suppress_tokens=banned or None, eos_token_id=sorted(stop),
            pad_token_id=tokenizer.pad_token_id,
        )
        return out[:, inputs["input_ids"].shape[1]:].tolist()

    return ModelUnderTest(f"transformers {type(model).__name__} from {folder}", cfg, tokenizer, generate, stop)


def left_padded(inputs: dict[str, torch.Tensor], lengths: torch.Tensor) -> dict[str, torch.Tensor]:
    """Right-padded prompts moved to the right end of their rows, with the attention mask."""
    columns = inputs["input_ids"].shape[1]
    shift = columns - lengths
    # Row i's column j takes its column j - shift[i] (mod columns): the padding wraps to the front.
    source = (torch.arange(columns)[None] - shift[:, None]) % columns
    moved = dict(inputs)
    for key in ("input_ids", "cross_attention_mask"):
        if key in inputs:
            index = source.view(*source.shape, *[1] * (inputs[key].dim() - 2)).expand_as(inputs[key])
            moved[key] = inputs[key].gather(1, index)
    moved["attention_mask"] = (torch.arange(columns)[None] >= shift[:, None]).long()
    return moved


def _with_image_processing(cfg: ModelConfig, folder: Path) -> ModelConfig:
    """`cfg` with the folder's image preprocessing: the inverse of release_files' processors."""
    found = molmo2.processor_configs(folder)[0]
    if found is None:
        raise UserError(f"{folder} has no image processor config (preprocessor_config.json); write it with the "
                        "model's processor")
    stats = {k: tuple(found[k]) for k in ("image_mean", "image_std") if k in found}
    if cfg.arch == "decoder":
        resize = "pad" if found.get("do_pad") else "crop" if found.get("do_center_crop", True) else "squash"
        return cfg.model_copy(update={"vision": cfg.vision.model_copy(update={"resize": resize, **stats})})
    return cfg.model_copy(update={"tiled_vision": cfg.tiled_vision.model_copy(update=stats)})
