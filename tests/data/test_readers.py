"""Readers (ranks x workers) get equal work: the count and balance checks of check_readers."""

import json
from itertools import islice

import pytest

from mmscale.config import load_recipe
from mmscale.data.loader import build_dataloader
from mmscale.data.readers import check_readers, reader_loads
from mmscale.data.shards import manifest_counts, resolve_shards
from mmscale.data.stream import ShardStream, Source
from mmscale.data.tokenizer import load_tokenizer
from mmscale.errors import UserError
from tests.helpers.corrupt import good_sample, write_shard
from tests.helpers.recipes import REPO
from tests.helpers.shards import good_shards


def test_an_uneven_manifest_is_refused_naming_key_spread_and_fix(tmp_path):
    shards = good_shards(tmp_path / "a", [6, 6, 6, 2])
    counts = manifest_counts(shards)
    assert counts == [6, 6, 6, 2]
    check_readers(shards, "data.train", 1, 1, counts)  # one reader reads everything
    # 2 readers: 2 shards each; the one with the 2-sample shard reads 8 samples an epoch, the other 12.
    with pytest.raises(UserError) as error:
        check_readers(shards, "data.train[1]", 2, 1, counts)
    message = str(error.value)
    assert message.startswith("data.train[1]: readers would get unequal work (2 ranks x 1 workers)")
    assert "give a reader 8 to 12 samples per epoch (+50%; at most +10% is accepted)" in message
    assert "`mmscale shards build --readers 2`" in message and "data.num_workers" in message
    with pytest.raises(UserError, match="give a reader 2 to 6 samples per epoch \\(\\+200%"):
        check_readers(shards, "data.train", 2, 2, counts)


@pytest.mark.parametrize(
    "counts, readers, fine",
    [
        ([20, 20, 20, 17], 2, True),  # 37 vs 40: +8%
        ([20, 20, 20, 10], 2, False),  # 30 vs 40: +33%
        ([3, 2, 3, 2], 4, True),  # one sample more: all an even split of records can do
        ([4, 2, 4, 2], 4, False),
        ([10] * 6, 4, False),  # 6 shards over 4 readers: 2 or 1 each
        ([10] * 8, 4, True),
    ],
)
def test_tolerance(counts, readers, fine):
    shards = [f"s{i}.tar" for i in range(len(counts))]
    if fine:
        check_readers(shards, "k", 1, readers, counts)
    else:
        with pytest.raises(UserError, match="unequal work"):
            check_readers(shards, "k", 1, readers, counts)


def test_without_a_complete_manifest_only_the_shard_count_is_checked(tmp_path):
    bare = good_shards(tmp_path / "bare", [6, 6, 6, 2], manifest=False)
    assert manifest_counts(bare) is None
    assert manifest_counts(["pipe:cat s-{0..3}.tar", "https://host/s-000000.tar"]) is None
    check_readers(bare, "data.train", 2, 1, manifest_counts(bare))
    good_shards(tmp_path / "partial", [6, 6, 6])
    write_shard(tmp_path / "partial" / "s-000003.tar", [good_sample("late")])  # not in the manifest
    assert manifest_counts(resolve_shards(str(tmp_path / "partial"), "k")) is None
    with pytest.raises(UserError, match="4 shards for 2 ranks x 4 workers; every reader needs a shard"):
        check_readers(bare, "data.train", 2, 4, None)
    # Another tool's manifest above the shards is passed over; one that is not JSON is named.
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": [{"name": "bare/s-000000.tar", "rows": 6}]}))
    assert manifest_counts(bare) is None
    (tmp_path / "manifest.json").write_bytes(b"\xff not json")
    with pytest.raises(UserError, match=f"{tmp_path / 'manifest.json'} is not a readable manifest"):
        manifest_counts(bare)


def test_training_refuses_uneven_shards_and_validation_reads_them(tiny_overrides, tmp_path):
    good_shards(tmp_path / "uneven", [6, 6, 6, 2])
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", tiny_overrides)
    tok = load_tokenizer(recipe.data.tokenizer)
    data = recipe.data.model_copy(update={"train": str(tmp_path / "uneven"), "val": str(tmp_path / "uneven"),
                                          "num_workers": 2})
    with pytest.raises(UserError, match="data.train: readers would get unequal work"):
        build_dataloader(data, recipe.model, tok, split="train", batch_size=2, seed=0)
    # Validation reads a fixed number of batches from the start: no balance to keep.
    assert next(iter(build_dataloader(data, recipe.model, tok, split="val", batch_size=2, seed=0)))


@pytest.mark.parametrize("world, workers", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_demo_shards_pass_for_the_demo_recipes(demo_data, world, workers):
    """The demo recipes run 1 or 2 ranks with data.num_workers=1 (tests use up to 2)."""
    for split in ("train", "val"):
        shards = resolve_shards(str(demo_data / split), f"data.{split}")
        counts = manifest_counts(shards)
        assert counts is not None and len(set(counts)) == 1
        check_readers(shards, f"data.{split}", world, workers, counts)


def test_the_bounds_are_what_the_stream_deals(tmp_path):
    """Unshuffled, the stream deals shard i to reader i mod R (rank-major: rank + world x worker),
    so readers hold disjoint shards, 2 or 1 each here; the bounds cover every such deal."""
    counts = [1, 2, 3, 4, 5]
    shards = good_shards(tmp_path / "s", counts)
    stream = ShardStream([Source("data.train", shards)], seed=0, shuffle_buffer=1, shuffle=False)
    dealt = {}
    for rank in range(2):
        for worker in range(2):
            samples = islice(stream.reader_samples(rank, 2, worker, 2), 40)
            dealt[rank + 2 * worker] = sorted({s["__url__"] for s in samples})
    assert dealt == {0: [shards[0], shards[4]], 1: [shards[1]], 2: [shards[2]], 3: [shards[3]]}
    assert reader_loads(counts, 4) == (1, 4 + 5)
