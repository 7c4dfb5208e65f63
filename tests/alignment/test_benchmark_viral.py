"""benchmarks/viral.py runs at toy size so it cannot rot; its numbers are checked for presence, not speed."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO


def test_viral_benchmark_prints_a_row_per_variant():
    proc = subprocess.run([sys.executable, "benchmarks/viral.py", "--steps", "1", "--batch", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^\| ([^|]+) \| ([\d.]+) \| ([\d.]+) \|$", proc.stdout, re.M)
    assert [r[0] for r in rows] == ["baseline", "VIRAL online", "VIRAL cached", "teacher forward only"]
    assert all(float(ms) > 0 for _, ms, _ in rows) and float(rows[0][2]) == 1.0
