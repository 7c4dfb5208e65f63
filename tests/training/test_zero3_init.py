"""Models built under `deepspeed.zero.Init` (ZeRO-3): partitioned from the first module on, yet with
the initial weights, the loaded weights and the losses of a normal build."""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import deepspeed
import deepspeed.comm
import pytest
import torch
import torch.multiprocessing as mp
from deepspeed.runtime.zero import GatheredParameters
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    MllamaForConditionalGeneration,
)

from mmscale.config import load_recipe
from mmscale.config.model import ModelConfig, PretrainedConfig
from mmscale.config.schema import TrainConfig
from mmscale.data.tokenizer import IGNORE_INDEX
from mmscale.launch.ending import leave
from mmscale.models import build_vlm
from mmscale.models.hf import llava, mllama
from mmscale.models.pretrained import load_pretrained
from mmscale.training import build_engine, init_distributed
from mmscale.training.distributed import free_port, shutdown_distributed
from mmscale.training.engine import deepspeed_config, param_groups
from tests.helpers.cross_attention import make_sample, open_gates, pad_batch
from tests.helpers.llava import IMAGE_ID, TEXT, VISION, VOCAB, hf_config, sample_ids
from tests.helpers.mllama import tiny_hf_config
from tests.helpers.recipes import CROSS_ATTENTION_OVERRIDES, REPO, TINY_OVERRIDES, tiny_with


def _recipe(arch: str):
    name, extra = ("demo.yaml", []) if arch == "decoder" else ("demo_cross_attention.yaml", CROSS_ATTENTION_OVERRIDES)
    return load_recipe(REPO / "recipes" / name, [*tiny_with(TINY_OVERRIDES, extra), "train.zero_stage=3"])


ZERO3 = _recipe("decoder").train


def _build(cfg: ModelConfig, partitioned: bool, train: TrainConfig = ZERO3) -> nn.Module:
    """As `mmscale train` builds: seeded, under zero.Init when `partitioned`."""
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(train), enabled=partitioned):
        return build_vlm(cfg, VOCAB, IMAGE_ID)


def _whole(model: nn.Module) -> dict[str, torch.Tensor]:
    with GatheredParameters(list(model.parameters())):
        return {name: p.detach().clone() for name, p in model.named_parameters()}


