"""The unified-embedding decoder VLM (LLaVA / Molmo style).

The vision tower encodes each image into patch features, the connector maps them to the
LLM width, and they replace the embeddings of the image placeholder tokens; the decoder
then runs over the joint sequence. Loss is next-token cross-entropy on labelled tokens
(mmscale.models.loss).
"""

from __future__ import annotations

import torch
from torch import nn

from mmscale.config.model import DecoderModelConfig
from mmscale.models.connector import build_connector
from mmscale.models.generate import KVCache
from mmscale.models.llama import LlamaLM
from mmscale.models.loss import LossTokens, next_token_loss
from mmscale.models.vision import VisionTower


class DecoderVLM(nn.Module):
    def __init__(self, cfg: DecoderModelConfig, vocab_size: int, image_token_id: int):
        super().__init__()
        self.cfg = cfg
        self.image_token_id = image_token_id
        self.vision_tower = VisionTower(cfg.vision)
        self.connector = build_connector(cfg)
        self.language_model = LlamaLM(cfg.llm, vocab_size)

    @property
    def image_token_count(self) -> int:
        """Placeholder tokens each image occupies in the sequence: one per connector output token
        (a patch, or a pooled patch neighbourhood; never CLIP's class token)."""
        return self.cfg.image_tokens

    def embed(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, image_pooling: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings with image features written over the image placeholder positions
        (`image_pooling`: Molmo2's, `Molmo2VLM.embed`; None here)."""
        embeds = self.language_model.embed_tokens(input_ids)
        is_image = input_ids == self.image_token_id
        n_slots = int(is_image.sum())
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if n_slots != n_images * self.image_token_count:
            raise ValueError(
                f"{n_slots} image placeholder tokens for {n_images} images of "
                f"{self.image_token_count} tokens each; the data and model.vision / model.connector disagree"
            )
        if not n_images:
            # Run the tower on a blank image anyway and add its output times zero: every rank
            # must use the same parameters in every step, or ZeRO's gathers and gradient
            # reductions wait for a rank that skipped them (LLaVA does the same).
            size = self.cfg.vision.image_size
            blank = embeds.new_zeros(1, 3, size, size)
            return embeds + 0.0 * self.connector(self.vision_tower(blank)).sum()
        features = self.connector(self.vision_tower(pixel_values.to(embeds.dtype)))
        # Row-major order: images fill placeholders in sample order, then position order.
        return embeds.masked_scatter(is_image.unsqueeze(-1), features.to(embeds.dtype))

    def both_ways(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """(batch, seq) bool: tokens that see each other both ways in the causal LLM (`PackedLayout`);
        None: none do (Molmo2VLM's image tokens do)."""
        return None

    def logits(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        image_pooling: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits (batch, seq, vocab).

        Rows are single right-padded samples, or, with `position_ids` restarting at 0 for
        each sample and `segment_ids` numbering them, several samples packed into one row.
        With a `cache` (see `generate.greedy`) the tokens continue those already in it.
        `image_pooling`: Molmo2's multi-crop pooling table (`Molmo2VLM.embed`).
        """
        hidden = self.hidden_states(input_ids, pixel_values, position_ids, segment_ids, cache, image_pooling)
        return self.language_model.output(hidden)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        image_pooling: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The LLM's last hidden states (batch, seq, hidden), before its final norm; inputs as for `logits`."""
        both_ways = None
        if cache is not None and cache.keys:  # an answer's tokens: text, the image came with the prompt
            embeds = self.language_model.embed_tokens(input_ids)
        else:
            embeds = self.embed(input_ids, pixel_values, image_pooling)
            both_ways = self.both_ways(input_ids)
            if both_ways is not None and cache is not None:  # the prompt's forward: its mask is the cache's
                cache.mask = cache.mask | (both_ways[:, None, :, None] & both_ways[:, None, None, :])
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return self.language_model.hidden_states(embeds, position_ids, segment_ids, cache, both_ways)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        loss_tokens: LossTokens | None = None,
        image_pooling: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-entropy summed over the labelled tokens of a batch, divided by the optimizer
        step's labelled tokens (`loss_tokens`; by default this batch's: its mean); inputs as for `logits`."""
        hidden = self.hidden_states(input_ids, pixel_values, position_ids, segment_ids, None, image_pooling)
        return next_token_loss(hidden, labels, self.language_model.output, loss_tokens)
