"""Scenario 3: a corrupt corpus trains to the end, and the skip counts per reason are exact.

Each trial plants bad samples of every reason of mmscale.data.schema.SKIP_REASONS, a seeded
number of each, at seeded positions inside copies of the demo's train shards, and adds a shard
that is not a tar and one cut in the middle of a member. A real `mmscale train` (the CLI,
DeepSpeed, one process) then reads the whole corpus exactly once, and the `skipped` counts of
its last metrics record must equal what was planted.

Why the counts are well-defined. A run reports what its readers met up to the last sample it
trained on, so the settings make that "everything, once":
- one reader (one loader worker): with several, each reads its own shards and the DataLoader
  takes batches from them in turn, so their passes end at different steps;
- train.steps = good samples / micro-batch: one pass and not a sample more (the next pass would
  meet, and count, the bad samples again);
- data.shuffle_buffer=1: samples come in shard order (the shards' order is still seeded), and no
  bad sample can linger in a buffer past the last good one;
- every planted sample is followed by a good one in its shard, and the run's seed is chosen so
  that both broken shards come before the last shard of the pass: what a pass meets after its
  last good sample would be counted only by the next pass.
"""

from __future__ import annotations

import random
import sys
from itertools import islice
from pathlib import Path

import pytest
import webdataset as wds

from mmscale.data.schema import SKIP_REASONS
from mmscale.data.shards import resolve_shards
from mmscale.data.stream import ShardStream, Source
from mmscale.demo.corpus import build_demo_dataset
from tests.helpers.corrupt import (
    SAMPLE_REASONS,
    bad_sample,
    good_sample,
    readable_samples,
    write_shard,
    write_truncated_shard,
    write_unreadable_shard,
)
from tests.helpers.outputs import logged_metrics
from tests.helpers.processes import run_command
from tests.helpers.recipes import RECIPE, TINY_DATA, TINY_OVERRIDES
from tests.reliability.trials import Trial, check, trials

CI_DEFAULT = 2
BATCH = 4  # train.micro_batch_size of TINY_OVERRIDES
TRUNCATED_READABLE = 4  # good samples before the cut: 96 demo + 4 is a whole number of batches


def run_trials(n: int, workdir: Path, seed: int) -> list[Trial]:
    demo = workdir / "demo"
    build_demo_dataset(demo, seed=0, **TINY_DATA)
    return [_trial(demo, workdir / f"trial_{i}", seed + i) for i in range(n)]


def _trial(demo: Path, folder: Path, seed: int) -> Trial:
    rng = random.Random(seed)
    planted = {reason: rng.randint(1, 3) for reason in SAMPLE_REASONS}
    shards, good = _corrupt_corpus(demo / "train", folder / "shards", planted, rng)
    expected = {**planted, "unreadable_shard": 1, "truncated_shard": 1}
    run_seed = _seed_whose_pass_meets_both_broken_shards(shards, good, sum(planted.values()), rng)
    what = (f"seed {seed}: {sum(planted.values())} bad samples ({_counts(planted)}) in 4 demo shards, "
            f"1 shard not a tar, 1 cut mid-member; {good} good samples, run.seed={run_seed}")
    run_dir = folder / "run"
    proc = run_command([sys.executable, "-m", "mmscale", "train", RECIPE, *TINY_OVERRIDES,
                        *_corpus_overrides(demo, shards), f"train.steps={good // BATCH}", f"run.seed={run_seed}",
                        f"run.dir={run_dir}"])
    if proc.returncode:
        return Trial(False, what, f"the run failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    last = logged_metrics(run_dir)[0][-1]
    if last["step"] != good // BATCH:
        return Trial(False, what, f"the run ended at step {last['step']}, not {good // BATCH}")
    if last["skipped"] != expected:
        return Trial(False, what, f"skip counts {_counts(last['skipped'])}, planted {_counts(expected)}")
    return Trial(True, what)


def _corpus_overrides(demo: Path, shards: Path) -> list[str]:
    """One reader, shard order, bad samples of every reason skipped (see the module's docstring)."""
    return [f"data.train={shards}", f"data.tokenizer={demo / 'tokenizer'}", "data.val=null", "data.num_workers=1",
            "data.shuffle_buffer=1", "data.overlong=skip", "train.checkpoint_every=0", "train.val_every=0"]


def _corrupt_corpus(demo_train: Path, out: Path, planted: dict[str, int], rng: random.Random) -> tuple[Path, int]:
    """Copies of the demo shards with the `planted` bad samples at random positions, none last in
    its shard, plus a shard that is not a tar and a truncated one; returns the folder and its good samples."""
    out.mkdir(parents=True)
    demo = [_samples(shard) for shard in sorted(demo_train.glob("*.tar"))]
    for i, reason in enumerate(r for r, count in planted.items() for _ in range(count)):
        samples = rng.choice(demo)
        samples.insert(rng.randrange(len(samples)), bad_sample(reason, f"bad-{i}-{reason}"))
    for i, samples in enumerate(demo):
        write_shard(out / f"mixed-{i:06d}.tar", samples)
    write_unreadable_shard(out / "unreadable-000000.tar")
    truncated = out / "truncated-000000.tar"
    write_truncated_shard(truncated, [good_sample(f"late{i}") for i in range(TRUNCATED_READABLE + 1)])
    assert readable_samples(truncated) == TRUNCATED_READABLE
    good = sum(len(samples) for samples in demo) - sum(planted.values()) + TRUNCATED_READABLE
    return out, good


def _samples(shard: Path) -> list[dict]:
    """A shard's samples as TarWriter takes them (members and key, without webdataset's own fields)."""
    return [{k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")} for s in wds.WebDataset(str(shard), shardshuffle=False)]


def _seed_whose_pass_meets_both_broken_shards(shards: Path, good: int, bad: int, rng: random.Random) -> int:
    """A run seed whose first pass (in the order the run's reader will read) meets the unreadable
    and the truncated shard before its last sample: reads tar headers only, no decoding."""
    urls = resolve_shards(str(shards), "data.train")
    while True:
        seed = rng.randrange(2**31)
        stream = ShardStream([Source("data.train", urls)], seed, shuffle_buffer=1, shuffle=True)
        list(islice(stream.reader_samples(rank=0, world=1, reader=0, readers=1), good + bad))
        if stream.skipped["unreadable_shard"] == stream.skipped["truncated_shard"] == 1:
            return seed


def _counts(skipped: dict[str, int]) -> str:
    return ", ".join(f"{reason} {skipped[reason]}" for reason in SKIP_REASONS if skipped.get(reason))


@pytest.mark.reliability
def test_a_corrupt_corpus_trains_and_every_bad_sample_is_counted_by_reason(tmp_path):
    results = run_trials(trials(CI_DEFAULT), tmp_path, seed=300)
    check(results)
