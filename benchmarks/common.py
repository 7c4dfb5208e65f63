"""What the benchmarks share: the run's context, the benchmark model's recipe, the process group."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.corpus import MixCorpus, build_mix_corpus
from mmscale.config import Recipe, load_recipe
from mmscale.data.collate import Collator

REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO / "recipes" / "demo.yaml"

# recipes/demo.yaml's model in a form LLaVA can express (CLIP tower, features of its
# second-to-last block without the final LayerNorm, as LLaVA-1.5), with 8-px patches: 256
# image tokens per 128-px image, so that text lengths scale from the LLaVA mix by a sensible
# factor (256 / 576) rather than falling below one question and answer.
LLAVA_FORM = ["model.vision.family=clip", "model.vision.feature_layers=[-2]", "model.vision.post_norm=false"]
FULL_MODEL = ["model.vision.image_size=128", "model.vision.patch_size=8"]
# Toy size for --smoke: 32-px images, 16 image tokens, a two-block LLM.
SMOKE_MODEL = [
    "model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.hidden_size=32",
    "model.vision.num_layers=2", "model.vision.num_heads=2", "model.llm.hidden_size=64", "model.llm.num_layers=2",
    "model.llm.num_heads=4", "model.llm.num_kv_heads=2", "model.llm.intermediate_size=128",
]


@dataclass
class Context:
    """One run of the benchmarks: toy size or not, and where their files go."""

    smoke: bool
    scratch: Path  # a temporary folder on the disk under test (checkpoints, dd, shards)
    mix_samples: int  # samples in the LLaVA-665K-like corpus
    _mix: MixCorpus | None = field(default=None, repr=False)

    @property
    def image_size(self) -> int:
        return 32 if self.smoke else 128

    @property
    def image_tokens(self) -> int:
        return (self.image_size // 8) ** 2

    def mix(self) -> MixCorpus:
        """The LLaVA-665K-like corpus (benchmarks.corpus), built on first use."""
        if self._mix is None:
            self._mix = build_mix_corpus(self.scratch / "corpus", self.mix_samples, self.image_size, self.image_tokens)
        return self._mix

    def overrides(self) -> list[str]:
        """Overrides of recipes/demo.yaml for the benchmark model (LLaVA-expressible; toy-sized with
        --smoke) on the mix corpus."""
        mix = self.mix()
        data = [f"data.train={mix.shards}", "data.val=null", "data.eval=null", "train.eval_every=0",
                f"data.tokenizer={mix.tokenizer}", f"data.max_seq_len={mix.max_seq_len}"]
        return [*LLAVA_FORM, *(SMOKE_MODEL if self.smoke else FULL_MODEL), *data]

    def recipe(self, extra: list[str] = ()) -> Recipe:
        return load_recipe(DEMO_RECIPE, [*self.overrides(), *extra])


@functools.cache
def world_of_one() -> None:
    """A process group of this process alone, for the DeepSpeed engines (gloo on CPU, NCCL on GPU)."""
    from mmscale.training import init_distributed  # deferred: importing DeepSpeed costs seconds

    if not dist.is_initialized():
        init_distributed(timeout_s=600)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread: per-core rates, and on a shared machine no thread of ours waits for another one
    that the scheduler put aside (a multi-threaded step is as slow as its slowest thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def collate(rows: list[dict], pad_id: int) -> dict:
    """mmscale's Collator over samples or packed rows that come from no loader (it records a
    loader position, which they have none of)."""
    return Collator(pad_id)([{**row, "reader": None} for row in rows])
