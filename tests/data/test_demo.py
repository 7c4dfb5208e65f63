import io
import json
import re
import unicodedata

import pytest
import webdataset as wds
from PIL import Image

from mmscale.data.demo import SCENE_OBJECTS, build_demo_dataset, caption_glyphs, make_sample
from mmscale.data.schema import validate_sample
from mmscale.data.tokenizer import encode_conversation, load_tokenizer

SMALL = dict(train_samples=60, val_samples=20, samples_per_shard=16, image_size=64, vocab_size=512)
PLURALS = {o.plural: o.name for o in SCENE_OBJECTS}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    return out, build_demo_dataset(out, seed=0, **SMALL)


def _read(out, split, manifest):
    urls = [str(out / shard["name"]) for shard in manifest["splits"][split]["shards"]]
    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def _tar_bytes(out):
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.glob("*/*.tar"))}


def test_shards_round_trip_to_the_generated_samples(built):
    out, manifest = built
    assert manifest["params"]["train_samples"] == 60
    for split, expected in (("train", 60), ("val", 20)):
        entry = manifest["splits"][split]
        samples = _read(out, split, manifest)
        assert len(samples) == entry["samples"] == sum(s["samples"] for s in entry["shards"]) == expected
        assert [s["samples"] for s in entry["shards"]] == ([16, 16, 16, 12] if split == "train" else [5, 5, 5, 5])
        assert entry["sources"] == {"demo/caption": expected // 2, "demo/scene": expected // 2}
        for index, sample in enumerate(samples):
            meta = json.loads(sample["json"])
            validate_sample(meta, sample["__key__"])
            assert meta["id"] == sample["__key__"] == f"demo-{split}-{meta['source'][5:]}-{index:07d}"
            with Image.open(io.BytesIO(sample["img0.png"])) as image:
                assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))
            key, generated, png = make_sample(0, split, index, 64)
            assert (sample["__key__"], meta, sample["img0.png"]) == (key, generated, png)


def test_same_seed_gives_identical_shards_and_another_seed_does_not(built, tmp_path):
    out, _ = built
    again = tmp_path / "again"
    build_demo_dataset(again, seed=0, **SMALL)
    assert _tar_bytes(again) == _tar_bytes(out)
    other = tmp_path / "other"
    build_demo_dataset(other, seed=1, **SMALL)
    first, second = _tar_bytes(out), _tar_bytes(other)
    assert first.keys() == second.keys() and all(first[k] != second[k] for k in first)


def test_val_differs_from_train(built):
    out, manifest = built
    train, val = _read(out, "train", manifest), _read(out, "val", manifest)
    assert not {s["__key__"] for s in train} & {s["__key__"] for s in val}
    assert not {s["img0.png"] for s in train} & {s["img0.png"] for s in val}


def test_captions_name_their_glyph():
    for index in range(0, 40, 2):
        _, sample, _ = make_sample(3, "train", index, 64)
        assert sample["messages"][0]["content"].startswith("<image>\n")
        assert sample["messages"][1]["content"] == unicodedata.name(chr(int(sample["meta"]["codepoint"], 16))).lower()
    names = dict(caption_glyphs())
    assert len(names) > 1000 and all(o.codepoint in names for o in SCENE_OBJECTS)


def _check_answer(question: str, answer: str, objects: list[dict]) -> str:
    """Recompute a scene answer from the object list; return the question type."""
    if match := re.fullmatch(r"How many (\w+) are there\?", question):
        assert answer == str(sum(o["name"] == PLURALS[match[1]] for o in objects))
        return "count"
    match = re.fullmatch(r"Is the (\w+) (left of|right of|above|below) the (\w+)\?", question)
    assert match, question
    a, b = ([o for o in objects if o["name"] == name] for name in (match[1], match[3]))
    assert len(a) == len(b) == 1  # relations only between objects that appear once
    axis = "x" if match[2] in ("left of", "right of") else "y"
    assert abs(a[0][axis] - b[0][axis]) >= 64 / 8  # half a grid cell: clearly apart
    truth = a[0][axis] < b[0][axis] if match[2] in ("left of", "above") else a[0][axis] > b[0][axis]
    assert answer == ("Yes" if truth else "No")
    return "left_right" if axis == "x" else "above_below"


def test_scene_answers_agree_with_the_objects_and_yes_no_balance():
    answers = {"count": [], "left_right": [], "above_below": []}
    for index in range(1, 600, 2):
        _, sample, _ = make_sample(0, "val", index, 64)
        messages, meta = sample["messages"], sample["meta"]
        assert 4 <= len(messages) <= 6 and 2 <= len(meta["objects"]) <= 6
        assert 1 <= len({o["name"] for o in meta["objects"]}) <= 3
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert messages[0]["content"].startswith("<image>\n")
        cells = {(int(o["x"] // 16), int(o["y"] // 16)) for o in meta["objects"]}
        assert len(cells) == len(meta["objects"])  # one object per grid cell: no overlap
        for question, answer, qtype in zip(messages[::2], messages[1::2], meta["question_types"], strict=True):
            question = question["content"].removeprefix("<image>\n")
            assert _check_answer(question, answer["content"], meta["objects"]) == qtype
            answers[qtype].append(answer["content"])
    assert answers["count"].count("0") > 20  # absent kinds are asked about too
    for qtype in ("left_right", "above_below"):
        assert len(answers[qtype]) > 50 and 0.35 < answers[qtype].count("Yes") / len(answers[qtype]) < 0.65


def test_second_call_returns_the_manifest_without_rebuilding(built, capsys):
    out, manifest = built
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert build_demo_dataset(out, seed=0, **SMALL) == manifest
    assert "already built" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert [p.name for p in out.parent.iterdir()] == ["data"]  # no temporary folder left behind
    with pytest.raises(FileExistsError, match=r"seed=0 \(asked 1\); remove it or choose another --out"):
        build_demo_dataset(out, seed=1, **SMALL)


def test_a_foreign_folder_is_left_alone(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="no manifest.json"):
        build_demo_dataset(tmp_path / "mine", **SMALL)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    (tmp_path / "empty").mkdir()  # e.g. made by a job script: filled, not refused
    assert build_demo_dataset(tmp_path / "empty", **SMALL)["splits"]["val"]["samples"] == 20


def test_tokenizer_loads_and_encodes_a_sample(built):
    out, _ = built
    tok = load_tokenizer(out / "tokenizer")
    _, sample, _ = make_sample(0, "train", 1, 64)
    input_ids, labels, _ = encode_conversation(tok, sample["messages"], 4, 256, "test")
    assert input_ids.count(tok.convert_tokens_to_ids("<image>")) == 4
    assert tok.decode([i for i in labels if i >= 0]).startswith(sample["messages"][1]["content"])


def test_license_file_credits_openmoji(built):
    out, manifest = built
    text = (out / manifest["license"]).read_text()
    assert "OpenMoji" in text and "CC BY-SA 4.0" in text and "creativecommons.org/licenses/by-sa/4.0" in text
