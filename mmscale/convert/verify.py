"""Numerical proof that a transformers export computes what the mmscale model computes.

Both models see the same fixed random images and text; we compare the image features the
connector hands to the LLM, every logit (max abs difference), the next-token distributions
(mean KL divergence, which torchtitan found catches conversion bugs a greedy decode misses)
and a greedy decode token for token. The features are compared on their own because the
logits can hide a broken vision path: a cross-attention model's tanh gates start at 0, and
early in training they pass a wrong vision weight on to the logits below any tolerance.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from mmscale.config.model import ModelConfig
from mmscale.data.multicrop import ImageTokenIds, MultiCrop, batch_pooling, image_ids, ours_only
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


def probe_inputs(
    cfg: ModelConfig, vocab_size: int, image_token_id: int | ImageTokenIds, avoid: set[int]
) -> dict[str, torch.Tensor]:
    """One sample with two images, in the keyword arguments both `logits` and transformers take
    (for Molmo2, ours: `mmscale.models.hf.molmo2.inputs_to_hf` gives transformers' own).

    Text ids are random but never special (`avoid`): an image or end-of-turn token in the
    text would change what the sample means, not test the conversion.
    """
    gen = torch.Generator().manual_seed(PROBE_SEED)
    avoid = avoid | image_ids(image_token_id)
    if isinstance(image_token_id, ImageTokenIds):
        return _multicrop_probe(cfg, vocab_size, image_token_id, avoid, gen)
    if cfg.arch == "decoder":
        image = [image_token_id] * cfg.image_tokens
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


def _multicrop_probe(
    cfg: ModelConfig, vocab_size: int, tokens: ImageTokenIds, avoid: set[int], gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """Molmo2's inputs: a wide image (several crops, partial windows at the edges) and a small one,
    cut by mmscale's multi-crop code, their layouts between random text."""
    cut, size = MultiCrop(cfg.crops, cfg.vision), cfg.vision.image_size
    images = [cut.cut(torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8))
              for shape in ((3, size, 5 * size // 2), (3, size // 2, size // 2))]
    ids = _text(gen, vocab_size, avoid)
    for image in images:
        ids += cut.layout(image.grid, tokens) + _text(gen, vocab_size, avoid)
    crops = torch.tensor([len(image.pixel_values) for image in images])
    windows = torch.tensor([len(image.image_pooling) for image in images])
    local = torch.cat([image.image_pooling for image in images])
    return {
        "input_ids": torch.tensor([ids]),
        "pixel_values": torch.cat([image.pixel_values for image in images]),
        "image_pooling": batch_pooling(local, crops, windows, cfg.vision.num_patches),
        "image_grids": torch.tensor([image.grid for image in images]),
        "image_num_crops": crops,
        "image_token_pooling": local,
    }


HALF = (torch.bfloat16, torch.float16)


@contextmanager
def computed_in_fp32(model: nn.Module, share: float = 0.125) -> Iterator[nn.Module]:
    """`model`, whose 16-bit weights stay 16-bit, computing in fp32: each part of at most `share`
    of its parameters holds fp32 copies of its weights only while it runs. A 16-bit export is
    verified this way, rather than with an fp32 copy of each model, which held the copy and the
    16-bit weights (or their mapped file) at once: 1.5x the model's fp32 size.

    A larger part is split into its children (a list of layers always), and the weights it owns
    directly or through children without children of their own (embeddings, output layers, norms)
    are fp32 for the whole context: a part's forward may read their dtype to cast its inputs (transformers'
    towers cast pixels to their patch embedding's), which must not meet 16-bit weights."""
    limit = share * sum(p.numel() for p in model.parameters())
    saved: dict[nn.Module, list[tuple[nn.Parameter, torch.Tensor]]] = {}

    def upcast(params: Iterator[nn.Parameter]) -> list[tuple[nn.Parameter, torch.Tensor]]:
        kept = [(p, p.data) for p in params if p.dtype in HALF]
        for param, data in kept:
            param.data = data.float()
        return kept

    def restore(kept: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
        for param, data in kept:
            param.data = data

    def parts(module: nn.Module) -> Iterator[nn.Module]:
        # Never called: a list's members are, one by one; a module that marks itself so is run
        # through methods other than forward (our LLMs: hidden_states, output), which no hook sees.
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)) or getattr(module, "entered_by_methods", False):
            for child in module.children():
                yield from parts(child)
            return
        if sum(p.numel() for p in module.parameters()) <= limit:
            yield module
            return
        branches = [child for child in module.children() if any(True for _ in child.children())]
        leaves = [child for child in module.children() if child not in branches]
        saved[module] = upcast(itertools.chain(module.parameters(recurse=False), *(c.parameters() for c in leaves)))
        for child in branches:
            yield from parts(child)

    handles = []
    for part in parts(model):
        handles.append(part.register_forward_pre_hook(lambda m, _args: saved.__setitem__(m, upcast(m.parameters()))))
        handles.append(part.register_forward_hook(lambda m, _args, _out: restore(saved.pop(m))))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for kept in saved.values():
            restore(kept)


@contextmanager
def _output_of(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    outputs: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: object, out: object) -> None:
        # Molmo2's adapter returns a model output; the others a tensor.
        outputs.append(getattr(out, "last_hidden_state", out).detach().double())

    handle = module.register_forward_hook(keep)
    try:
        yield outputs
    finally:
        handle.remove()


@dataclass(frozen=True)
class Outputs:
    """What one model computes on the probe inputs: the image features the connector hands to
    the LLM (fp64), every logit (as computed: fp32), and its greedy continuation."""

    features: torch.Tensor
    logits: torch.Tensor
    tokens: list[int]


@torch.no_grad()
def run_ours(
    model: nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int, image_token_id: int | ImageTokenIds
) -> Outputs:
    """The mmscale model on `inputs`; its greedy decode by `new_tokens` tokens (never stopping
    early: every token compared is one more check, and never an image token, which would stand
    for an image nobody gave)."""
    inputs = ours_only(inputs)
    banned = producible(image_ids(image_token_id), model.language_model.lm_head.weight.shape[0])
    tokens = greedy(model, inputs, new_tokens, banned=set(banned))[0]  # first: its logits are gone before ours come
    with _output_of(model.connector) as features:
        logits = model.logits(**inputs)
    return Outputs(features[0], logits, tokens)


@torch.no_grad()
def run_theirs(model: PreTrainedModel, inputs: dict[str, torch.Tensor], new_tokens: int,
               image_token_id: int | ImageTokenIds) -> Outputs:
    """The transformers model on `inputs` (transformers' own), as `run_ours`; its image features
    are the output of `multi_modal_projector` (the tensor our connector outputs)."""
    model.generation_config.eos_token_id = None
    banned = producible(image_ids(image_token_id), model.get_output_embeddings().weight.shape[0])
    generated = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, suppress_tokens=banned)
    with _output_of(model.model.multi_modal_projector) as features:
        logits = model(**inputs).logits
    return Outputs(features[0], logits, generated[0, inputs["input_ids"].shape[1] :].tolist())


def compare(mine: Outputs, other: Outputs) -> Verification:
    """The two models' outputs on the same probe, side by side. Each model runs on its own (first
    ours, then theirs), so that a large export need not hold both in memory at once."""
    # A few positions at a time: the fp64 temporaries of all of them at once (five tensors of
    # positions x vocabulary) would outweigh a small model.
    kl, most = [], []
    for p, q in zip(mine.logits.flatten(0, -2).split(64), other.logits.flatten(0, -2).split(64)):
        p, q = p.double(), q.double()
        log_p, log_q = p.log_softmax(-1), q.log_softmax(-1)
        kl.append((log_p.exp() * (log_p - log_q)).sum(-1))
        most.append((p - q).abs().max())  # a tensor: torch's max keeps a NaN, Python's would drop it
    return Verification(
        feature_diff=(mine.features.flatten() - other.features.flatten()).abs().max().item(),
        max_abs_diff=torch.stack(most).max().item(),
        mean_kl=torch.cat(kl).mean().item(),
        tokens_ours=mine.tokens,
        tokens_theirs=other.tokens,
        positions=mine.logits.shape[1],
    )
