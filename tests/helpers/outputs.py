"""What a training run leaves in its run directory, read back: metrics.jsonl and the logged sample ids."""

from __future__ import annotations

import json
from pathlib import Path


def logged_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def logged_sample_ids(run_dir: Path) -> list[str]:
    """The sample ids train.log_sample_ids wrote, every rank's file, in rank order."""
    return [i for path in sorted((run_dir / "samples").glob("rank_*.jsonl"))
            for line in path.read_text().splitlines() for i in json.loads(line)["ids"]]
