"""Shard building: LLaVA-style JSON or caption lists + an image folder -> WebDataset shards.

The plan (which records go to which shard) is a pure function of the input and the shard
size, so a build can run in several processes and resume: a shard whose tar and stats
exist is kept, a shard is written under a temporary name and renamed when complete, and
the manifest is assembled from the per-shard stats at the end.

    OUT/NAME-000000.tar ...       the shards
    OUT/.build/NAME-000000.json   per-shard stats (samples, bytes, sha256, skipped by reason)
    OUT/manifest.json             all shards, totals, skipped inputs by reason; written last
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections import Counter
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from mmscale.data.schema import IMAGE_PLACEHOLDER, TAR_MTIME, SampleError, validate_sample
from mmscale.errors import UserError

LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def read_llava(path: Path) -> list[dict]:
    """LLaVA's format: a JSON list of {"id", "image" (path, list of paths, or absent), "conversations"}."""
    records = json.loads(Path(path).read_text())
    if not isinstance(records, list):
        raise UserError(f"{path}: a LLaVA file is a JSON list of records, got {type(records).__name__}")
    return records


def read_captions(path: Path) -> list[dict]:
    """Caption lists: JSONL of {"image", "caption"} or TSV of `image<TAB>caption`, as LLaVA-style records."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if path.suffix == ".tsv":  # no quoting: a caption may start with a quote mark
                rows = [dict(zip(("image", "caption"), row)) if len(row) == 2 else None
                        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
            else:
                rows = [_json_or_none(line) for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e})") from e
    return [
        {
            "id": f"{path.stem}-{i}",
            "image": row.get("image"),
            "conversations": [{"from": "human", "value": IMAGE_PLACEHOLDER}, {"from": "gpt", "value": row.get("caption")}],
        }
        if isinstance(row, dict)
        else {"id": f"{path.stem}-{i}"}  # a malformed line: skipped as a schema error when built
        for i, row in enumerate(rows)
    ]


def _json_or_none(line: str) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def to_sample(record: dict, image_root: Path, where: str) -> tuple[dict, list[tuple[str, bytes]]]:
    """One LLaVA-style record -> (sample JSON in our schema, [(member name, image bytes)]).

    As in LLaVA's preprocessing, a record with images but no placeholder gets them at the
    start of its first user turn; any other count mismatch is an error.
    """
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise SampleError(f"{where}: a record needs a 'conversations' list")
    images = _image_paths(record)
    if images is None:
        raise SampleError(f"{where}: 'image' must be a path or a list of paths")
    try:
        messages = [{"role": LLAVA_ROLES[turn["from"]], "content": turn["value"]} for turn in record["conversations"]]
    except (KeyError, TypeError) as e:
        raise SampleError(f"{where}: each turn needs 'from' in {sorted(LLAVA_ROLES)} and a 'value' ({e!r})") from e
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages if isinstance(m["content"], str))
    if images and not placeholders:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is not None and isinstance(first_user["content"], str):
            first_user["content"] = IMAGE_PLACEHOLDER * len(images) + "\n" + first_user["content"]
    members = []
    for i, name in enumerate(images):
        path = image_root / str(name)
        extension = IMAGE_EXTENSIONS.get(path.suffix.lower())
        if extension is None or not path.is_file():
            raise SampleError(f"{where}: image {path} is missing or not a JPEG/PNG/WebP file", "missing_image")
        data = path.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()  # a full decode: verify() misses truncated files
        except Exception as e:  # Pillow signals bad bytes with many types (OSError, ValueError, ...)
            raise SampleError(f"{where}: image {path} does not decode ({e})", "bad_image") from e
        members.append((f"img{i}.{extension}", data))
    sample = {
        "id": str(record.get("id", where)),
        "source": record.get("source", "llava"),
        "images": [name for name, _ in members],
        "messages": messages,
    }
    validate_sample(sample, where)
    return sample, members


def _image_paths(record: dict) -> list[str] | None:
    """A record's image paths (none, one, or a list), or None if 'image' has another type."""
    images = record.get("image") or [] if isinstance(record, dict) else []
    images = [images] if isinstance(images, str) else images
    return images if isinstance(images, list) and all(isinstance(i, str) for i in images) else None


@dataclass(frozen=True)
class ShardPlan:
    index: int
    first: int  # global index of the first record, which also makes the sample keys unique
    records: list[dict]


