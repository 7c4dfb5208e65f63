"""The long version of the fault-injection suite (tests/reliability): many trials of each
scenario, then one table of trials, failures and what each fault cost.

    .venv/bin/python tools/reliability_report.py [--only kill_resume,...] [--trials kill_resume=20 ...]

Run from the repository root (it imports the scenarios from tests/reliability). The disk-full
scenario mounts a tmpfs and needs root; it is left out, and says so, where mounting fails.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Scenario module (tests/reliability/test_NAME.py) -> (trials of the long version, what it does).
SCENARIOS = {
    "kill_resume": (20, "SIGKILL at a random step, then resume: same losses, same samples per step"),
    "kill_during_save": (50, "SIGKILL at a random moment of saving: the newest complete checkpoint loads"),
    "bad_data": (5, "every bad-sample reason, a truncated and a non-tar shard: exact counts, run finishes"),
    "nonfinite": (5, "NaN/Inf in the loss and in gradients: skipped, counted, stop-after-N"),
    "dead_rank": (6, "one of 2 ranks SIGKILLed or SIGSTOPped: the other exits in bounded time, naming it"),
    "disk_full": (4, "full disk during a save: loud failure, previous checkpoint valid, stop/continue"),
}


def _run(name: str, n: int, workdir: Path) -> tuple[list, float]:
    module = importlib.import_module(f"tests.reliability.test_{name}")
    if name == "disk_full" and not module.can_mount(workdir):
        return [], 0.0
    start = time.monotonic()
    results = module.run_trials(n, workdir, seed=1)
    return results, time.monotonic() - start


def _costs(results: list) -> str:
    counted = Counter(t.lost or "nothing" for t in results if t.ok)
    return "; ".join(f"{what} ({n})" if n > 1 else what for what, n in counted.most_common(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated scenarios (default: all)")
    parser.add_argument("--trials", nargs="*", default=[], metavar="NAME=N", help="trials of a scenario")
    args = parser.parse_args()
    counts = {name: n for name, (n, _) in SCENARIOS.items()}
    counts.update({k: int(v) for k, v in (item.split("=") for item in args.trials)})
    names = args.only.split(",") if args.only else list(SCENARIOS)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"{date.today()} · commit {commit} · {platform.node()} · Python {platform.python_version()}\n")
    rows, failed = [], []
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        for name in names:
            results, seconds = _run(name, counts[name], Path(tmp) / name)
            if not results:
                rows.append(f"| {name} | {SCENARIOS[name][1]} | 0 | – | – | skipped: cannot mount a tmpfs here |")
                continue
            bad = [t for t in results if not t.ok]
            failed += [f"{name}: {t.what}: {t.lost}" for t in bad]
            rows.append(f"| {name} | {SCENARIOS[name][1]} | {len(results)} | {len(results) - len(bad)} | "
                        f"{seconds / 60:.1f} min | {_costs(results)} |")
            print(rows[-1], flush=True)
    print("\n| scenario | what is done | trials | passed | time | what a passing trial cost |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    for line in failed:
        print(f"FAILED {line}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
