"""Shards of good samples with a manifest, as `mmscale shards build` writes them."""

from __future__ import annotations

import json

from mmscale.data.shards import resolve_shards
from tests.helpers.corrupt import good_sample, write_shard


def good_shards(folder, counts, manifest=True):
    """Shards of `counts` good samples under `folder`, with a manifest.json as `shards build` writes it."""
    folder.mkdir(parents=True)
    entries = []
    for i, count in enumerate(counts):
        name = f"s-{i:06d}.tar"
        write_shard(folder / name, [good_sample(f"s{i}k{j}") for j in range(count)])
        entries.append({"name": name, "samples": count})
    if manifest:
        (folder / "manifest.json").write_text(json.dumps({"samples": sum(counts), "shards": entries}))
    return resolve_shards(str(folder), "data.train")
