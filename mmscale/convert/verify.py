"""Numerical proof that a transformers export computes what the mmscale model computes.

Both models see the same fixed random images and text; we compare the image features the
connector hands to the LLM, every logit (max abs difference), the next-token distributions
(mean KL divergence, which torchtitan found catches conversion bugs a greedy decode misses)
and a greedy decode token for token. The features are compared on their own because the
logits can hide a broken vision path: a cross-attention model's tanh gates start at 0, and
early in training they pass a wrong vision weight on to the logits below any tolerance.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from mmscale.config.schema import ModelConfig
from mmscale.models.generate import greedy, producible

PROBE_SEED = 1234
TEXT_TOKENS = 12  # random text tokens after each image


@dataclass(frozen=True)
class Verification:
    feature_diff: float  # max abs difference of the connector's output
    max_abs_diff: float
    mean_kl: float
    tokens_ours: list[int]
    tokens_theirs: list[int]
    positions: int

    def problems(self, max_abs_diff: float, max_kl: float) -> list[str]:
        found = []
        if not self.feature_diff <= max_abs_diff:  # `not <=`: NaN fails too
            found.append(f"max abs image feature difference {self.feature_diff:.3g} > {max_abs_diff:g}")
        if not self.max_abs_diff <= max_abs_diff:
            found.append(f"max abs logit difference {self.max_abs_diff:.3g} > {max_abs_diff:g}")
        if not self.mean_kl <= max_kl:
            found.append(f"mean KL divergence {self.mean_kl:.3g} > {max_kl:g}")
        if self.tokens_ours != self.tokens_theirs:
            found.append(f"greedy decodes differ: mmscale {self.tokens_ours}, transformers {self.tokens_theirs}")
        return found

    def as_dict(self) -> dict:
        return {
            "max_abs_image_feature_diff": self.feature_diff,
            "max_abs_logit_diff": self.max_abs_diff,
            "mean_kl": self.mean_kl,
            "positions": self.positions,
            "greedy_tokens": self.tokens_ours,
            "greedy_identical": self.tokens_ours == self.tokens_theirs,
        }


def _text(gen: torch.Generator, vocab_size: int, avoid: set[int]) -> list[int]:
    ids = torch.randint(0, vocab_size, (TEXT_TOKENS * 2,), generator=gen).tolist()
    return [i for i in ids if i not in avoid][:TEXT_TOKENS]


def probe_inputs(cfg: ModelConfig, vocab_size: int, image_token_id: int, avoid: set[int]) -> dict[str, torch.Tensor]:
    """One sample with two images, in the keyword arguments both `logits` and transformers take.

    Text ids are random but never special (`avoid`): an image or end-of-turn token in the
    text would change what the sample means, not test the conversion.
    """
    gen = torch.Generator().manual_seed(PROBE_SEED)
    avoid = avoid | {image_token_id}
    if cfg.arch == "decoder":
        image = [image_token_id] * cfg.connector.image_tokens(cfg.vision)
        ids = _text(gen, vocab_size, avoid)
        for _ in range(2):
            ids += image + _text(gen, vocab_size, avoid)
        size = cfg.vision.image_size
        return {"input_ids": torch.tensor([ids]), "pixel_values": torch.randn(2, 3, size, size, generator=gen)}
    return _tiled_probe(cfg, vocab_size, image_token_id, avoid, gen)


def _tiled_probe(
    cfg: ModelConfig, vocab_size: int, image_token_id: int, avoid: set[int], gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """Mllama's inputs: the first image on the largest grid, the second on one tile. As
    Mllama's processor marks them, the text before the first image sees none, and the image
    token and text after image j see image j."""
    vision = cfg.tiled_vision
    ratios = list(vision.supported_aspect_ratios)
    grids = [max(ratios, key=lambda r: r[0] * r[1]), min(ratios, key=lambda r: r[0] * r[1])]
    tile_mask = torch.zeros(1, 2, vision.max_num_tiles, dtype=torch.long)
    for j, (rows, cols) in enumerate(grids):
        tile_mask[0, j, : rows * cols] = 1
    ids = _text(gen, vocab_size, avoid)
    cross = [torch.zeros(len(ids), 2, vision.max_num_tiles, dtype=torch.long)]
    for j in range(2):
        stretch = [image_token_id] + _text(gen, vocab_size, avoid)
        ids += stretch
        sees = torch.zeros(len(stretch), 2, vision.max_num_tiles, dtype=torch.long)
        sees[:, j] = tile_mask[0, j]
        cross.append(sees)
    size = vision.image_size
    pixels = torch.randn(1, 2, vision.max_num_tiles, 3, size, size, generator=gen) * tile_mask[..., None, None, None]
    return {
        "input_ids": torch.tensor([ids]),
        "pixel_values": pixels,
        "aspect_ratio_ids": torch.tensor([[ratios.index(g) + 1 for g in grids]]),
        "aspect_ratio_mask": tile_mask,
        "cross_attention_mask": torch.cat(cross)[None],
    }


@contextmanager
def _output_of(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach().double()))
    try:
        yield outputs
    finally:
        handle.remove()


@dataclass(frozen=True)
class Outputs:
    """What one model computes on the probe inputs: the image features the connector hands to
    the LLM, every logit (fp64), and its greedy continuation."""

    features: torch.Tensor
    logits: torch.Tensor
    tokens: list[int]


@torch.no_grad()
def run_ours(model: nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int, image_token_id: int) -> Outputs:
    """The mmscale model on `inputs`; its greedy decode by `new_tokens` tokens (never stopping
    early: every token compared is one more check, and never the image token, which would stand
    for an image nobody gave)."""
    with _output_of(model.connector) as features:
        logits = model.logits(**inputs).double()
    banned = producible({image_token_id}, logits.shape[-1])
    return Outputs(features[0], logits, greedy(model, inputs, new_tokens, banned=set(banned))[0])


@torch.no_grad()
def run_theirs(model: PreTrainedModel, inputs: dict[str, torch.Tensor], new_tokens: int,
               image_token_id: int) -> Outputs:
    """The transformers model on `inputs`, as `run_ours`; its image features are the output of
    `multi_modal_projector` (the tensor our connector outputs, in LLaVA's and Mllama's layout)."""
    with _output_of(model.model.multi_modal_projector) as features:
        logits = model(**inputs).logits.double()
    model.generation_config.eos_token_id = None
    banned = producible({image_token_id}, logits.shape[-1])
    generated = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, suppress_tokens=banned)
    return Outputs(features[0], logits, generated[0, inputs["input_ids"].shape[1] :].tolist())


def compare(mine: Outputs, other: Outputs) -> Verification:
    """The two models' outputs on the same probe, side by side. Each model runs on its own (first
    ours, then theirs), so that a large export need not hold both in memory at once."""
    log_p, log_q = mine.logits.log_softmax(-1), other.logits.log_softmax(-1)
    return Verification(
        feature_diff=(mine.features.flatten() - other.features.flatten()).abs().max().item(),
        max_abs_diff=(mine.logits - other.logits).abs().max().item(),
        mean_kl=(log_p.exp() * (log_p - log_q)).sum(-1).mean().item(),
        tokens_ours=mine.tokens,
        tokens_theirs=other.tokens,
        positions=mine.logits.shape[1],
    )
