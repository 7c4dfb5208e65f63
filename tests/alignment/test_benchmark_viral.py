"""benchmarks/viral.py at toy size, in this process: a row per variant, and the cached variant
never runs the teacher (the benchmark raises if it does). Its numbers are checked for
presence, not speed; tests/test_benchmarks.py runs it again with all the others."""

from __future__ import annotations

from benchmarks import viral
from benchmarks.common import Context


def test_viral_benchmark_gives_a_row_per_variant(tmp_path):
    (table,) = viral.run(Context(smoke=True, scratch=tmp_path, mix_samples=0))
    assert [row[0] for row in table.rows] == ["baseline", "VIRAL online", "VIRAL cached", "teacher forward only"]
    assert all(ms > 0 for _, ms, _ in table.rows) and table.rows[0][2] == 1.0
