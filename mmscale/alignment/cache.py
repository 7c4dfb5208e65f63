"""VIRAL's teacher-feature cache: shards that carry the teacher's targets, so training skips the teacher.

`cache_teacher` (`mmscale shards cache-teacher IN OUT --recipe ...`) copies every shard of IN
to OUT with every member unchanged, plus one fp16 member per image:

    <key>.<image member>.teacher.npy   (image tokens, teacher width), e.g. 000000042.img0.png.teacher.npy

computed exactly as `AlignedVLM` computes its targets online: the loader's pixels for the
student (`SquareImages`), then `Teacher.features` (its own normalisation, size, and the
resampling to the student's token grid). OUT/manifest.json lists the shards (samples,
bytes, sha256, as `mmscale shards build` writes them) and the cache's identity: the
teacher's, its width, and the student pixel settings the features were computed from.

`check_teacher_cache(recipe)` runs before training: a run uses cached features only when
every train shard carries them and their identity equals that of the teacher the recipe
builds; anything else is an error naming the difference.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from mmscale.alignment.teacher import Teacher, build_teacher
from mmscale.config import Recipe
from mmscale.config.model import ModelConfig
from mmscale.config.towers import VisionConfig
from mmscale.data.images import SquareImages
from mmscale.data.encode import parse_sample, teacher_member
from mmscale.data.schema import SampleError
from mmscale.data.shard_writer import ShardWriter, remove_unfinished
from mmscale.data.shards import manifest_samples, resolve_shards
from mmscale.errors import UserError
from mmscale.utils.files import write_durably

# A cache made by an older writer (other member layout or dtype) must not pass the identity check.
CACHE_FORMAT = 1


def cache_identity(teacher: Teacher, vision: VisionConfig) -> dict:
    """Everything the cached features depend on: the teacher and the student pixels it was fed."""
    pixels = {"image_size": vision.image_size, "resize": vision.resize, "mean": list(vision.image_mean),
              "std": list(vision.image_std)}
    return {**teacher.identity(), "width": teacher.hidden_size, "pixels": pixels, "format": CACHE_FORMAT}


def recipe_teacher(cfg: ModelConfig) -> Teacher:
    """The teacher `cfg` trains with; a recipe without one cannot make or use a cache."""
    teacher = build_teacher(cfg) if cfg.aligned else None
    if teacher is None:
        raise UserError(
            "the recipe has no VIRAL teacher to cache (model.alignment.enabled must be true and "
            "model.alignment.target dinov2); use the recipe you train with"
        )
    return teacher


# ---- writing ---------------------------------------------------------------------------


def cache_teacher(
    shards: list[str], out: Path, cfg: ModelConfig, *, batch_size: int = 64, device: str | None = None
) -> dict:
    """Write `shards` with the teacher features of `cfg`'s teacher to `out`; return the manifest.

    The teacher runs on `device` (default: CUDA if available) in fp32 over batches of about
    `batch_size` images. A finished shard of the same input and identity (from a killed
    earlier call) is kept. Samples that do not parse or whose images do not decode are
    copied without features: training skips them for the same reason.
    """
    out = Path(out)
    teacher = recipe_teacher(cfg)
    identity = cache_identity(teacher, cfg.vision)
    names = [Path(s).name for s in shards]
    _check_out(out, shards, names)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    teacher.to(torch.device(device), torch.float32)
    writer = ShardCacher(teacher, SquareImages(cfg.vision), batch_size)
    total = _known_samples(shards)
    stats = []
    with tqdm(total=total, desc=f"teacher features -> {out}", unit="sample") as progress:
        for shard, name in zip(shards, names):
            stats.append(writer.cache(shard, out / name, identity, progress))
    manifest = {
        "source": [str(s) for s in shards],
        "samples": sum(s["samples"] for s in stats),
        "bytes": sum(s["bytes"] for s in stats),
        "uncached": _sum_counts(s["uncached"] for s in stats),
        "teacher": identity,
        "shards": stats,
    }
    write_durably(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")  # last: it marks a finished cache
    return manifest


def _check_out(out: Path, shards: list[str], names: list[str]) -> None:
    if len(set(names)) != len(names):
        raise UserError("IN has two shards with the same file name; OUT keeps the names, so cache them separately")
    inputs = {Path(s).resolve().parent for s in shards if "://" not in s and not s.startswith("pipe:")}
    if out.resolve() in inputs:
        raise UserError(f"OUT {out} is IN's folder; write the cached shards to a new folder")
    out.mkdir(parents=True, exist_ok=True)
    remove_unfinished(out)  # left by a call that was killed mid-shard
    planned = set(names)
    extra = sorted(p.name for p in out.glob("*.tar") if p.name not in planned)
    if extra:  # the loader reads every .tar in the folder: strays would join the data
        raise UserError(
            f"OUT {out} holds shards that IN does not ({', '.join(extra[:3])}); remove them or choose another OUT"
        )


def _known_samples(shards: list[str]) -> int | None:
    try:
        return manifest_samples(shards, "IN")
    except UserError:  # no manifest: the progress bar just counts
        return None


def _sum_counts(counts: Iterator[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for count in counts:
        for reason, n in count.items():
            total[reason] = total.get(reason, 0) + n
    return dict(sorted(total.items()))


class ShardCacher:
    """Copies one shard, adding teacher features; the teacher sees batches gathered across samples."""

    def __init__(self, teacher: Teacher, images: SquareImages, batch_size: int):
        self.teacher, self.images, self.batch_size = teacher, images, batch_size

    def cache(self, shard: str, target: Path, identity: dict, progress: tqdm) -> dict:
        """Write `target` from `shard` (or keep it, if an earlier call finished it); return its stats."""
        stats_path = target.parent / ".cache" / f"{target.name}.json"
        fingerprint = _fingerprint(shard, identity)
        if target.is_file() and stats_path.is_file():
            stats = json.loads(stats_path.read_text())
            if stats.get("input") == fingerprint:
                progress.update(stats["samples"])
                return stats
        uncached: dict[str, int] = {}
        pending: list[tuple[dict, list[str], list[torch.Tensor]]] = []
        with ShardWriter(target, encoder=False) as sink:
            for sample in _read(shard):
                try:
                    names, pixels = self.pixels(sample, f"shard {shard} sample {sample['__key__']}")
                except SampleError as e:
                    uncached[e.reason] = uncached.get(e.reason, 0) + 1
                    names, pixels = [], []
                pending.append((sample, names, pixels))
                if sum(len(p) for _, _, p in pending) >= self.batch_size:
                    self.flush(pending, sink)
                    progress.update(len(pending))
                    pending = []
            self.flush(pending, sink)
            progress.update(len(pending))
            stats = {"name": target.name, "samples": sink.samples, **sink.commit(), "uncached": uncached,
                     "input": fingerprint}
        stats_path.parent.mkdir(exist_ok=True)
        write_durably(stats_path, json.dumps(stats), sync=False)
        return stats

    def pixels(self, sample: dict, where: str) -> tuple[list[str], list[torch.Tensor]]:
        """The sample's image member names and the student's pixels for them, as the loader makes them."""
        meta, encoded = parse_sample(sample, where)
        pixels = []
        for name, data in zip(meta["images"], encoded):
            try:
                pixels.append(self.images(data)["pixel_values"])
            except Exception as e:  # Pillow signals bad bytes with many types, as in the loader
                raise SampleError(f"{where}: image '{name}' cannot be decoded ({e})", "bad_image") from e
        return meta["images"], pixels

    def flush(self, pending: list[tuple[dict, list[str], list[torch.Tensor]]], sink: ShardWriter) -> None:
        """One teacher forward over the pending samples' images, then the samples with their features."""
        pixels = [p for _, _, sample_pixels in pending for p in sample_pixels]
        features = self.teacher.features(torch.stack(pixels)).half().cpu().numpy() if pixels else None
        start = 0
        for sample, names, sample_pixels in pending:
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            for name in names:
                members[teacher_member(name)] = _npy(features[start])
                start += 1
            sink.write({"__key__": sample["__key__"], **members})


