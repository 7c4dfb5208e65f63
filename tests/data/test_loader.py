import json
import re
from itertools import islice

import pytest
import torch
import webdataset as wds

from mmscale.config import load_recipe
from mmscale.config.schema import DataSource
from mmscale.data.loader import build_dataloader
from mmscale.data.schema import SampleError
from mmscale.data.shards import resolve_shards
from mmscale.data.stream import RestorePoint, ShardStream, Source
from mmscale.data.tokenizer import IGNORE_INDEX, encode_conversation, load_tokenizer
from mmscale.errors import UserError
from tests.helpers.corrupt import (
    SAMPLE_REASONS,
    bad_sample,
    good_sample,
    png,
    readable_samples,
    write_shard,
    write_truncated_shard,
    write_unreadable_shard,
)
from tests.helpers.recipes import REPO


@pytest.fixture
def recipe(tiny_overrides):
    return load_recipe(REPO / "recipes" / "demo.yaml", tiny_overrides)


def _one(shards):
    return [Source("data.train", shards)]


def _keys(stream, n):
    return [s["__key__"] for s in islice(iter(stream), n)]


def test_ranks_read_disjoint_shards_and_seeds_fix_the_order(demo_data, monkeypatch):
    shards = resolve_shards(str(demo_data / "train"), "data.train")
    assert len(shards) == 4
    keys = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        stream = ShardStream(_one(shards), seed=1, shuffle_buffer=8, shuffle=True)
        keys[rank] = _keys(stream, 48)  # one full epoch of this rank's 2 shards
        assert keys[rank] == _keys(ShardStream(_one(shards), 1, 8, True), 48)
    assert len(set(keys[0])) == len(set(keys[1])) == 48
    assert not set(keys[0]) & set(keys[1])
    monkeypatch.setenv("RANK", "0")
    assert _keys(ShardStream(_one(shards), 2, 8, True), 48) != keys[0]


def test_batches_are_padded_with_images_and_labels(recipe):
    tok = load_tokenizer(recipe.data.tokenizer)
    loader = build_dataloader(recipe.data, recipe.model, tok, split="val", batch_size=4, seed=0)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == batch["labels"].shape and batch["input_ids"].shape[0] == 4
    assert batch["pixel_values"].shape == (4, 3, 32, 32)  # one image per demo sample
    image_id = tok.convert_tokens_to_ids("<image>")
    assert torch.equal((batch["input_ids"] == image_id).sum(1), torch.full((4,), 16))
    assert ((batch["labels"] != IGNORE_INDEX).sum(1) > 0).all()
    padding = batch["input_ids"] == tok.pad_token_id
    assert (batch["labels"][padding] == IGNORE_INDEX).all()
    again = next(iter(loader))  # validation reads the same batches every time
    assert torch.equal(again["input_ids"], batch["input_ids"])


