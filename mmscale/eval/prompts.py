"""A sample's prompt, exactly as training renders its user turn, as model inputs.

The loader's own `SampleEncoder` renders the whole conversation with the chat template and
expands the image placeholder; its labels start at the first token of the answer, which
follows the template's generation prompt (`encode_conversation` finds the assistant turn
where the rendering of the turns before it with `add_generation_prompt` ends). Cutting
there leaves the prompt the model was trained to answer, tokenised as in training; the
loader's `Collator` then right-pads the prompts of a batch as it pads training batches (for
a cross-attention model: tiles, aspect ratios and the cross-attention mask, in transformers'
Mllama layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from mmscale.config.model import ModelConfig
from mmscale.data.collate import Collator, collator_for
from mmscale.data.encode import SampleEncoder, image_transform
from mmscale.data.tokenizer import IGNORE_INDEX
from mmscale.errors import UserError

NO_LIMIT = 1 << 30  # a prompt is never cut: training's max_seq_len bounds training samples only


@dataclass(frozen=True)
class PromptEncoder:
    encode: SampleEncoder
    collate: Collator

    def __call__(self, raws: list[dict]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """`logits` / `greedy` keyword arguments for the prompts of `raws`, right-padded, and
        each prompt's length in tokens. For Molmo2 also transformers' per-image inputs, which
        `ours_only` leaves out."""
        batch = self.collate([self._prompt(raw) for raw in raws])
        lengths = batch["meta"]["lengths"]
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "meta")}
        return {**inputs, **batch["meta"].get("images", {})}, lengths

    def _prompt(self, raw: dict) -> dict:
        encoded = self.encode(raw)
        answer = (encoded["labels"] != IGNORE_INDEX).nonzero()
        if not len(answer):
            raise UserError(f"sample {encoded['samples'][0][0]}: the chat template leaves no assistant turn to cut at")
        cut = int(answer[0])
        encoded["input_ids"] = encoded["input_ids"][:cut]
        encoded["labels"] = encoded["labels"][:cut]
        if "image_spans" in encoded:  # each image stays visible to the end of the prompt
            encoded["image_spans"] = encoded["image_spans"].clamp(max=cut)
        return {**encoded, "reader": None}


def build_prompt_encoder(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PromptEncoder:
    """The loader's encoder for `cfg`'s images (as `build_dataloader` makes it) and collator."""
    images, spans_of = image_transform(cfg, tokenizer)
    encode = SampleEncoder(tokenizer, images, cfg.image_tokens, NO_LIMIT, truncate=False, spans_of=spans_of)
    return PromptEncoder(encode, collator_for(cfg, tokenizer.pad_token_id))
