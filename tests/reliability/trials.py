"""What every reliability scenario shares: a trial's outcome and how many trials to run.

Each scenario module offers `run_trials(n, workdir, seed) -> list[Trial]`. Its test runs the
short version (a few trials; `MMSCALE_TRIALS=N` for N) and checks every trial passed (`check`);
tools/reliability_report.py runs the long version and prints the table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Trial:
    ok: bool
    what: str  # what was done to the run, e.g. "SIGKILL at step 7"
    lost: str = ""  # what it cost (steps redone, data lost...), "" for nothing; on failure, why


def trials(default: int) -> int:
    """Trials the test runs: `default` (the CI version) unless MMSCALE_TRIALS says otherwise."""
    return int(os.environ.get("MMSCALE_TRIALS", default))


def failures(results: list[Trial]) -> list[str]:
    return [f"{t.what}: {t.lost}" for t in results if not t.ok]


def check(results: list[Trial]) -> None:
    """Show every trial (pytest -s) and fail naming those that did not pass."""
    for result in results:
        print(result)
    assert failures(results) == []
