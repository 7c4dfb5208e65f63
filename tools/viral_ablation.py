"""The toy VIRAL ablation: does aligning the demo VLM's image tokens to a teacher that knows
what is where make it answer vision-centric questions better?

    .venv/bin/python tools/viral_ablation.py [--out runs/viral_ablation] [--seeds 0 1 2] [--steps 1500]

Run from the repository root. In order, each step skipped when its output is already there
(so an interrupted ablation picks up where it stopped):
1. the demo corpus (`mmscale shards demo`, default parameters) in --data, if not built;
2. a toy teacher, a DINOv2-architecture ViT trained on per-patch glyph identity
   (`mmscale.demo.toy_teacher`) at the student's image size and patch grid, saved as a
   Dinov2Model folder in OUT/teacher;
3. the train shards with that teacher's features cached (`mmscale shards cache-teacher`);
4. for every seed, `recipes/demo.yaml` (baseline) and `recipes/demo_viral.yaml` (VIRAL, the
   teacher above, cached features) trained for the same steps on the same cached shards
   (one sample stream: the extra teacher members are ignored by the baseline);
5. `mmscale eval` of every run on the held-out eval split.
It prints and writes (OUT/ablation.md, OUT/ablation.json) accuracy per question type as mean
± sample std over seeds, the validation loss, and VIRAL's alignment cosine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmscale.config import load_recipe  # noqa: E402
from mmscale.demo.corpus import EVAL_QUESTION_TYPES, build_demo_dataset  # noqa: E402
from mmscale.demo.toy_teacher import ToyTeacherConfig, train_toy_teacher  # noqa: E402

ARMS = {"baseline": "recipes/demo.yaml", "viral": "recipes/demo_viral.yaml"}
MMSCALE = [sys.executable, "-m", "mmscale"]


def run(command: list[str], log: Path) -> None:
    """Run an mmscale command, its output to `log`; on failure, raise with the log's tail."""
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"failed (exit {done.returncode}): {' '.join(command)}\n--- {log} ---\n{tail}")


def last_metric(metrics: Path, key: str) -> float | None:
    values = [row[key] for row in map(json.loads, metrics.read_text().splitlines()) if row.get(key) is not None]
    return values[-1] if values else None


def train_and_evaluate(arm: str, seed: int, args: argparse.Namespace, cache: Path, teacher: Path) -> dict:
    """One arm at one seed: its eval accuracies, final validation loss and alignment cosine."""
    name = f"{arm}-seed{seed}"
    run_dir, report = args.out / "runs" / name, args.out / "runs" / f"{name}.eval.json"
    if not report.is_file():
        started = time.perf_counter()
        overrides = [
            *args.set, f"run.dir={run_dir}", f"run.name={name}", f"run.seed={seed}", f"train.steps={args.steps}",
            f"data.train={cache}", f"data.val={args.data / 'val'}", f"data.tokenizer={args.data / 'tokenizer'}",
            "train.checkpoint_every=0", "train.val_every=0", "train.eval_every=0",
        ]
        if arm == "viral":
            overrides.append(f"model.alignment.teacher={teacher}")
        run([*MMSCALE, "train", ARMS[arm], *overrides], args.out / "runs" / f"{name}.train.log")
        seconds = time.perf_counter() - started
        run([*MMSCALE, "eval", str(run_dir), "--data", str(args.data / "eval"), "--out", str(report)],
            args.out / "runs" / f"{name}.eval.log")
        result = json.loads(report.read_text())
        result["train_seconds"] = round(seconds, 1)
        report.write_text(json.dumps(result, indent=2) + "\n")
    result = json.loads(report.read_text())
    metrics = run_dir / "metrics.jsonl"
    return {
        "accuracy": {t: result["per_type"][t]["accuracy"] for t in EVAL_QUESTION_TYPES},
        "overall": result["overall"]["accuracy"],
        "val_loss": last_metric(metrics, "val_loss"),
        "align_cos": last_metric(metrics, "align_cos"),
        "train_seconds": result["train_seconds"],
    }


