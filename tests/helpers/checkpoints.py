"""Engines to checkpoint (a tiny one, the demo recipe's), a weights fingerprint, and a script in which
two ranks save one checkpoint."""

from __future__ import annotations

import textwrap

import torch

from mmscale.config import load_recipe
from mmscale.models.decoder_vlm import DecoderVLM
from mmscale.training import build_engine
from tests.helpers.recipes import RECIPE, REPO, TINY_OVERRIDES


def tiny_engine(seed: int):
    recipe = load_recipe(RECIPE, TINY_OVERRIDES)
    torch.manual_seed(seed)
    model = DecoderVLM(recipe.model, vocab_size=64, image_token_id=3)
    return build_engine(model, recipe.train), model


def fingerprint(model: torch.nn.Module) -> float:
    return sum(float(p.detach().double().sum()) for p in model.parameters())


def demo_engine(seed: int):
    """recipes/demo.yaml's model (4.5M parameters: a checkpoint of ~70 MB, long enough to be hit mid-write)."""
    from mmscale.config import load_recipe
    from mmscale.models.decoder_vlm import DecoderVLM
    from mmscale.training import build_engine

    recipe = load_recipe(REPO / "recipes" / "demo.yaml")
    import torch

    torch.manual_seed(seed)
    model = DecoderVLM(recipe.model, vocab_size=2048, image_token_id=3)
    return build_engine(model, recipe.train), model


# Two gloo ranks save one checkpoint (ZeRO-2, then ZeRO-3); each prints the files it fsynced.
SYNCING = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import mmscale.training.checkpoint as checkpoint
    from mmscale.launch.ending import leave
    from mmscale.training import build_engine, init_distributed
    from mmscale.config import load_recipe
    from mmscale.models.decoder_vlm import DecoderVLM
    from tests.helpers.processes import wait_for
    from tests.helpers.recipes import REPO, TINY_OVERRIDES

    synced, plain = [], checkpoint.fsync
    checkpoint.fsync = lambda path: (synced.append(str(path)), plain(path))
    rank, _ = init_distributed(60)
    run_dir, stage = Path(sys.argv[1]), sys.argv[2]
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", [*TINY_OVERRIDES, f"train.zero_stage={stage}"])
    engine = build_engine(DecoderVLM(recipe.model, vocab_size=64, image_token_id=3), recipe.train)
    checkpoint.save_checkpoint(engine, run_dir, 1, {"step": 1})
    print("SYNCED", json.dumps(synced), flush=True)
    leave(0)
    """
)
