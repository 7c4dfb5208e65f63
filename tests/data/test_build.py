import hashlib
import io
import json
import os
from itertools import islice

import pytest
import webdataset as wds
from PIL import Image

from mmscale.cli import main
from mmscale.data.build import build_shards, read_captions, read_llava
from mmscale.data.loader import resolve_shards
from mmscale.data.shard_tools import inspect_shards, validate_shards
from mmscale.data.stream import ShardStream, Source
from mmscale.errors import UserError


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
    planted = {"missing_image": 1, "bad_image": 1, "placeholder_mismatch": 1, "schema": 2}
    return path, root, len(records), planted


def test_llava_build_counts_skips_and_round_trips_through_the_loader(llava, tmp_path):
    path, root, n_records, planted = llava
    out = tmp_path / "shards"
    manifest = build_shards(read_llava(path), root, out, name="llava", shard_samples=5, workers=2)
    kept = n_records - sum(planted.values())
    assert manifest["inputs"] == n_records and manifest["samples"] == kept == 11
    assert manifest["skipped"] == planted
    # Shards are planned over input records (16 / 5), so skipped records leave them short.
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
    assert json.loads(by_id["multi"]["json"])["images"] == ["img0.jpg", "img1.png"]
    assert {"img0.jpg", "img1.png"} <= set(by_id["multi"])
    assert json.loads(by_id["text"]["json"])["images"] == []
    assert json.loads(by_id["no-placeholder"]["json"])["messages"][0]["content"] == "<image>\nColour?"
    assert by_id["g0"]["img0.jpg"] == (root / "coco" / "0000.jpg").read_bytes()  # stored as is, not re-encoded
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

    # Another shard size: shards 0-3 are rewritten for the new plan; but here the new plan has
    # fewer shards, and the strays of the old one would join the data, so the build refuses.
    with pytest.raises(UserError, match="holds shards this build does not plan \\(llava-000002.tar, llava-000003.tar\\)"):
        build_shards(read_llava(path), root, out, name="llava", shard_samples=8, workers=1)
    bigger = build_shards(read_llava(path), root, out, name="llava", shard_samples=4, workers=1)
    assert [s["samples"] for s in bigger["shards"]] != [s["samples"] for s in first["shards"]]
    assert validate_shards(resolve_shards(str(out), "x")) == (11, [])


def test_byte_target_plans_shards_by_image_size(llava, tmp_path):
    path, root, *_ = llava
    image_bytes = (root / "coco" / "0000.jpg").stat().st_size
    manifest = build_shards(read_llava(path), root, tmp_path / "s", shard_bytes=3 * image_bytes, workers=1)
    assert len(manifest["shards"]) >= 3
    assert sum(s["samples"] for s in manifest["shards"]) == manifest["samples"] == 11


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
    sample = next(iter(wds.DataPipeline(wds.SimpleShardList(resolve_shards(str(tmp_path / "out"), "x")),
                                        wds.tarfile_to_samples())))
    meta = json.loads(sample["json"])
    assert meta["messages"] == [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": '"quoted" blue square'}]


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
    assert good == 12
    found = {(os.path.basename(p.shard), p.key, p.reason) for p in problems}
    assert found == {("llava-000009.tar", "k1", "bad_image"), ("llava-000009.tar", "k2", "bad_json"),
                     ("llava-000010.tar", "", "unreadable_shard")}
    report = inspect_shards(resolve_shards(str(out), "x"), show=2)
    assert report["samples"] == 13 and report["images_per_sample"] == {0: 1, 1: 11, 2: 1}
    assert len(report["examples"]) == 2 and report["problems"] == 2

    with pytest.raises(SystemExit) as exit_:
        main(["shards", "validate", str(out)])
    assert exit_.value.code == 1
    assert "12 good samples, 3 problems" in capsys.readouterr().out


def test_cli_build_prints_a_summary(llava, tmp_path, capsys):
    path, root, n_records, planted = llava
    main(["shards", "build", "--llava", str(path), "--image-root", str(root), "--out", str(tmp_path / "o"),
          "--shard-samples", "4", "--workers", "1"])
    out = capsys.readouterr().out
    assert f"11 of {n_records} inputs in 4 shards" in out
    assert "missing_image 1" in out and "schema 2" in out
