"""Tiny `mmscale train` runs for the reliability scenarios, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mmscale.demo.corpus import build_demo_dataset
from tests.helpers.processes import subprocess_env
from tests.helpers.recipes import RECIPE, REPO, TINY_DATA, TINY_OVERRIDES


def demo_data(workdir: Path) -> Path:
    data = workdir / "data"
    if not (data / "manifest.json").exists():
        build_demo_dataset(data, seed=0, **TINY_DATA)
    return data


def train_command(data: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "mmscale", "train", RECIPE, *TINY_OVERRIDES,
        f"data.train={data / 'train'}", f"data.val={data / 'val'}", f"data.tokenizer={data / 'tokenizer'}",
        f"run.dir={run_dir}", *overrides,
    ]


def start(command: list[str], log: Path) -> subprocess.Popen:
    """The run in a session of its own, so that killing its group also kills its loader workers."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def run(command: list[str], log: Path, timeout: int = 300) -> int:
    process = start(command, log)
    return process.wait(timeout=timeout)


def jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; a last line cut by a kill is left out."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def last_by_step(records: list[dict], key: str) -> dict[int, object]:
    """step -> `key` of the last record of that step having it (a resumed run cuts the records of
    the steps it trains again out of its logs, so there is one)."""
    return {r["step"]: r[key] for r in records if key in r}