def _read(shard: str) -> Iterator[dict]:
    def fail(error: Exception) -> bool:
        raise UserError(
            f"IN shard {shard} cannot be read ({error}); check it with `mmscale shards validate`"
        ) from error

    yield from wds.DataPipeline(wds.SimpleShardList([shard]), wds.tarfile_to_samples(handler=fail))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _fingerprint(shard: str, identity: dict) -> str:
    """What a finished output shard was made from: the input (by path, size and mtime when local) and the identity."""
    path = Path(shard)
    stat = [path.stat().st_size, path.stat().st_mtime_ns] if path.is_file() else []
    return hashlib.sha256(json.dumps([shard, stat, identity], sort_keys=True).encode()).hexdigest()


# ---- reading ---------------------------------------------------------------------------


def check_teacher_cache(recipe: Recipe) -> int | None:
    """The width of the cached teacher features the run trains on, or None when it computes
    its targets online (shards without a cache, or a run without a VIRAL teacher, which
    ignores a cache).

    Every train shard must carry features (all or none: a batch mixing cached and online
    targets would run the teacher anyway), and their identity must equal the recipe's teacher's.
    """
    if not recipe.model.aligned or recipe.model.alignment.target != "dinov2":
        return None
    spec = recipe.data.train
    entries = [("data.train", spec)] if isinstance(spec, str) else [
        (f"data.train[{i}]", source.shards) for i, source in enumerate(spec)
    ]
    identities = {
        shard: identity for key, shards in entries for shard, identity in _cached(resolve_shards(shards, key))
    }
    with_cache = [s for s, identity in identities.items() if identity is not None]
    if not with_cache:
        return None
    without = [s for s, identity in identities.items() if identity is None]
    if without:
        raise UserError(
            f"data.train mixes shards with cached teacher features ({with_cache[0]}) and without ({without[0]}, "
            f"{len(without)} of {len(identities)}); cache them all with `mmscale shards cache-teacher`, or train "
            "on the uncached shards only"
        )
    expected = cache_identity(recipe_teacher(recipe.model), recipe.model.vision)
    for shard in with_cache:
        _check_identity(identities[shard], expected, shard)
    return expected["width"]


