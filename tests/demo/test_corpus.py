import io
import json
import re
import shutil
import unicodedata
from collections import Counter

import pytest
import webdataset as wds
from PIL import Image

from mmscale.data.schema import validate_sample
from mmscale.data.tokenizer import encode_conversation, load_tokenizer
from mmscale.demo.corpus import (
    CAPTION_GLYPHS,
    CAPTION_PROMPTS,
    EVAL_QUESTION_TYPES,
    SCENE_OBJECTS,
    build_demo_dataset,
    caption_set,
    chance_levels,
    make_eval_sample,
    make_sample,
    named_glyphs,
)
from mmscale.errors import UserError

# 56 eval samples: 14 per type, so 2 of each count 0-6 and 7 Yes / 7 No per relation type.
SMALL = dict(train_samples=60, val_samples=20, eval_samples=56, samples_per_shard=16, image_size=64, vocab_size=512)
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


def test_captions_name_their_glyph_from_the_caption_set():
    chosen = dict(caption_set(CAPTION_GLYPHS))
    named = []
    for index in range(0, 800, 2):
        _, sample, _ = make_sample(3, "train", index, 64)
        assert sample["messages"][0]["content"].startswith("<image>\n")
        codepoint = int(sample["meta"]["codepoint"], 16)
        assert sample["messages"][1]["content"] == unicodedata.name(chr(codepoint)).lower() == chosen[codepoint]
        named.append(codepoint)
    assert len(set(named)) == CAPTION_GLYPHS == 64  # 400 captions reach every glyph of the set
    assert len(named_glyphs()) > 1000 and set(chosen) <= dict(named_glyphs()).keys()
    assert all(o.codepoint in chosen for o in SCENE_OBJECTS)
    # The set is fixed (not drawn per seed), and a larger set extends a smaller one.
    assert set(caption_set(16)) == {g for g in named_glyphs() if g[0] in {o.codepoint for o in SCENE_OBJECTS}}
    assert set(caption_set(16)) < set(caption_set(CAPTION_GLYPHS)) < set(caption_set(200))
    _, sample, _ = make_sample(3, "train", 0, 64, caption_glyphs=16)
    assert int(sample["meta"]["codepoint"], 16) in {o.codepoint for o in SCENE_OBJECTS}


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


def test_count_answers_are_spread_and_a_count_asked_first_is_no_different():
    """No answer dominates, and no count is special to the first turn, which the eval split asks in."""
    first, every = Counter(), Counter()
    for index in range(1, 3000, 2):
        _, sample, _ = make_sample(0, "train", index, 64)
        turns = zip(sample["messages"][1::2], sample["meta"]["question_types"], strict=True)
        for turn, (answer, qtype) in enumerate(turns):
            if qtype == "count":
                every[answer["content"]] += 1
                first[answer["content"]] += turn == 0
    assert set(every) == {str(n) for n in range(7)}
    assert max(every.values()) < 0.3 * every.total()
    for answer in ("0", "1", "2", "3", "4"):
        share = first[answer] / first.total()
        assert 0.6 < share / (every[answer] / every.total()) < 1.6, (answer, first, every)


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


def _answer_sets(samples: list[dict]) -> dict[str, Counter]:
    answers = {}
    for sample in samples:
        answers.setdefault(sample["meta"]["question_type"], Counter())[sample["meta"]["answer"]] += 1
    return answers


def test_eval_split_holds_one_question_per_image_answered_as_training_does(built):
    out, manifest = built
    entry = manifest["splits"]["eval"]
    samples = _read(out, "eval", manifest)
    assert len(samples) == entry["samples"] == 56 and [s["samples"] for s in entry["shards"]] == [14] * 4
    assert all(s["name"].startswith("eval/demo-eval-") for s in entry["shards"])
    assert entry["sources"] == {"demo/caption": 14, "demo/scene": 42}
    for index, raw in enumerate(samples):
        sample = json.loads(raw["json"])
        validate_sample(sample, raw["__key__"])
        assert (raw["__key__"], sample, raw["img0.png"]) == make_eval_sample(0, index, 64)
        qtype, answer = sample["meta"]["question_type"], sample["meta"]["answer"]
        assert sample["id"] == f"demo-eval-{qtype}-{index:07d}" and sample["images"] == ["img0.png"]
        user, assistant = sample["messages"]  # exactly one question and its answer
        assert (user["role"], assistant["role"]) == ("user", "assistant") and answer == assistant["content"]
        assert user["content"].startswith("<image>\n")
        question = user["content"].removeprefix("<image>\n")
        if qtype == "name":
            assert question in CAPTION_PROMPTS
            assert answer == unicodedata.name(chr(int(sample["meta"]["codepoint"], 16))).lower()
        else:  # the training questions' wording, and an answer that agrees with the scene
            assert _check_answer(question, answer, sample["meta"]["objects"]) == qtype
        with Image.open(io.BytesIO(raw["img0.png"])) as image:
            assert (image.format, image.size) == ("PNG", (64, 64))


