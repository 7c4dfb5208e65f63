"""Molmo2 (transformers' Molmo2ForConditionalGeneration, images): a decoder VLM whose images
come as several crops and whose image tokens see each other both ways.

What differs from the LLaVA-style `DecoderVLM` it extends:
- an image is a low-resolution overview plus overlapping high-resolution crops, all encoded
  by the tower at its own size (mmscale.data.multicrop cuts them);
- the connector pools windows listed by index (`image_pooling`), since the crops' kept
  patches form one grid of any shape, and image features are *added* to the embeddings of
  the `<im_patch>` tokens, whose markers (`<im_start>`, `<im_col>`, ...) frame the grid;
- inside the causal LLM, every image token of a sample attends to every other one of that
  sample, before or after it (transformers builds the same mask from `mm_token_type_ids`).
"""

from __future__ import annotations

import torch

from mmscale.config.model import POOL_WINDOW, DecoderModelConfig
from mmscale.data.multicrop import ImageTokenIds
from mmscale.models.decoder_vlm import DecoderVLM


class Molmo2VLM(DecoderVLM):
    def __init__(self, cfg: DecoderModelConfig, vocab_size: int, tokens: ImageTokenIds):
        super().__init__(cfg, vocab_size, tokens.patch)
        self.tokens = tokens

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_pooling: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings, the pooled image features added at the `<im_patch>` positions.

        pixel_values: (crops, 3, size, size), every image's crops in order; image_pooling:
        (image tokens, window patches) indices into the crops' flattened patches (-1: none), one
        row per `<im_patch>` token in row-major order of `input_ids`.
        """
        embeds = self.language_model.embed_tokens(input_ids)
        is_patch = input_ids == self.tokens.patch
        n_slots = int(is_patch.sum())
        if pixel_values is None or image_pooling is None or not len(pixel_values):  # the collator's empty batch
            if n_slots:
                raise ValueError(f"{n_slots} <im_patch> tokens but no images (pixel_values and image_pooling)")
            # The tower and connector run on a blank crop anyway, times zero, so every rank uses the
            # same parameters in every step (DecoderVLM.embed says why).
            size = self.cfg.vision.image_size
            blank = embeds.new_zeros(1, 3, size, size)
            window = torch.arange(POOL_WINDOW**2, device=input_ids.device)[None]
            return embeds + 0.0 * self.connector(self.vision_tower(blank), window).sum()
        if n_slots != image_pooling.shape[0]:
            raise ValueError(f"{n_slots} <im_patch> tokens for {image_pooling.shape[0]} pooled image tokens; the data "
                             "and model.vision / model.crops disagree")
        features = self.connector(self.vision_tower(pixel_values.to(embeds.dtype)), image_pooling)
        return embeds.masked_scatter(is_patch.unsqueeze(-1), embeds[is_patch] + features.to(embeds.dtype))

    def both_ways(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, seq) bool: the tokens of Molmo2's image layout, which see each other both ways."""
        return torch.isin(input_ids, torch.tensor(self.tokens.markers, device=input_ids.device))
