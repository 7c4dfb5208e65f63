"""tools/viral_ablation.py at toy size: teacher, cache, both arms, eval, table; a rerun skips
what is done. The numbers are checked for shape and range, not for which arm wins."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mmscale.demo.corpus import EVAL_QUESTION_TYPES
from tests.helpers.recipes import REPO, TINY_OVERRIDES

# The data keys and run.dir come from the tool; every other tiny setting applies to both arms.
TINY = [o for o in TINY_OVERRIDES if not o.startswith(("data.train", "data.val", "run.dir"))]


def ablation(data, out, *extra) -> str:
    command = [sys.executable, "tools/viral_ablation.py", "--data", str(data), "--out", str(out), "--seeds", "0", "1",
               "--steps", "4", "--teacher-steps", "20", *extra, "--set", *TINY]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_ablation_trains_both_arms_per_seed_and_tabulates_them(demo_data, tmp_path):
    out = tmp_path / "ablation"
    first = ablation(demo_data, out)
    assert "training the toy teacher" in first and "caching the teacher's features" in first
    assert json.loads((out / "teacher" / "config.json").read_text())["model_type"] == "dinov2"
    cache = json.loads((out / "cache" / "train" / "manifest.json").read_text())
    assert cache["teacher"]["model"] == str(out / "teacher")
    report = json.loads((out / "ablation.json").read_text())
    assert report["seeds"] == [0, 1] and report["steps"] == 4
    for arm in ("baseline", "viral"):
        runs = report["results"][arm]
        assert len(runs) == 2
        for seed, run in enumerate(runs):
            evaluated = json.loads((out / "runs" / f"{arm}-seed{seed}.eval.json").read_text())
            assert run["accuracy"] == {t: evaluated["per_type"][t]["accuracy"] for t in EVAL_QUESTION_TYPES}
            assert run["val_loss"] > 0 and run["train_seconds"] > 0
            assert (run["align_cos"] is None) == (arm == "baseline")
            lines = (out / "runs" / f"{arm}-seed{seed}" / "metrics.jsonl").read_text().splitlines()
            assert json.loads(lines[-1])["step"] == 4
    table = (out / "ablation.md").read_text()
    for qtype in EVAL_QUESTION_TYPES:
        assert f"| {qtype} accuracy |" in table
    assert " ± " in table and "tools/viral_ablation.py" in table
    # A rerun reuses the teacher, the cache and every finished run, and gives the same table.
    before = (out / "ablation.json").read_text()
    second = ablation(demo_data, out)
    assert "training the toy teacher" not in second and "caching" not in second
    assert json.loads((out / "ablation.json").read_text())["results"] == json.loads(before)["results"]
