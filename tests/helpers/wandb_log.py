"""Reading an offline W&B run back with W&B's own reader of its .wandb transaction log
(`wandb leet inspect`), for the tests of what mmscale sends to W&B."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def inspect(wandb_file: Path, *flags: str) -> str:
    """Run W&B's reader of a .wandb transaction log and return what it prints."""
    return subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags, str(wandb_file)],
        cwd=wandb_file.parent,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def records(wandb_file: Path, kind: str) -> list[dict]:
    """The log's records of one type ("history", "metric", "alert", ...), one JSON object per line."""
    lines = [json.loads(line) for line in inspect(wandb_file).splitlines() if line.strip()]
    return [r[kind] for r in lines if r["type"] == kind]


def summary(wandb_file: Path) -> dict:
    """The run as W&B sees it: id, name, config, state, exit code, last values."""
    return json.loads(inspect(wandb_file, "--summary"))


def offline_runs(run_dir: Path) -> list[Path]:
    """The .wandb files of RUN_DIR, one per start of the run, oldest first (folder names start with the time)."""
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)


def history(wandb_file: Path) -> list[dict]:
    return [row["item"] for row in records(wandb_file, "history")]