def test_fewer_shards_than_readers_is_a_clear_error(demo_data, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    shards = resolve_shards(str(demo_data / "train"), "data.train")
    with pytest.raises(UserError, match="4 shards for 8 ranks x 1 workers; .* at least 8 shards"):
        next(iter(ShardStream(_one(shards), 0, 8, True)))


def test_unreadable_image_names_the_shard_and_key(recipe, tmp_path):
    tar = tmp_path / "bad" / "bad-000000.tar"
    tar.parent.mkdir()
    meta = {"id": "s1", "images": ["img0.png"], "messages": [
        {"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "x"}]}
    with wds.TarWriter(str(tar)) as sink:
        sink.write({"__key__": "s1", "json": meta, "img0.png": b"not a png"})
    data = recipe.data.model_copy(update={"val": str(tar.parent), "strict": True})
    tok = load_tokenizer(recipe.data.tokenizer)
    loader = build_dataloader(data, recipe.model, tok, split="val", batch_size=1, seed=0)
    with pytest.raises(SampleError, match=r"bad-000000.tar sample s1: image 'img0.png' cannot be decoded"):
        next(iter(loader))


@pytest.mark.parametrize(
    "member, message",
    [
        (b"{not json", "the .json member is not valid JSON"),
        (b"[1, 2]", "the sample JSON must be an object, got list"),
        (b'{"id": "s1", "images": [], "messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ],
)
def test_bad_sample_json_names_the_shard_and_key(recipe, tmp_path, member, message):
    tar = tmp_path / "bad" / "bad-000000.tar"
    tar.parent.mkdir()
    with wds.TarWriter(str(tar)) as sink:
        sink.write({"__key__": "s1", "json": member})
    data = recipe.data.model_copy(update={"val": str(tar.parent), "strict": True})
    tok = load_tokenizer(recipe.data.tokenizer)
    loader = build_dataloader(data, recipe.model, tok, split="val", batch_size=1, seed=0)
    with pytest.raises(SampleError, match=rf"bad-000000.tar sample s1: {re.escape(message)}"):
        next(iter(loader))


def _loader(recipe, workers=2, shuffle_buffer=8, pack=False, mixture=False):
    update = {"num_workers": workers, "shuffle_buffer": shuffle_buffer}
    if pack:  # small blocks, so that a stop falls inside a block
        update.update(pack=True, pack_len=200, pack_block=5)
    if mixture:  # the demo's train and val splits as two weighted sources
        update["train"] = [DataSource(shards=recipe.data.train, weight=3), DataSource(shards=recipe.data.val)]
    data = recipe.data.model_copy(update=update)
    tok = load_tokenizer(recipe.data.tokenizer)
    return build_dataloader(data, recipe.model, tok, split="train", batch_size=3, seed=5)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("pack, mixture", [(False, False), (True, False), (False, True)],
                         ids=["padded", "packed", "mixture"])
@pytest.mark.parametrize("rank", [0, 1])
def test_restored_loader_continues_bitwise_2_ranks_x_2_workers(recipe, monkeypatch, rank, pack, mixture):
    """Stop mid-epoch after 7 batches (an odd count: worker 1's batch is due next) and restore."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    # A rank's epoch is 48 samples = 16 batches of 3 (padded): the 13 after the stop cross its end.
    whole = _take(_loader(recipe, pack=pack, mixture=mixture), 7 + 13)

    first = _loader(recipe, pack=pack, mixture=mixture)
    _take(first, 7)
    state = first.state_dict()
    assert state["batches"] == 7 and sorted(state["points"]) == [0, 1]
    if pack:
        assert any(point.emitted for point in state["points"].values())  # stopped inside a block

    resumed = _loader(recipe, pack=pack, mixture=mixture)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as it travels through a checkpoint
    for expected, got in zip(whole[7:], _take(resumed, 13)):
        assert expected.keys() == got.keys()
        for key in expected.keys() - {"meta"}:
            assert torch.equal(expected[key], got[key]), key
        assert torch.equal(expected["meta"]["lengths"], got["meta"]["lengths"])


def test_restoring_with_other_workers_or_shards_is_refused(recipe):
    state = _loader(recipe, workers=2).state_dict()
    with pytest.raises(UserError, match="2 readers per rank and this one has 1"):
        _loader(recipe, workers=1).load_state_dict(state)
    with pytest.raises(UserError, match="the shard list .* differs from the one the checkpoint was written with"):
        _loader(recipe, workers=2, mixture=True).load_state_dict(state)


def test_each_epoch_reads_every_sample_once_across_ranks_and_readers(demo_data):
    """Every (rank, reader) stream covers its shard partition once per epoch, also across a stop."""
    shards = resolve_shards(str(demo_data / "train"), "data.train")
    stream = ShardStream(_one(shards), seed=9, shuffle_buffer=8, shuffle=True)
    per_reader = 24  # 4 shards of 24 samples, one shard per (rank, reader) for 2 x 2
    for epoch in range(2):
        seen = []
        for rank in range(2):
            for reader in range(2):
                samples = stream.reader_samples(rank, 2, reader, 2)
                keys = [s["__key__"] for s in islice(samples, per_reader * (epoch + 1))][per_reader * epoch :]
                seen += keys
        assert len(seen) == len(set(seen)) == 96


def test_stream_position_skips_exactly_what_was_consumed(demo_data, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    shards = resolve_shards(str(demo_data / "train"), "data.train")
    uninterrupted = _keys(ShardStream(_one(shards), 4, 8, True), 60)
    stopped = ShardStream(_one(shards), 4, 8, True)
    head = list(islice(iter(stopped), 17))
    restored = ShardStream(_one(shards), 4, 8, True)
    restored.restore = {0: RestorePoint(17, mark=head[-1]["__reader__"][2])}
    assert [s["__key__"] for s in head] + _keys(restored, 43) == uninterrupted  # same samples, same order

    # A restore point that does not name the sample found there (the shards changed) is refused.
    moved = ShardStream(_one(shards), 4, 8, True)
    moved.restore = {0: RestorePoint(17, mark=head[-2]["__reader__"][2])}
    with pytest.raises(UserError, match="reader 0 cannot resume: sample 17 of its stream is .*, the checkpoint expects"):
        next(iter(moved))


def test_bad_samples_are_skipped_and_counted_by_reason(recipe, tmp_path, caplog):
    """A shard with good samples and one planted bad sample per reason, plus an unreadable and
    a truncated shard: one pass yields every good sample, and the counts equal what was planted."""
    folder = tmp_path / "shards"
    folder.mkdir()
    good = [good_sample(f"good{i}") for i in range(6)]
    bad = [bad_sample(reason, f"bad-{reason}") for reason in SAMPLE_REASONS]
    write_shard(folder / "a-000000.tar", [*good[:3], *bad, *good[3:]])
    write_unreadable_shard(folder / "b-000001.tar")
    write_truncated_shard(folder / "c-000002.tar", [good_sample(f"late{i}") for i in range(3)])

    data = recipe.data.model_copy(update={"train": str(folder), "num_workers": 0, "shuffle_buffer": 1, "overlong": "skip"})
    tok = load_tokenizer(recipe.data.tokenizer)
    loader = build_dataloader(data, recipe.model, tok, split="train", batch_size=1, seed=0)
    loader.stream.shuffle = False  # one pass in shard order a, b, c, so the planted counts are exact
    readable_in_c = readable_samples(folder / "c-000002.tar")
    assert readable_in_c < 3
    # The 6 good samples of a, what c yields before its cut, and the first of the next epoch:
    # by then the cut in c has been met, and the next epoch's bad samples not yet.
    batches = list(islice(iter(loader), 6 + readable_in_c + 1))
    assert [b["input_ids"].shape[0] for b in batches] == [1] * len(batches)
    skipped = loader.skipped()
    assert {reason: skipped[reason] for reason in SAMPLE_REASONS} == dict.fromkeys(SAMPLE_REASONS, 1)
    assert skipped["unreadable_shard"] == 1 and skipped["truncated_shard"] == 1
    assert any("skipped 1 bad_image" in record.message for record in caplog.records)

    # Stopped after each batch and restored, the loader goes on with the same batches and
    # the same counts as without the stop: bad samples and shard errors before a restore
    # point are not counted again, those after it are.
    n = len(batches)
    whole = list(islice(iter(loader), n + 8))  # into the second epoch: every reason again
    counts_after = {}
    for stop in range(1, n + 8):
        first = build_dataloader(data, recipe.model, tok, split="train", batch_size=1, seed=0)
        first.stream.shuffle = False
        list(islice(iter(first), stop))
        resumed = build_dataloader(data, recipe.model, tok, split="train", batch_size=1, seed=0)
        resumed.stream.shuffle = False
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        rest = list(islice(iter(resumed), n + 8 - stop))
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(whole[stop:], rest))
        counts_after[stop] = resumed.skipped()
    assert counts_after[n + 7] == {**loader.skipped()}
    assert loader.skipped()["unreadable_shard"] == 2 and loader.skipped()["bad_json"] == 2  # two epochs' worth


def test_mixture_draws_sources_by_weight_and_repeats(demo_data):
    train = resolve_shards(str(demo_data / "train"), "data.train[0]")
    val = resolve_shards(str(demo_data / "val"), "data.train[1]")
    sources = [Source("data.train[0]", train, 3.0), Source("data.train[1]", val, 1.0)]
    keys = [s["__key__"] for s in islice(ShardStream(sources, 7, 8, True).reader_samples(0, 1, 0, 1), 400)]
    from_train = sum(k.startswith("demo-train") for k in keys)
    assert 300 - 35 <= from_train <= 300 + 35  # binomial(400, 3/4): 3 standard deviations
    again = [s["__key__"] for s in islice(ShardStream(sources, 7, 8, True).reader_samples(0, 1, 0, 1), 400)]
    assert again == keys
    # The val source (32 samples) went through several epochs, each a full pass over it.
    val_keys = [k for k in keys if k.startswith("demo-val")]
    assert len(set(val_keys[:32])) == 32 and set(val_keys[32:64]) == set(val_keys[:32])


def test_recipe_takes_a_weighted_list_of_sources(tiny_overrides, demo_data):
    spec = f"[{{shards: {demo_data / 'train'}, weight: 2}}, {{shards: {demo_data / 'val'}}}]"
    recipe = load_recipe(REPO / "recipes" / "demo.yaml", [*tiny_overrides, f"data.train={spec}"])
    assert [(s.shards, s.weight) for s in recipe.data.train] == [(str(demo_data / "train"), 2.0), (str(demo_data / "val"), 1.0)]
    tok = load_tokenizer(recipe.data.tokenizer)
    loader = build_dataloader(recipe.data, recipe.model, tok, split="train", batch_size=2, seed=0)
    assert [s.key for s in loader.stream.sources] == ["data.train[0]", "data.train[1]"]
    assert next(iter(loader))["input_ids"].shape[0] == 2


def test_truncation_drops_the_images_it_cuts_off(recipe, tmp_path):
    tar = tmp_path / "long" / "long-000000.tar"
    tar.parent.mkdir()
    meta = {"id": "s1", "images": ["img0.png", "img1.png"], "messages": [
        {"role": "user", "content": "<image>\nFirst?"}, {"role": "assistant", "content": "red"},
        {"role": "user", "content": "<image>\nAnd this one?"}, {"role": "assistant", "content": "red " * 40}]}
    with wds.TarWriter(str(tar)) as sink:
        sink.write({"__key__": "s1", "json": meta, "img0.png": png(), "img1.png": png()})
    tok = load_tokenizer(recipe.data.tokenizer)
    full, _, _ = encode_conversation(tok, meta["messages"], 16, 10_000, "t")
    image_id = tok.convert_tokens_to_ids("<image>")
    second_image = max(i for i, t in enumerate(full) if t == image_id) - 15
    limit = second_image + 8  # the cut would fall inside the second image
    data = recipe.data.model_copy(update={"val": str(tar.parent), "max_seq_len": limit})
    batch = next(iter(build_dataloader(data, recipe.model, tok, split="val", batch_size=1, seed=0)))
    assert batch["input_ids"].shape[1] == second_image
    assert batch["pixel_values"].shape[0] == 1  # the second image did not fit whole: dropped with its tokens
    assert int((batch["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum()) == 16


def _restore_at(stream: ShardStream, last: dict) -> ShardStream:
    """`stream` to be restored after `last`, a sample an uninterrupted stream delivered."""
    _, position, mark, drawn, located = last["__reader__"]
    stream.restore = {0: RestorePoint(position, mark=mark, drawn=drawn, located=located)}
    return stream


def test_a_restore_seeks_opening_only_the_shard_it_resumes_in(demo_data, tmp_path, caplog):
    """With the shards' counts, a restore in the second epoch opens the shard holding its position
    and nothing before it, there at its shuffle block's first sample (the 8th of the shard): the
    other shards can be gone, and the samples are those of an uninterrupted stream."""
    for shard in resolve_shards(str(demo_data / "train"), "data.train"):
        (tmp_path / shard.rsplit("/", 1)[-1]).write_bytes(open(shard, "rb").read())
    shards = sorted(str(p) for p in tmp_path.glob("*.tar"))
    source = [Source("data.train", shards, counts=[24] * 4)]  # one reader reads all 4 per epoch: 96 samples
    whole = list(islice(iter(ShardStream(source, 3, 8, True)), 96 + 72))
    position = 96 + 61  # epoch 1, sample 13 of its third shard, inside the shuffle block of samples 56-63
    current = whole[position]["__url__"]
    assert {s["__url__"] for s in whole[96 + 48 : 96 + 72]} == {current}
    for shard in shards:
        if shard != current:
            (tmp_path / shard.rsplit("/", 1)[-1]).rename(tmp_path / (shard.rsplit("/", 1)[-1] + ".away"))
    restored = _restore_at(ShardStream(source, 3, 8, True), whole[position - 1])
    assert _keys(restored, 72 - 61) == [s["__key__"] for s in whole[position : 96 + 72]]
    assert "reading the stream again" not in caplog.text


def test_a_manifest_that_miscounts_a_shard_falls_back_to_reading_the_stream_again(demo_data, caplog):
    shards = resolve_shards(str(demo_data / "train"), "data.train")
    lying = [Source("data.train", shards, counts=[24, 24, 24, 30])]  # one shard holds 24, not 30
    whole = list(islice(iter(ShardStream(lying, 3, 8, True)), 150))
    restored = _restore_at(ShardStream(lying, 3, 8, True), whole[129])
    assert _keys(restored, 20) == [s["__key__"] for s in whole[130:150]]
    assert "seeking to sample 130 found" in caplog.text and "reading the stream again" in caplog.text


@pytest.mark.parametrize("counts", [None, [6, 2, 3, 6]], ids=["read again", "seek"])
def test_a_restore_counts_each_shard_error_once_and_yields_the_same_samples(recipe, tmp_path, counts):
    """Shuffle blocks of 4 over a good shard, an unreadable one, a truncated one and a good one;
    stopped after each batch and restored, seeking (with counts, which for the two broken shards
    are those a manifest had before they broke) or reading again: the same samples, and the same
    skip counts as without the stop."""
    folder = tmp_path / "shards"
    folder.mkdir()
    write_shard(folder / "a-000000.tar", [good_sample(f"a{i}") for i in range(6)])
    write_unreadable_shard(folder / "b-000001.tar")
    write_truncated_shard(folder / "c-000002.tar", [good_sample(f"c{i}") for i in range(3)])
    write_shard(folder / "d-000003.tar", [good_sample(f"d{i}") for i in range(6)])
    data = recipe.data.model_copy(update={"train": str(folder), "num_workers": 0, "shuffle_buffer": 4})
    tok = load_tokenizer(recipe.data.tokenizer)

    def loader():
        built = build_dataloader(data, recipe.model, tok, split="train", batch_size=1, seed=0)
        built.stream.sources = [Source(s.key, s.shards, s.weight, counts) for s in built.stream.sources]
        return built

    total = 30  # about two epochs
    whole = loader()
    batches = list(islice(iter(whole), total))
    assert whole.skipped()["unreadable_shard"] == 2 and whole.skipped()["truncated_shard"] == 2
    for stop in range(1, total):
        first = loader()
        list(islice(iter(first), stop))
        resumed = loader()
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        rest = list(islice(iter(resumed), total - stop))
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches[stop:], rest)), stop
        assert resumed.skipped() == whole.skipped(), stop


def test_a_restore_into_a_shard_that_broke_since_its_manifest_reads_again(tmp_path, caplog):
    """The manifest counts 8 samples in a shard that is no longer a tar: a restore whose block
    starts inside it cannot seek there, and reads the stream again, to the same samples."""
    write_unreadable_shard(tmp_path / "a-000000.tar")
    write_shard(tmp_path / "b-000001.tar", [good_sample(f"b{i}") for i in range(8)])
    source = [Source("data.train", sorted(str(p) for p in tmp_path.glob("*.tar")), counts=[8, 8])]
    whole = list(islice(iter(ShardStream(source, 0, 4, True)), 24))
    for position in range(1, 24):
        restored = _restore_at(ShardStream(source, 0, 4, True), whole[position - 1])
        assert _keys(restored, 24 - position) == [s["__key__"] for s in whole[position:]], position
    assert "reading the stream again" in caplog.text
