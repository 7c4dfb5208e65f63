"""Shared fixtures: a small demo corpus built once per session, and a tiny recipe over it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# DeepSpeed picks its accelerator at import time; say "CPU" before any test imports it.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from mmscale.config.towers import CLIP_MEAN, CLIP_STD, VisionConfig  # noqa: E402 (after DS_ACCELERATOR)

REPO = Path(__file__).resolve().parents[1]

# Small enough to build in about a second, with enough shards for 2 ranks x 1 worker.
TINY_DATA = dict(train_samples=96, val_samples=32, samples_per_shard=24, image_size=32, vocab_size=512)

# A recipe small enough for a training step in tens of milliseconds.
TINY_OVERRIDES = [
    "model.vision.image_size=32",
    "model.vision.patch_size=8",
    "model.vision.hidden_size=32",
    "model.vision.num_layers=1",
    "model.vision.num_heads=2",
    "model.llm.hidden_size=64",
    "model.llm.num_layers=2",
    "model.llm.num_heads=4",
    "model.llm.num_kv_heads=2",
    "model.llm.intermediate_size=128",
    "data.max_seq_len=96",
    "data.shuffle_buffer=16",
    "train.micro_batch_size=4",
    "train.steps=6",
    "train.warmup_steps=2",
    "train.log_every=2",
    "train.val_every=3",
    "train.val_batches=2",
    "train.checkpoint_every=3",
    "train.eval_every=0",  # the tests of in-loop evaluation turn it on
]


# On top of TINY_OVERRIDES: a tiny Llama-3.2-Vision-style model (recipes/demo_cross_attention.yaml);
# the 32-px demo images become 2 x 2 tiles of 16 px, 4 patches and a class token each.
CROSS_ATTENTION_OVERRIDES = [
    "model.arch=cross_attention",
    "model.tiled_vision.image_size=16",
    "model.tiled_vision.patch_size=8",
    "model.tiled_vision.hidden_size=32",
    "model.tiled_vision.num_layers=2",
    "model.tiled_vision.num_global_layers=1",
    "model.tiled_vision.num_heads=2",
    "model.tiled_vision.intermediate_size=64",
    "model.tiled_vision.intermediate_layers=[0]",
    "model.llm.tie_embeddings=false",
    "model.cross_attention.layers=[1]",
]


# What the schema's model.vision defaults were before presets (SigLIP's layout with gelu, eps 1e-5
# and CLIP's statistics: no released tower), which the tests' small towers were written on.
TOY_TOWER = dict(preset=None, family="siglip", image_size=224, patch_size=16, hidden_size=768, num_layers=12,
                 num_heads=12, activation="gelu", layer_norm_eps=1e-5, image_mean=CLIP_MEAN, image_std=CLIP_STD)


def toy_vision(**fields: object) -> VisionConfig:
    """A VisionConfig of `fields`, the others as TOY_TOWER."""
    return VisionConfig(**{**TOY_TOWER, **fields})


def tiny_with(tiny: list[str], extra: list[str]) -> list[str]:
    """`tiny` (TINY_OVERRIDES, or the tiny_overrides fixture's) and then `extra`; where `extra` makes a
    cross-attention model (CROSS_ATTENTION_OVERRIDES), `tiny` without its model.vision keys: that
    section is a decoder VLM's, and a cross-attention model refuses it."""
    if "model.arch=cross_attention" in extra:
        tiny = [override for override in tiny if not override.startswith("model.vision.")]
    return [*tiny, *extra]


# On top of TINY_OVERRIDES: a tiny Molmo2-style model (recipes/demo_molmo2.yaml), features from both of its
# tower's two blocks (transformers' Molmo2 cannot take the embedding output). 24-px crops of 3 x 3
# patches overlapping by one: a 32-px image is an overview and 2 x 2 crops on a 40-px canvas,
# 4 + 9 image tokens whose edge windows are partly padding.
MOLMO2_OVERRIDES = [
    "model.vision.image_size=24",
    "model.vision.num_layers=2",
    "model.vision.feature_layers=[-1,1]",
    "model.crops.overlap_margins=[1,0]",
]


def logged_sample_ids(run_dir: Path) -> list[str]:
    """The sample ids train.log_sample_ids wrote, every rank's file, in rank order."""
    return [i for path in sorted((run_dir / "samples").glob("rank_*.jsonl"))
            for line in path.read_text().splitlines() for i in json.loads(line)["ids"]]


def wait_for(condition: Callable[[], object], seconds: float = 5.0) -> bool:
    """Whether `condition()` holds within `seconds` (polled every 10 ms)."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def pytest_collection_modifyitems(config, items):
    """Tests marked `matrix` (the full matrix of tests/test_user_configurations.py) run only when
    the marker expression names them (`-m matrix`); the default run keeps a few of its cells."""
    if "matrix" in (config.option.markexpr or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("matrix")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("matrix")]


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from mmscale.demo.corpus import build_demo_dataset

    out = tmp_path_factory.mktemp("demo") / "data"
    build_demo_dataset(out, seed=0, **TINY_DATA)
    return out


@pytest.fixture
def tiny_overrides(demo_data, tmp_path) -> list[str]:
    """Overrides that turn recipes/demo.yaml into a seconds-long run on `demo_data`."""
    return TINY_OVERRIDES + [
        f"data.train={demo_data / 'train'}",
        f"data.val={demo_data / 'val'}",
        f"data.eval={demo_data / 'eval'}",
        f"data.tokenizer={demo_data / 'tokenizer'}",
        f"run.dir={tmp_path / 'run'}",
    ]


@contextmanager
def one_rank_world() -> Iterator[None]:
    """An in-process distributed group of one rank (gloo), as `mmscale train` makes for one process."""
    import deepspeed.comm

    from mmscale.training import init_distributed
    from mmscale.training.distributed import free_port

    world = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    with pytest.MonkeyPatch.context() as env:
        for key, value in world.items():
            env.setenv(key, value)
        init_distributed(timeout_s=60)
        try:
            yield
        finally:
            # DeepSpeed's own call also drops its cached groups, so that a later world can start.
            deepspeed.comm.destroy_process_group()


def write_pretrained_folders(cfg, vocab_size: int, out: Path) -> dict[str, Path]:
    """Random `model.pretrained` folders for model config `cfg`, as transformers saves them: a
    SigLIP or CLIP tower (`vision`, for a decoder VLM) and a Llama LLM whose vocabulary is 8 rows
    short of the VLM's (`llm`: the VLM adds tokens, as LLaVA and Mllama do)."""
    import torch
    import transformers

    from mmscale.models.hf import llama, llava

    torch.manual_seed(0)
    folders = {"llm": out / "llm"}
    transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**llama.config_to_hf(cfg.llm, vocab_size - 8))).save_pretrained(folders["llm"])
    if cfg.arch == "decoder":
        vision = llava.vision_config_to_hf(cfg.vision)
        folders["vision"] = out / "vision"
        transformers.AutoModel.from_config(transformers.AutoConfig.for_model(**vision)).save_pretrained(folders["vision"])
    return folders


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Offline, silent, and with every W&B folder inside tmp_path; stops W&B's service afterwards."""
    import wandb

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    yield run_dir
    wandb.teardown()  # ends the wandb-core service process this test started