def _cached(shards: list[str]) -> Iterator[tuple[str, dict | None]]:
    """Each shard with the teacher identity of the manifest.json beside it (or one folder up), None if it has none."""
    manifests: dict[Path, dict] = {}
    for shard in shards:
        if "://" in shard or shard.startswith("pipe:"):
            yield shard, None  # no manifest to read: remote shards are trained on without a cache
            continue
        path = Path(shard).resolve()
        identity = None
        for manifest in (path.parent / "manifest.json", path.parent.parent / "manifest.json"):
            if manifest.is_file():
                tree = manifests.setdefault(manifest, json.loads(manifest.read_text()))
                if any((manifest.parent / s["name"]).resolve() == path for s in tree.get("shards", [])):
                    identity = tree.get("teacher")
                    break
        yield shard, identity


def _check_identity(cached: dict, expected: dict, shard: str) -> None:
    differing = sorted(k for k in expected.keys() | cached.keys() if cached.get(k) != expected.get(k))
    if differing:
        field = differing[0]
        raise UserError(
            f"{shard}: its cached teacher features were made with {field}={cached.get(field)!r}, the recipe's teacher "
            f"has {field}={expected.get(field)!r} (differing: {', '.join(differing)}); re-run `mmscale shards "
            "cache-teacher` with this recipe, or change the recipe (model.alignment, model.vision) to match the cache"
        )
