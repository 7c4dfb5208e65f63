"""Shard building: LLaVA-style JSON or caption lists + an image folder -> WebDataset shards.

Records are dealt over shards in a seeded shuffle (so one source's records, which inputs
like LLaVA-665K keep together, spread over all shards) and shards hold equal numbers of
records, within one. By default their count is a multiple of the readers (ranks x loader
workers) the shards are built for, so every reader gets the same work (see `check_readers`).

The plan (which records go to which shard) is a pure function of the input and the
options, so a build can run in several processes and resume: a shard whose tar and stats
exist is kept, a shard is written under a temporary name and renamed when complete, and
the manifest is assembled from the per-shard stats at the end. A shard whose records are
all skipped is not written (a reader given an empty shard stops the run): its number stays
unused, and its stats say it is done.

    OUT/NAME-000000.tar ...       the shards
    OUT/.build/NAME-000000.json   per-shard stats (samples, bytes, sha256, skipped by reason)
    OUT/manifest.json             the written shards with their real sample counts, totals,
                                  skipped inputs by reason; written last
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import sys
from collections import Counter
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from mmscale.data.readers import uneven_readers
from mmscale.data.schema import IMAGE_PLACEHOLDER, SampleError, validate_sample
from mmscale.data.shard_writer import ShardWriter, remove_unfinished
from mmscale.errors import UserError
from mmscale.utils.files import write_durably

LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
# 64 ranks x 4 workers. A multiple of 256 shards also divides evenly among any power of two
# readers below it (8 GPUs x 4 workers = 32, 2 nodes x 8 GPUs x 2 workers = 32, ...).
DEFAULT_READERS = 256
# The default's ceiling on records per shard, a shard being what a killed build writes again:
# LLaVA-665K gets 256 shards of ~2,600 records; larger corpora get more shards, not larger ones.
MAX_SHARD_SAMPLES = 10000


def read_llava(path: Path) -> list[dict]:
    """LLaVA's format: a JSON list of {"id", "image" (path, list of paths, or absent), "conversations"}."""
    text = _read_text(path)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        cut = e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated")
        raise UserError(
            f"{path} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno}, character {e.pos} of "
            f"{len(text)}){'; the file ends early: is it complete?' if cut else ''}"
        ) from e
    if not isinstance(records, list):
        raise UserError(f"{path}: a LLaVA file is a JSON list of records, got {type(records).__name__}")
    return records


def read_captions(path: Path) -> list[dict]:
    """Caption lists: JSONL of {"image", "caption"} (and an optional "meta") or TSV of
    `image<TAB>caption`, as LLaVA-style records of source "captions"."""
    path = Path(path)
    lines = io.StringIO(_read_text(path), newline="")
    if path.suffix == ".tsv":  # no quoting: a caption may start with a quote mark
        rows = [dict(zip(("image", "caption"), row)) if len(row) == 2 else None
                for row in csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)]
    else:
        rows = [_json_or_none(line) for line in lines if line.strip()]
    return [
        {
            "id": f"{path.stem}-{i}",
            "source": "captions",
            "image": row.get("image"),
            "conversations": [{"from": "human", "value": IMAGE_PLACEHOLDER},
                              {"from": "gpt", "value": row.get("caption")}],
            **({"meta": row["meta"]} if "meta" in row else {}),
        }
        if isinstance(row, dict)
        else {"id": f"{path.stem}-{i}"}  # a malformed line: skipped as a schema error when built
        for i, row in enumerate(rows)
    ]