def plan_shards(records: list[dict], image_root: Path, shard_samples: int, shard_bytes: int | None) -> list[ShardPlan]:
    """Consecutive records per shard: `shard_samples` each, or, with `shard_bytes`, as many as
    fit that many bytes of images (by file size, so the plan needs no decoding)."""
    plans: list[ShardPlan] = []
    start, size = 0, 0
    for i, record in enumerate(records):
        if shard_bytes is not None:
            for name in _image_paths(record) or []:
                path = image_root / name
                size += path.stat().st_size if path.is_file() else 0
        full = size >= shard_bytes if shard_bytes is not None else i + 1 - start >= shard_samples
        if full:
            plans.append(ShardPlan(len(plans), start, records[start : i + 1]))
            start, size = i + 1, 0
    if start < len(records):
        plans.append(ShardPlan(len(plans), start, records[start:]))
    return plans


@dataclass(frozen=True)
class ShardWriterTask:
    out: Path
    name: str
    image_root: Path

    def shard(self, plan: ShardPlan) -> Path:
        return self.out / f"{self.name}-{plan.index:06d}.tar"

    def stats(self, plan: ShardPlan) -> Path:
        return self.out / ".build" / f"{self.name}-{plan.index:06d}.json"

    def __call__(self, plan: ShardPlan) -> dict:
        """Write one shard (or keep it, if a previous build finished it); return its stats."""
        shard, stats_path = self.shard(plan), self.stats(plan)
        # What this shard must hold: a finished shard of another plan (other records or shard
        # size, from an earlier build into this folder) is rewritten, not reused.
        fingerprint = hashlib.sha256(json.dumps([plan.first, plan.records], sort_keys=True).encode()).hexdigest()
        if shard.is_file() and stats_path.is_file():
            stats = json.loads(stats_path.read_text())
            if stats.get("plan") == fingerprint:
                return stats
        tmp = shard.with_name(f".{shard.name}.tmp-{os.getpid()}")
        skipped: Counter[str] = Counter()
        samples = 0
        with wds.TarWriter(str(tmp), mtime=TAR_MTIME) as sink:
            for offset, record in enumerate(plan.records):
                key = f"{plan.first + offset:09d}"  # no dots: webdataset splits keys at the first one
                try:
                    sample, members = to_sample(record, self.image_root, f"record {plan.first + offset}")
                except SampleError as e:
                    skipped[e.reason] += 1
                    continue
                sink.write({"__key__": key, "json": sample, **dict(members)})
                samples += 1
        with open(tmp, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
            os.fsync(f.fileno())  # on disk before it gets its final name, so a power cut cannot shorten it
        stats = {"name": shard.name, "samples": samples, "bytes": tmp.stat().st_size, "sha256": digest,
                 "skipped": dict(skipped), "plan": fingerprint}
        os.replace(tmp, shard)  # complete: the final name never holds a half-written shard
        stats_path.parent.mkdir(exist_ok=True)
        stats_tmp = stats_path.with_suffix(".json.tmp")
        stats_tmp.write_text(json.dumps(stats))
        os.replace(stats_tmp, stats_path)
        return stats


def build_shards(
    records: list[dict],
    image_root: Path,
    out: Path,
    *,
    name: str = "shard",
    shard_samples: int = 10000,
    shard_bytes: int | None = None,
    workers: int = 1,
) -> dict:
    """Write `records` as shards under `out` with `workers` processes; return the manifest."""
    out, image_root = Path(out), Path(image_root)
    if not image_root.is_dir():
        raise UserError(f"image root {image_root} is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f".{name}-*.tar.tmp-*"):  # left by a build that was killed mid-shard
        stale.unlink()
    plans = plan_shards(records, image_root, shard_samples, shard_bytes)
    task = ShardWriterTask(out, name, image_root)
    planned = {task.shard(plan).name for plan in plans}
    extra = sorted(p.name for p in out.glob(f"{name}-*.tar") if p.name not in planned)
    if extra:  # the loader reads every .tar in the folder: strays would join the data
        raise UserError(
            f"{out} holds shards this build does not plan ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}), "
            f"left by an earlier build with other inputs or shard size; remove them or choose another --out"
        )
    with Pool(workers) as pool:
        stats = list(tqdm(pool.imap(task, plans), total=len(plans), desc=f"shards {out}", unit="shard"))
    skipped = Counter()
    for shard in stats:
        skipped.update(shard["skipped"])
    manifest = {
        "name": name,
        "inputs": len(records),
        "samples": sum(s["samples"] for s in stats),
        "bytes": sum(s["bytes"] for s in stats),
        "skipped": dict(sorted(skipped.items())),
        "shards": stats,
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / "manifest.json")
    return manifest