def test_eval_question_types_and_answers_are_balanced(built):
    out, manifest = built
    samples = [json.loads(raw["json"]) for raw in _read(out, "eval", manifest)]
    assert manifest["splits"]["eval"]["question_types"] == {t: 14 for t in sorted(EVAL_QUESTION_TYPES)}
    # 14 per type divides evenly by 2 (Yes/No) and 7 (counts 0-6): tolerance 0.
    answers = _answer_sets(samples)
    assert answers["count"] == {str(n): 2 for n in range(7)}
    assert answers["left_right"] == answers["above_below"] == {"Yes": 7, "No": 7}
    assert len(answers["name"]) == 14  # 14 different glyphs
    # Uneven sizes (30 per type) and any prefix (--max-samples): types differ by at most 1 sample,
    # and each answer of a type's set occurs floor or ceil of (the type's samples) / (set size) times.
    generated = [make_eval_sample(5, index, 32)[1] for index in range(120)]
    set_sizes = {"count": 7, "left_right": 2, "above_below": 2, "name": CAPTION_GLYPHS}
    for n in (4, 37, 120):
        per_type = _answer_sets(generated[:n])
        sizes = [sum(counts.values()) for counts in per_type.values()]
        assert len(per_type) == 4 and max(sizes) - min(sizes) <= 1
        for qtype, counts in per_type.items():
            total, set_size = sum(counts.values()), set_sizes[qtype]
            assert len(counts) == min(total, set_size), (n, qtype)
            assert set(counts.values()) <= {total // set_size, -(-total // set_size)}, (n, qtype)
    # The relation word is balanced too, independently of the answer: no shortcut from the wording.
    words = Counter(
        (
            s["meta"]["question_type"],
            re.search(r"(left of|right of|above|below)", s["messages"][0]["content"])[1],
            s["meta"]["answer"],
        )
        for s in generated
        if s["meta"]["question_type"] in ("left_right", "above_below")
    )
    assert len(words) == 8 and set(words.values()) <= {7, 8}


def test_eval_chance_levels_are_in_the_manifest_and_match_the_answers(built):
    out, manifest = built
    entry = manifest["splits"]["eval"]
    answers = _answer_sets([json.loads(raw["json"]) for raw in _read(out, "eval", manifest)])
    recomputed = {t: max(c.values()) / sum(c.values()) for t, c in answers.items()}  # best constant answer
    assert entry["chance"] == recomputed == {"above_below": 0.5, "count": 2 / 14, "left_right": 0.5, "name": 1 / 14}
    assert "most common answer" in entry["chance_rule"]
    # Where answers do not divide evenly, the best constant answer beats uniform guessing (1/7).
    uneven = _answer_sets([make_eval_sample(5, index, 32)[1] for index in range(0, 120, 4)])  # 30 counts
    assert chance_levels(uneven) == {"count": 5 / 30}


def test_eval_is_disjoint_from_train_and_val(built):
    out, manifest = built
    keys = {split: {s["__key__"] for s in _read(out, split, manifest)} for split in ("train", "val", "eval")}
    images = {split: {s["img0.png"] for s in _read(out, split, manifest)} for split in ("train", "val", "eval")}
    assert not keys["eval"] & (keys["train"] | keys["val"])
    assert not images["eval"] & (images["train"] | images["val"])


def test_a_build_with_other_caption_glyphs_is_refused_not_mixed(built, tmp_path):
    out, manifest = built
    old = tmp_path / "old"  # as an earlier release wrote it: no caption_glyphs, captions over every glyph
    shutil.copytree(out, old)
    params = {k: v for k, v in manifest["params"].items() if k != "caption_glyphs"}
    (old / "manifest.json").write_text(json.dumps({**manifest, "params": params}, indent=2) + "\n")
    with pytest.raises(FileExistsError, match=r"caption_glyphs=None \(asked 64\); remove it or choose another --out"):
        build_demo_dataset(old, seed=0, **SMALL)
    assert _tar_bytes(old) == _tar_bytes(out)


@pytest.mark.parametrize("caption_glyphs", [15, 100_000])
def test_caption_glyphs_must_cover_the_scene_objects_and_exist(tmp_path, caption_glyphs):
    with pytest.raises(UserError, match="caption_glyphs must be between 16"):
        build_demo_dataset(tmp_path / "data", **SMALL, caption_glyphs=caption_glyphs)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("eval_samples", [0, 6])
def test_eval_samples_must_be_a_positive_multiple_of_four(tmp_path, eval_samples):
    with pytest.raises(UserError, match="multiple of 4"):
        build_demo_dataset(tmp_path / "data", **{**SMALL, "eval_samples": eval_samples})
    assert not (tmp_path / "data").exists()