def _read_text(path: Path) -> str:
    # Decoded whole, so that a bad byte's position is its offset in the file.
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text: byte {e.start} is {data[e.start]:#04x} ({e.reason})") from e


def _json_or_none(line: str) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def to_sample(
    record: dict, image_root: Path, where: str, source: str | None = None
) -> tuple[dict, list[tuple[str, bytes]]]:
    """One LLaVA-style record -> (sample JSON in our schema, [(member name, image bytes)]).

    Conversations are kept as they are: a record whose `<image>` count differs from its
    images is skipped (LLaVA's own preprocessing never adds a missing `<image>` either; it
    then trains on the text alone). The sample's source is `source`, else the record's own,
    else "llava"; a record's `meta` object is carried over (eval sets need it).
    """
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise SampleError(f"{where}: a record needs a 'conversations' list")
    images = _image_paths(record)
    if images is None:
        raise SampleError(f"{where}: 'image' must be a path or a list of paths")
    meta = record.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise SampleError(f"{where}: 'meta' must be a JSON object")
    try:
        messages = [{"role": LLAVA_ROLES[turn["from"]], "content": turn["value"]} for turn in record["conversations"]]
    except (KeyError, TypeError) as e:
        raise SampleError(f"{where}: each turn needs 'from' in {sorted(LLAVA_ROLES)} and a 'value' ({e!r})") from e
    paths = [image_root / str(name) for name in images]
    sample = {
        "id": str(record.get("id", where)),
        "source": source or record.get("source", "llava"),
        # (an unsupported file gets a name here only to be refused below, after the cheap checks)
        "images": [f"img{i}.{IMAGE_EXTENSIONS.get(path.suffix.lower(), 'jpg')}" for i, path in enumerate(paths)],
        "messages": messages,
        **({"meta": meta} if meta is not None else {}),
    }
    validate_sample(sample, where)  # before reading images: a skipped record costs no decoding
    members = []
    for member, path in zip(sample["images"], paths):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            raise SampleError(f"{where}: image {path} is missing or not a JPEG/PNG/WebP file", "missing_image")
        data = path.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()  # a full decode: verify() misses truncated files
        except Exception as e:  # Pillow signals bad bytes with many types (OSError, ValueError, ...)
            raise SampleError(f"{where}: image {path} does not decode ({e})", "bad_image") from e
        members.append((member, data))
    return sample, members


def _image_paths(record: dict) -> list[str] | None:
    """A record's image paths (none, one, or a list), or None if 'image' has another type."""
    images = record.get("image") or [] if isinstance(record, dict) else []
    images = [images] if isinstance(images, str) else images
    return images if isinstance(images, list) and all(isinstance(i, str) for i in images) else None


@dataclass(frozen=True)
class ShardPlan:
    index: int
    positions: list[int]  # each record's position in the input: its sample key, and its name in skip messages
    records: list[dict]


def shard_count(
    records: list[dict], image_root: Path, readers: int, shard_samples: int | None, shard_bytes: int | None
) -> int:
    """How many shards: `shard_samples` records each, or `shard_bytes` of images each (by file
    size, so the plan needs no decoding), or, by default, the fewest that are a multiple of
    `readers` and hold at most MAX_SHARD_SAMPLES. Never more shards than records."""
    n = len(records)
    if shard_samples is not None:
        count = -(-n // shard_samples)
    elif shard_bytes is not None:
        paths = (image_root / name for record in records for name in _image_paths(record) or [])
        count = -(-sum(p.stat().st_size for p in paths if p.is_file()) // shard_bytes)
    elif n >= readers:
        count = readers * -(-n // (readers * MAX_SHARD_SAMPLES))
    else:  # too few records for a shard per reader: the most shards that still divide `readers` evenly
        count = max(d for d in range(1, n + 1) if readers % d == 0)
    return min(max(count, 1), n)


def plan_shards(
    records: list[dict],
    image_root: Path,
    *,
    readers: int = DEFAULT_READERS,
    shard_samples: int | None = None,
    shard_bytes: int | None = None,
    seed: int = 0,
) -> list[ShardPlan]:
    """`shard_count` shards of the records in a shuffle seeded by `seed`, equal within one record."""
    count = shard_count(records, image_root, readers, shard_samples, shard_bytes)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    bounds = [i * len(order) // count for i in range(count + 1)]
    return [
        ShardPlan(i, positions, [records[p] for p in positions])
        for i, positions in enumerate(order[start:end] for start, end in zip(bounds, bounds[1:]))
    ]


@dataclass(frozen=True)
class ShardWriterTask:
    out: Path
    name: str
    image_root: Path
    source: str | None

    def shard(self, plan: ShardPlan) -> Path:
        return self.out / f"{self.name}-{plan.index:06d}.tar"

    def stats(self, plan: ShardPlan) -> Path:
        return self.out / ".build" / f"{self.name}-{plan.index:06d}.json"

    def __call__(self, plan: ShardPlan) -> dict:
        """Write one shard (or keep it, if a previous build finished it); return its stats."""
        shard, stats_path = self.shard(plan), self.stats(plan)
        # What this shard must hold: a finished shard of another plan (other records, options,
        # or shard count, from an earlier build into this folder) is rewritten, not reused.
        what = [plan.positions, plan.records, self.source]
        fingerprint = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
        if stats_path.is_file():
            stats = json.loads(stats_path.read_text())
            if stats.get("plan") == fingerprint and shard.is_file() == (stats["samples"] > 0):
                return stats
        skipped: Counter[str] = Counter()
        with ShardWriter(shard) as sink:
            for position, record in zip(plan.positions, plan.records):
                try:
                    sample, members = to_sample(record, self.image_root, f"record {position}", self.source)
                except SampleError as e:
                    skipped[e.reason] += 1
                    continue
                # No dots in keys: webdataset splits keys at the first one.
                sink.write({"__key__": f"{position:09d}", "json": sample, **dict(members)})
            stats = {"name": shard.name, "samples": sink.samples, "skipped": dict(skipped), "plan": fingerprint}
            if sink.samples:
                stats.update(sink.commit())
            else:
                sink.discard()
                shard.unlink(missing_ok=True)  # an earlier plan's shard of this name would join the data
        stats_path.parent.mkdir(exist_ok=True)
        write_durably(stats_path, json.dumps(stats), sync=False)
        return stats


def build_shards(
    records: list[dict],
    image_root: Path,
    out: Path,
    *,
    name: str = "shard",
    readers: int = DEFAULT_READERS,
    shard_samples: int | None = None,
    shard_bytes: int | None = None,
    seed: int = 0,
    source: str | None = None,
    workers: int = 1,
) -> dict:
    """Write `records` as shards under `out` with `workers` processes; return the manifest.

    Shards are sized for `readers` readers (see `shard_count`); sizes that would leave
    such readers with unequal work, by the plan or by the records skipped, get a warning.
    """
    out, image_root = Path(out), Path(image_root)
    if not image_root.is_dir():
        raise UserError(f"image root {image_root} is not a folder")
    if not records:
        raise UserError("the input holds no records")
    if shard_samples is not None and shard_bytes is not None:
        raise UserError("give a shard size in samples or in bytes, not both")
    if min(readers, shard_samples or 1, shard_bytes or 1) < 1:
        raise UserError("readers and shard sizes must be positive")
    out.mkdir(parents=True, exist_ok=True)
    remove_unfinished(out, f"{name}-*")  # left by a build that was killed mid-shard
    plans = plan_shards(records, image_root, readers=readers, shard_samples=shard_samples,
                        shard_bytes=shard_bytes, seed=seed)
    warned = _plan_warning(plans, len(records), readers)
    task = ShardWriterTask(out, name, image_root, source)
    planned = {task.shard(plan).name for plan in plans}
    extra = sorted(p.name for p in out.glob(f"{name}-*.tar") if p.name not in planned)
    if extra:  # the loader reads every .tar in the folder: strays would join the data
        raise UserError(
            f"{out} holds shards this build does not plan ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}), "
            f"left by an earlier build with other inputs or options; remove them or choose another --out"
        )
    with Pool(workers) as pool:
        stats = list(tqdm(pool.imap(task, plans), total=len(plans), desc=f"shards {out}", unit="shard"))
    skipped = Counter()
    for shard in stats:
        skipped.update(shard["skipped"])
    written = [s for s in stats if s["samples"]]
    if not written:
        raise UserError(f"every one of the {len(records)} records was skipped ({dict(skipped)}): no shard written")
    problem = uneven_readers([s["samples"] for s in written], readers)
    if problem and not warned:
        _warn(f"the records skipped left the shards uneven: {problem}; training with {readers} readers would "
              f"refuse them: remove or repair the skipped records ({dict(skipped)}) and build again")
    manifest = {
        "name": name,
        "readers": readers,
        "seed": seed,
        "inputs": len(records),
        "samples": sum(s["samples"] for s in written),
        "bytes": sum(s["bytes"] for s in written),
        "skipped": dict(sorted(skipped.items())),
        "empty_shards": len(stats) - len(written),  # every record skipped: not written
        "shards": written,
    }
    write_durably(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def _plan_warning(plans: list[ShardPlan], records: int, readers: int) -> bool:
    """Warn if the planned shards would leave `readers` readers with unequal work; True if it did."""
    problem = uneven_readers([len(plan.records) for plan in plans], readers)
    if problem is None:
        return False
    if records < readers:
        _warn(f"{records} records are too few for {readers} readers: {len(plans)} shards, for runs whose readers "
              f"(ranks x data.num_workers) divide {len(plans)}")
    else:  # only a fixed shard size gets here: the default count is a multiple of `readers`
        _warn(f"{problem}; training with {readers} readers would refuse them: build a multiple of {readers} shards, "
              f"e.g. {readers * -(-len(plans) // readers)} (without --shard-samples/--shard-mb the build sizes them "
              f"so), or give --readers as the run's ranks x data.num_workers")
    return True


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)