def _differing(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    assert list(got) == list(want)
    return [name for name in want if not torch.equal(got[name], want[name])]


@pytest.mark.parametrize("arch", ["decoder", "cross_attention"])
def test_a_partitioned_build_holds_only_partitions_and_the_weights_of_a_normal_build(world_of_one, arch):
    cfg = _recipe(arch).model
    plain, zero = _build(cfg, partitioned=False), _build(cfg, partitioned=True)
    for (name, p), q in zip(zero.named_parameters(), plain.parameters()):
        assert p.numel() == 0 and p.ds_numel == q.numel(), name  # the module holds no weights itself
    assert not _differing(_whole(zero), dict(plain.named_parameters()))


def test_weight_decay_groups_read_the_full_shapes_of_partitioned_parameters(world_of_one):
    """A partitioned parameter's data is an empty 1-D tensor: matrices must still get weight decay.

    Needs `param_groups` (mmscale/training/engine.py) to judge by `ds_shape` where there is one.
    """
    recipe = _recipe("decoder")

    def groups(model: nn.Module) -> dict[str, list[str]]:
        names = {id(p): name for name, p in model.named_parameters()}
        return {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in param_groups(model, recipe.train)}

    assert groups(_build(recipe.model, partitioned=True)) == groups(_build(recipe.model, partitioned=False))


# ---- Released weights -------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """Tiny random transformers folders: a LLaVA, a CLIP with a tied Llama of a smaller
    vocabulary (its rows fill the first ones of the VLM's), and a Mllama with open gates."""
    root = tmp_path_factory.mktemp("released")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(hf_config("clip")).save_pretrained(root / "llava")
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    CLIPModel(CLIPConfig(vision_config=VISION, text_config=text)).save_pretrained(root / "clip")
    LlamaForCausalLM(LlamaConfig(**{**TEXT, "vocab_size": VOCAB - 8}, tie_word_embeddings=True)).save_pretrained(root / "llama")
    released_mllama = MllamaForConditionalGeneration(tiny_hf_config())
    open_gates(released_mllama)  # so that the loss test sees the cross-attention layers at work
    released_mllama.save_pretrained(root / "mllama")
    return {name: str(root / name) for name in ("llava", "clip", "llama", "mllama")}


def _cases(folders: dict[str, str]) -> dict[str, ModelConfig]:
    def config(folder: str) -> dict:
        return json.loads((Path(folder) / "config.json").read_text())

    def starting_from(cfg: ModelConfig, **pretrained: str) -> ModelConfig:
        return cfg.model_copy(update={"pretrained": PretrainedConfig(**pretrained)})

    decoder = llava.config_from_hf(config(folders["llava"]))
    tied = decoder.model_copy(update={"llm": decoder.llm.model_copy(update={"tie_embeddings": True})})
    return {
        "llava": starting_from(decoder, vlm=folders["llava"]),
        "clip+llama": starting_from(tied, vision=folders["clip"], llm=folders["llama"]),
        "mllama": starting_from(mllama.config_from_hf(config(folders["mllama"])), vlm=folders["mllama"]),
    }


def _loaded(cfg: ModelConfig, partitioned: bool) -> nn.Module:
    model = _build(cfg, partitioned)
    if partitioned:
        world = deepspeed.comm.get_world_size()
        for name, p in model.named_parameters():
            assert p.numel() == 0 and p.ds_tensor.numel() == -(-p.ds_numel // world), name
    # Only rank 0 may read the tensors of a partitioned model; the others get rank 0's copy.
    reads_forbidden = partitioned and deepspeed.comm.get_rank() != 0
    unread = mock.patch("mmscale.models.pretrained.read_state_dict", side_effect=AssertionError("tensors read"))
    with unread if reads_forbidden else nullcontext():
        load_pretrained(model, cfg)
    return model


def _check_loads_like_a_normal_build(cfg: ModelConfig) -> None:
    plain, zero = _loaded(cfg, partitioned=False), _loaded(cfg, partitioned=True)
    assert not _differing(_whole(zero), dict(plain.named_parameters()))


def test_released_weights_load_into_a_partitioned_model_as_into_a_normal_one(world_of_one, folders):
    for cfg in _cases(folders).values():
        _check_loads_like_a_normal_build(cfg)


def _batch(cfg: ModelConfig, with_images: bool) -> dict[str, torch.Tensor]:
    """One row; text only (the path that runs the vision parameters on a blank input) or with images."""
    if cfg.arch == "cross_attention":
        batch = pad_batch([make_sample([2], 6, seed=1)]) if with_images else {
            "input_ids": torch.randint(2, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))}
    else:
        ids = sample_ids(1 if with_images else 0, 24, seed=1)[None]
        batch = {"input_ids": ids, "pixel_values": torch.randn(1, 3, 32, 32)} if with_images else {"input_ids": ids}
    labels = batch["input_ids"].masked_fill(batch["input_ids"] >= VOCAB, IGNORE_INDEX)  # Mllama's image token
    return {**batch, "labels": labels}


def _two_ranks(rank: int, port: int, folders: dict[str, str]) -> None:
    """One rank of the 2-rank test (torch.multiprocessing entry point)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init_distributed(timeout_s=60)
    for cfg in _cases(folders).values():
        _check_loads_like_a_normal_build(cfg)
        # A ZeRO-3 step in which rank 0 has no image: its vision parameters run on a blank
        # input, or the ranks' parameter gathers would not match and the step would hang.
        batch = _batch(cfg, with_images=rank == 1)
        with torch.no_grad():
            want = _loaded(cfg, partitioned=False)(**batch)
        engine = build_engine(_loaded(cfg, partitioned=True), ZERO3)
        loss = engine(**batch)
        engine.backward(loss)
        engine.step()
        assert torch.isfinite(loss) and abs(loss.item() - want.item()) <= 1e-5 * abs(want.item()), (loss, want)
    shutdown_distributed()
    leave(0)  # as `mmscale train` ends a rank: without Python's finalization (see there why)


@pytest.mark.slow
def test_two_ranks_hold_halves_load_from_rank_0_alone_and_step_with_and_without_images(folders):
    mp.spawn(_two_ranks, args=(free_port(), folders), nprocs=2, join=True)
