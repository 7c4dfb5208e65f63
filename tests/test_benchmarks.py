"""Benchmarks run at toy size so they cannot rot; their numbers are checked for presence, not speed."""

import re
import subprocess
import sys

from tests.conftest import REPO


def test_data_loader_benchmark_prints_a_table_of_numbers():
    proc = subprocess.run([sys.executable, "benchmarks/data_loader.py", "--samples", "48", "--image-size", "70"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = re.findall(r"^\| (padded|packed)[^|]*\| (\d+) \| ([\d.]+) \|", proc.stdout, re.M)
    assert [r[0] for r in rows] == ["padded", "packed"]
    assert all(int(rate) > 0 and 0 < float(fill) <= 1 for _, rate, fill in rows)
    assert re.search(r"padded \(micro-batch 8\) fill 0\.\d+, packed .* fill 0\.\d+", proc.stdout)