def mean_std(values: list[float]) -> str:
    spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.3f}{spread}"


def table(results: dict[str, list[dict]], chance: dict[str, float]) -> str:
    arms = list(results)
    lines = [f"| | chance | {' | '.join(arms)} |", "|---|---|" + "---|" * len(arms)]
    for qtype in EVAL_QUESTION_TYPES:
        cells = [mean_std([r["accuracy"][qtype] for r in results[arm]]) for arm in arms]
        lines.append(f"| {qtype} accuracy | {chance[qtype]:.3f} | {' | '.join(cells)} |")
    for key, label in (("overall", "overall accuracy"), ("val_loss", "validation loss (end)"),
                       ("align_cos", "alignment cosine (last logged steps)")):
        cells = [mean_std([r[key] for r in results[arm]]) if results[arm][0][key] is not None else "—" for arm in arms]
        lines.append(f"| {label} | | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/demo"), help="the demo corpus (built if missing)")
    parser.add_argument("--out", type=Path, default=Path("runs/viral_ablation"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500, help="training steps of every run, both arms")
    parser.add_argument("--teacher-steps", type=int, default=ToyTeacherConfig.steps)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for both arms (and the teacher's image size and grid)")
    args = parser.parse_args()
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runs").mkdir(exist_ok=True)

    built = args.data / "manifest.json"
    manifest = json.loads(built.read_text()) if built.is_file() else build_demo_dataset(args.data)
    teacher = args.out / "teacher"
    if not (teacher / "toy_teacher.json").is_file():
        print(f"training the toy teacher ({args.teacher_steps} steps) ...", flush=True)
        vision = load_recipe(ARMS["baseline"], args.set).model.vision  # its grid is the student's
        cfg = ToyTeacherConfig(image_size=vision.image_size, patch_size=vision.patch_size, steps=args.teacher_steps)
        train_toy_teacher(args.data, teacher, cfg)
    teacher_facts = json.loads((teacher / "toy_teacher.json").read_text())
    cache = args.out / "cache" / "train"
    if not (cache / "manifest.json").is_file():
        print("caching the teacher's features in the train shards ...", flush=True)
        run([*MMSCALE, "shards", "cache-teacher", str(args.data / "train"), str(cache),
             "--recipe", ARMS["viral"], *args.set, f"model.alignment.teacher={teacher}"], args.out / "cache.log")

    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for seed in args.seeds:
        for arm in ARMS:
            print(f"{arm}, seed {seed}: training {args.steps} steps and evaluating ...", flush=True)
            results[arm].append(train_and_evaluate(arm, seed, args, cache, teacher))

    chance = manifest["splits"]["eval"]["chance"]
    text = table(results, chance)
    seconds = time.perf_counter() - started
    command = " ".join([".venv/bin/python tools/viral_ablation.py", *sys.argv[1:]])
    summary = (
        f"{date.today()}, {platform.node()}: {len(args.seeds)} seeds x {len(ARMS)} arms x {args.steps} steps, "
        f"{manifest['splits']['eval']['samples']} eval questions; teacher: {teacher_facts['steps']} steps, "
        f"{teacher_facts['covered_patch_accuracy']:.3f} accuracy on covered val patches; "
        f"this invocation {seconds / 60:.1f} min (steps already done are skipped)\n\n{command}"
    )
    (args.out / "ablation.md").write_text(f"{summary}\n\n{text}\n")
    (args.out / "ablation.json").write_text(json.dumps(
        {"seeds": args.seeds, "steps": args.steps, "chance": chance, "teacher": teacher_facts, "results": results,
         "seconds": round(seconds, 1)}, indent=2) + "\n")
    print(f"{summary}\n\n{text}")


if __name__ == "__main__":
    main()
