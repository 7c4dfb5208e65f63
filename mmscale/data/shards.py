"""Shard lists of a recipe entry, and their sample counts from the manifests written beside them.

A recipe names shards as a folder of .tar files, a brace pattern, or URLs (`pipe:` commands
and fsspec URLs alike); `mmscale shards build/demo` write a manifest.json that lists each
shard's samples, which sizes an epoch and lets a restore seek.
"""

from __future__ import annotations

import json
from pathlib import Path

import braceexpand

from mmscale.errors import UserError


def resolve_shards(spec: str, key: str) -> list[str]:
    """Shard URLs for a recipe entry: a folder of .tar files, a brace pattern, or URLs.

    Local folders are checked here, before any model is built, so a typo costs seconds.
    """
    if "://" in spec or spec.startswith("pipe:"):
        return list(braceexpand.braceexpand(spec))
    path = Path(spec)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise UserError(
                f"{key}: folder {path} holds no .tar shards; build them first "
                f"(for the demo: `mmscale shards demo --out {path.parent}`)"
            )
        return shards
    shards = list(braceexpand.braceexpand(spec))
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise UserError(
            f"{key}: {missing[0]} does not exist ({len(missing)} of {len(shards)} shards missing); "
            f"point {key} at a folder of .tar shards or a brace pattern of existing files"
        )
    return shards


def manifest_samples(shards: list[str], key: str) -> int:
    """Samples in `shards`, from the manifest.json that `mmscale shards build/demo` write beside them.

    A manifest lists its shards by path relative to itself; it is looked for in each
    shard's folder and that folder's parent (the demo keeps one for train/ and val/).
    """
    counts = _listed_counts(shards)
    missing = [s for s in shards if Path(s).resolve() not in counts]
    if missing:
        raise UserError(
            f"{key}: no manifest.json lists {missing[0]} ({len(missing)} of {len(shards)} shards), so an epoch "
            "has no known size; build the shards with `mmscale shards build`, or set train.samples or train.steps"
        )
    return sum(counts[Path(s).resolve()] for s in shards)


def manifest_counts(shards: list[str]) -> list[int] | None:
    """Each shard's samples, as `manifest_samples` finds them, or None unless a manifest lists every shard."""
    counts = _listed_counts(shards)
    listed = [counts.get(Path(s).resolve()) for s in shards]
    return None if None in listed else listed


def _listed_counts(shards: list[str]) -> dict[Path, int]:
    counts: dict[Path, int] = {}
    for folder in {Path(s).resolve().parent for s in shards if "://" not in s and not s.startswith("pipe:")}:
        for manifest in (folder / "manifest.json", folder.parent / "manifest.json"):
            if manifest.is_file():
                counts.update(_manifest_counts(manifest))
    return counts


def _manifest_counts(path: Path) -> dict[Path, int]:
    def shard_lists(tree):  # `shards build` keeps one list at the top, the demo one per split
        if isinstance(tree, dict):
            if isinstance(tree.get("shards"), list):
                yield tree["shards"]
            for value in tree.values():
                yield from shard_lists(value)

    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a readable manifest ({e}); rebuild the shards or remove it") from e
    # Every training run reads the manifests beside its shards: entries of other tools' lists are passed over.
    return {
        (path.parent / s["name"]).resolve(): s["samples"]
        for shards in shard_lists(manifest) for s in shards
        if isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("samples"), int)
    }
