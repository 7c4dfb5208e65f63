import hashlib
import io
import json
import os
import re
from collections import Counter
from itertools import islice

import pytest
import webdataset as wds
from PIL import Image

from mmscale.cli import main
from mmscale.data import build
from mmscale.data.build import build_shards, read_captions, read_llava, shard_count
from mmscale.data.shard_tools import inspect_shards, validate_shards
from mmscale.data.shards import resolve_shards
from mmscale.data.readers import check_readers
from mmscale.data.stream import ShardStream, Source
from mmscale.errors import UserError
from mmscale.eval.samples import read_eval_samples


def _image(path, fmt="JPEG", size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 120, 200)).save(path, format=fmt)


def _turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


@pytest.fixture
def llava(tmp_path):
    """A LLaVA-format corpus with good, multi-image and text-only records and planted bad ones."""
    root = tmp_path / "images"
    for i in range(8):
        _image(root / "coco" / f"{i:04d}.jpg")
    _image(root / "ocr" / "page.png", fmt="PNG")
    (root / "coco" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = [{"id": f"g{i}", "image": f"coco/{i:04d}.jpg", "conversations": _turns("<image>\nWhat is it?", "A square.")}
            for i in range(8)]
    records = [
        *good[:4],
        {"id": "multi", "image": ["coco/0000.jpg", "ocr/page.png"], "conversations": _turns("<image><image>\nSame?", "No.")},
        {"id": "text", "conversations": _turns("Say hi.", "Hi.", "Again.", "Hi.")},
        {"id": "no-placeholder", "image": "coco/0001.jpg", "conversations": _turns("Colour?", "Blue.")},
        {"id": "missing", "image": "coco/nope.jpg", "conversations": _turns("<image>\nWhat?", "?")},
        {"id": "broken", "image": "coco/broken.jpg", "conversations": _turns("<image>\nWhat?", "?")},
        {"id": "mismatch", "image": "coco/0002.jpg", "conversations": _turns("<image>\n<image>\nTwo?", "One.")},
        {"id": "bad-role", "image": "coco/0003.jpg", "conversations": [{"from": "robot", "value": "<image>"}]},
        {"id": "no-answer", "conversations": _turns("Only a question?")},
        *good[4:],
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    # An image without its <image> is skipped, as README says (LLaVA-665K writes <image> for every image).
    planted = {"missing_image": 1, "bad_image": 1, "placeholder_mismatch": 2, "schema": 2}
    return path, root, len(records), planted


def test_llava_build_counts_skips_and_round_trips_through_the_loader(llava, tmp_path):
    path, root, n_records, planted = llava
    out = tmp_path / "shards"
    manifest = build_shards(read_llava(path), root, out, name="llava", readers=4, shard_samples=5, workers=2)
    kept = n_records - sum(planted.values())
    assert manifest["inputs"] == n_records and manifest["samples"] == kept == 10
    assert manifest["skipped"] == planted
    # 16 records for at most 5 a shard: 4 shards of 4 records (skipped records leave them short).
    assert [s["name"] for s in manifest["shards"]] == [f"llava-{i:06d}.tar" for i in range(4)]
    for shard in manifest["shards"]:
        data = (out / shard["name"]).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()

    # What the loader's stream yields in one epoch is exactly what the manifest counts.
    shards = resolve_shards(str(out), "data.train")
    stream = ShardStream([Source("data.train", shards)], seed=0, shuffle_buffer=4, shuffle=True)
    epoch = list(islice(stream.reader_samples(0, 1, 0, 1), kept + 1))
    keys = [s["__key__"] for s in epoch[:kept]]
    assert len(set(keys)) == kept and epoch[kept]["__key__"] in keys  # then the next epoch begins
    by_id = {json.loads(s["json"])["id"]: s for s in epoch[:kept]}
    records = json.loads(path.read_text())
    assert all(by_id[records[int(key)]["id"]]["__key__"] == key for key in keys)  # a key is the record's position
    assert json.loads(by_id["multi"]["json"])["images"] == ["img0.jpg", "img1.png"]
    assert {"img0.jpg", "img1.png"} <= set(by_id["multi"])
    assert json.loads(by_id["text"]["json"])["images"] == []
    assert "no-placeholder" not in by_id
    assert by_id["g0"]["img0.jpg"] == (root / "coco" / "0000.jpg").read_bytes()  # stored as is, not re-encoded
    assert {json.loads(s["json"])["source"] for s in epoch} == {"llava"}
    assert validate_shards(shards) == (kept, [])


def test_build_resumes_keeping_finished_shards(llava, tmp_path):
    path, root, *_ = llava
    out = tmp_path / "shards"
    first = build_shards(read_llava(path), root, out, name="llava", shard_samples=5, workers=1)
    (out / "llava-000001.tar").unlink()  # as if killed while writing shard 1
    (out / ".llava-000001.tar.tmp-999").write_bytes(b"half a shard")
    kept_mtime = os.stat(out / "llava-000000.tar").st_mtime_ns
    again = build_shards(read_llava(path), root, out, name="llava", shard_samples=5, workers=1)
    assert again == first
    assert os.stat(out / "llava-000000.tar").st_mtime_ns == kept_mtime
    assert not list(out.glob(".*.tmp-*"))

    # A tar without its stats (killed between the two renames) is written again, identically.
    (out / ".build" / "llava-000002.json").unlink()
    assert build_shards(read_llava(path), root, out, name="llava", shard_samples=5, workers=1) == first

    # Another seed deals the records to other shards: all are rewritten.
    reseeded = build_shards(read_llava(path), root, out, name="llava", shard_samples=5, seed=1, workers=1)
    assert [s["sha256"] for s in reseeded["shards"]] != [s["sha256"] for s in first["shards"]]

    # Another shard size: shards 0-3 are rewritten for the new plan; but here the new plan has
    # fewer shards, and the strays of the old one would join the data, so the build refuses.
    with pytest.raises(UserError, match="holds shards this build does not plan \\(llava-000002.tar, llava-000003.tar\\)"):
        build_shards(read_llava(path), root, out, name="llava", shard_samples=8, workers=1)
    smaller = build_shards(read_llava(path), root, out, name="llava", shard_samples=3, workers=1)
    assert len(smaller["shards"]) == 6
    assert validate_shards(resolve_shards(str(out), "x")) == (10, [])


def test_byte_target_plans_shards_by_image_size(llava, tmp_path):
    path, root, *_ = llava
    image_bytes = (root / "coco" / "0000.jpg").stat().st_size
    manifest = build_shards(read_llava(path), root, tmp_path / "s", shard_bytes=3 * image_bytes, workers=1)
    assert len(manifest["shards"]) >= 3
    assert sum(s["samples"] for s in manifest["shards"]) == manifest["samples"] == 10


@pytest.mark.parametrize("suffix", [".jsonl", ".tsv"])
def test_caption_lists_build(tmp_path, suffix):
    root = tmp_path / "images"
    for i in range(3):
        _image(root / f"{i}.png", fmt="PNG")
    rows = [("0.png", '"quoted" blue square'), ("1.png", "another one"), ("missing.png", "gone"), ("2.png", "third")]
    path = tmp_path / f"captions{suffix}"
    if suffix == ".jsonl":
        lines = [json.dumps({"image": i, "caption": c}) for i, c in rows] + ["{not json", json.dumps({"image": 5})]
    else:
        lines = [f"{i}\t{c}" for i, c in rows] + ["only one column"]
    path.write_text("\n".join(lines) + "\n")
    manifest = build_shards(read_captions(path), root, tmp_path / "out", workers=1)
    bad_lines = len(lines) - len(rows)
    assert (manifest["samples"], manifest["skipped"]) == (3, {"missing_image": 1, "schema": bad_lines})
    shards = resolve_shards(str(tmp_path / "out"), "x")
    metas = {m["id"]: m for m in (json.loads(s["json"]) for s in wds.DataPipeline(wds.SimpleShardList(shards),
                                                                                 wds.tarfile_to_samples()))}
    assert metas["captions-0"]["messages"] == [
        {"role": "user", "content": "<image>"}, {"role": "assistant", "content": '"quoted" blue square'}]
    assert {meta["source"] for meta in metas.values()} == {"captions"}


def test_validate_lists_every_corrupt_member_and_inspect_counts(tmp_path, llava, capsys):
    path, root, *_ = llava
    out = tmp_path / "shards"
    build_shards(read_llava(path), root, out, name="llava", shard_samples=5, workers=1)
    ok = {"id": "x", "images": ["img0.png"], "messages": [
        {"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}]}
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    with wds.TarWriter(str(out / "llava-000009.tar")) as sink:
        sink.write({"__key__": "k1", "json": ok, "img0.png": b"garbage"})
        sink.write({"__key__": "k2", "json": b"{", "img0.png": png.getvalue()})
        sink.write({"__key__": "k3", "json": ok, "img0.png": png.getvalue()})
    (out / "llava-000010.tar").write_bytes(b"no tar here" * 50)
    good, problems = validate_shards(resolve_shards(str(out), "x"))
    assert good == 11
    found = {(os.path.basename(p.shard), p.key, p.reason) for p in problems}
    assert found == {("llava-000009.tar", "k1", "bad_image"), ("llava-000009.tar", "k2", "bad_json"),
                     ("llava-000010.tar", "", "unreadable_shard")}
    report = inspect_shards(resolve_shards(str(out), "x"), show=2)
    assert report["samples"] == 12 and report["images_per_sample"] == {0: 1, 1: 10, 2: 1}
    assert len(report["examples"]) == 2 and report["problems"] == 2

    with pytest.raises(SystemExit) as exit_:
        main(["shards", "validate", str(out)])
    assert exit_.value.code == 1
    assert "11 good samples, 3 problems" in capsys.readouterr().out


def test_cli_build_prints_a_summary(llava, tmp_path, capsys):
    path, root, n_records, planted = llava
    main(["shards", "build", "--llava", str(path), "--image-root", str(root), "--out", str(tmp_path / "o"),
          "--shard-samples", "4", "--readers", "4", "--workers", "1"])
    out, err = capsys.readouterr()
    assert re.search(f"10 of {n_records} inputs in 4 shards of [0-9-]+ samples for 4 readers", out)
    assert "missing_image 1" in out and "schema 2" in out
    assert "warning" not in err  # 4 shards of 4 records suit 4 readers


def _text_records(n, sources=("a",)):
    """`n` text-only records (no images to make), the first n/len(sources) of the first source, and so on."""
    per = -(-n // len(sources))
    return [{"id": f"t{i}", "source": sources[i // per], "conversations": _turns(f"Say {i}.", f"{i}")}
            for i in range(n)]


def _shard_ids(out, manifest):
    return [{json.loads(s["json"])["id"] for s in wds.DataPipeline(wds.SimpleShardList([str(out / shard["name"])]),
                                                                     wds.tarfile_to_samples())}
            for shard in manifest["shards"]]


def test_shards_are_sized_for_the_readers_equal_and_shuffled(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(build, "MAX_SHARD_SAMPLES", 50)
    records = _text_records(1000, sources=("coco", "gqa", "ocr_vqa", "text"))
    manifest = build_shards(records, tmp_path, tmp_path / "out", readers=8, workers=2)
    # The fewest multiple of 8 shards holding at most 50: 24 shards of 41 or 42 records.
    counts = [s["samples"] for s in manifest["shards"]]
    assert len(counts) == 24 and set(counts) == {41, 42} and sum(counts) == 1000
    assert "warning" not in capsys.readouterr().err
    shards = [str(tmp_path / "out" / s["name"]) for s in manifest["shards"]]
    for world, workers in ((1, 8), (2, 4), (4, 2), (8, 1), (2, 2), (1, 1)):
        check_readers(shards, "data.train", world, workers, counts)
    with pytest.raises(UserError, match="unequal work"):
        check_readers(shards, "data.train", 1, 5, counts)  # 24 shards over 5 readers: 5 or 4 each
    # Each input source, a quarter of the records in a row, is dealt over every shard.
    ids = _shard_ids(tmp_path / "out", manifest)
    by_id = {r["id"]: r["source"] for r in records}
    assert all({by_id[i] for i in shard} == {"coco", "gqa", "ocr_vqa", "text"} for shard in ids)
    # The same seed deals the same way; another seed otherwise.
    again = build_shards(records, tmp_path, tmp_path / "again", readers=8, workers=1)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]
    other = build_shards(records, tmp_path, tmp_path / "other", readers=8, seed=1, workers=1)
    assert _shard_ids(tmp_path / "other", other) != ids


@pytest.mark.parametrize("n, readers, shards", [(100, 256, 64), (5, 4, 4), (3, 4, 2), (300, 256, 256)])
def test_default_shard_count(tmp_path, n, readers, shards):
    """A multiple of the readers when there are records enough, else the most shards dividing them evenly."""
    assert shard_count(_text_records(n), tmp_path, readers, None, None) == shards


def test_a_fixed_shard_size_that_leaves_readers_uneven_is_warned_about(tmp_path, capsys):
    manifest = build_shards(_text_records(1000), tmp_path, tmp_path / "out", readers=8, shard_samples=100, workers=1)
    assert [s["samples"] for s in manifest["shards"]] == [100] * 10  # as asked
    err = capsys.readouterr().err
    assert "10 shards of 100 samples, dealt to 8 readers, give a reader 100 to 200 samples" in err
    assert "build a multiple of 8 shards, e.g. 16" in err
    build_shards(_text_records(1000), tmp_path, tmp_path / "fits", readers=5, shard_samples=100, workers=1)
    assert "warning" not in capsys.readouterr().err
    build_shards(_text_records(100), tmp_path, tmp_path / "few", workers=1)
    err = capsys.readouterr().err
    assert "warning: 100 records are too few for 256 readers: 64 shards, for runs whose readers" in err


def test_shards_whose_records_are_all_skipped_are_not_written(tmp_path, capsys):
    """One record a shard: the bad ones would be empty shards, which stop the reader given one."""
    records = _text_records(8)
    out = tmp_path / "out"
    first = build_shards(records, tmp_path, out, name="s", readers=1, shard_samples=1, workers=1)
    assert len(first["shards"]) == 8 and first["empty_shards"] == 0
    bad = [1, 4, 7]
    for i in bad:  # another build of the same layout, now with 3 records that have no assistant turn
        records[i] = {"id": f"bad{i}", "conversations": _turns("No answer?")}
    manifest = build_shards(records, tmp_path, out, name="s", readers=1, shard_samples=1, workers=1)
    assert manifest["empty_shards"] == 3 and manifest["skipped"] == {"schema": 3}
    assert all(s["samples"] == 1 for s in manifest["shards"]) and len(manifest["shards"]) == 5
    # The earlier build's tars of the now empty shards are gone: the folder holds what the manifest lists.
    assert sorted(p.name for p in out.glob("*.tar")) == [s["name"] for s in manifest["shards"]]
    assert validate_shards(resolve_shards(str(out), "x")) == (5, [])
    # A rerun keeps every shard, the empty ones included (their stats say they are done).
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert build_shards(records, tmp_path, out, name="s", readers=1, shard_samples=1, workers=1) == manifest
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes
    capsys.readouterr()
    # For 8 readers, the 5 shards left are too few: said at the end of the build.
    build_shards(records, tmp_path, tmp_path / "for8", readers=8, shard_samples=1, workers=1)
    assert "the records skipped left the shards uneven: 5 shards for 8 readers" in capsys.readouterr().err
    with pytest.raises(UserError, match="every one of the 1 records was skipped"):
        build_shards([records[1]], tmp_path, tmp_path / "none", workers=1)


@pytest.mark.parametrize(
    "reader, content, message",
    [
        (read_llava, b'[{"id": "caf\xe9"}]',
         r"llava.json is not UTF-8 text: byte 12 is 0xe9 \(invalid continuation byte\)"),
        (read_llava, b'[{"id": "a"},\n {"id": "b", "conv',
         r"llava.json is not valid JSON: Unterminated string .*\(line 2, column 14, .*the file ends early"),
        (read_llava, b'[{"id": "a"} {"id": "b"}]',
         r"llava.json is not valid JSON: Expecting ',' delimiter \(line 1, column 14, character 13 of 25\)$"),
        (read_captions, b"a.png\tfine\nb.png\t\xff\n", r"captions.tsv is not UTF-8 text: byte 17 is 0xff"),
    ],
)
def test_bad_input_files_are_one_line_errors_naming_file_and_position(tmp_path, capsys, reader, content, message):
    path = tmp_path / ("llava.json" if reader is read_llava else "captions.tsv")
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        reader(path)
    with pytest.raises(SystemExit) as exit_:
        main(["shards", "build", "--llava" if reader is read_llava else "--captions", str(path),
              "--image-root", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and str(path) in err and "Traceback" not in err


def test_sources_default_by_input_kind_and_can_be_named(llava, tmp_path):
    path, root, *_ = llava
    records = read_llava(path)
    records[0] = {**records[0], "source": "coco/own"}
    manifest = build_shards(records, root, tmp_path / "a", readers=1, workers=1)
    sources = Counter(json.loads(s["json"])["source"] for s in _raw(tmp_path / "a", manifest))
    assert sources == {"llava": 9, "coco/own": 1}
    named = build_shards(records, root, tmp_path / "b", readers=1, source="llava665k", workers=1)
    assert {json.loads(s["json"])["source"] for s in _raw(tmp_path / "b", named)} == {"llava665k"}


def _raw(out, manifest):
    return list(wds.DataPipeline(wds.SimpleShardList([str(out / s["name"]) for s in manifest["shards"]]),
                                 wds.tarfile_to_samples()))


def test_meta_passes_through_into_eval_shards_the_eval_reader_reads(tmp_path):
    root = tmp_path / "images"
    questions = [("count", "How many squares?", "1"), ("colour", "What colour is it?", "blue"),
                 ("shape", "What shape?", "square")]
    records = []
    for i, (qtype, question, answer) in enumerate(questions):
        _image(root / f"{i}.png", fmt="PNG")
        records.append({"id": f"q{i}", "image": f"{i}.png", "conversations": _turns(f"<image>\n{question}", answer),
                        "meta": {"question_type": qtype, "answer": answer}})
    records.append({"id": "bad-meta", "image": "0.png", "conversations": _turns("<image>\nWhat?", "x"), "meta": "x"})
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(records))
    manifest = build_shards(read_llava(path), root, tmp_path / "eval", readers=1, source="my-eval", workers=1)
    assert manifest["skipped"] == {"schema": 1}
    read = list(read_eval_samples(resolve_shards(str(tmp_path / "eval"), "--data")))
    assert sorted((s.id, s.question_type, s.answer) for s in read) == [
        (f"q{i}", qtype, answer) for i, (qtype, _, answer) in enumerate(questions)]
