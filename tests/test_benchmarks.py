"""`python -m benchmarks --smoke` runs every benchmark at toy size, so they cannot rot; the
tables are checked for numbers, not for speed."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from tests.helpers.recipes import REPO

TITLES = ("1. Training throughput", "2. Packing fill", "3. Data loader", "4. VIRAL", "5. Checkpoint", "6. GPU",
          "7. Memory plan", "8. Resume", "9. Convert memory")
NUMBER = re.compile(r"^-?[\d,]*\.?\d+(e[-+]?\d+)?$")


def tables(markdown: str) -> dict[str, list[list[str]]]:
    """Each `### title` table's body rows, as cells, by title."""
    found = {}
    for section in markdown.split("\n### ")[1:]:
        title, *lines = section.splitlines()
        found[title] = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:] if line.startswith("| ")]
    return found


def numeric(cell: str) -> float | None:
    return float(cell.replace(",", "")) if NUMBER.match(cell) else None


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    results = folder / "RESULTS.md"
    before = (REPO / "benchmarks" / "RESULTS.md").read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--results", str(results), "--scratch", str(folder)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (REPO / "benchmarks" / "RESULTS.md").read_bytes() == before  # only the file it was given
    assert [p.name for p in folder.iterdir()] == ["RESULTS.md"]  # its scratch folder is gone
    return proc.stdout, results.read_text()


def test_every_benchmark_prints_and_appends_a_table_of_numbers(smoke_run):
    stdout, written = smoke_run
    found = tables(written)
    assert [title[: len(prefix)] for title, prefix in zip(found, TITLES)] == list(TITLES)
    for title, rows in found.items():
        assert title in stdout
        assert rows, title
        for row in rows:
            if "not run" in row[0]:  # flash-attn's row without CUDA
                continue
            assert all(numeric(cell) is not None or cell == "—" for cell in row[1:]), (title, row)
            assert any(numeric(cell) is not None for cell in row[1:]), (title, row)


def test_results_entry_is_dated_and_names_machine_versions_and_commit(smoke_run):
    _, written = smoke_run
    assert re.search(r"^## \d{4}-\d\d-\d\d — `make bench` --smoke", written, re.M)
    for fact in ("cores", "GiB", "Python 3.", "torch ", "deepspeed ", "transformers ", "Commit ", "Load average"):
        assert fact in written, fact


def test_tables_hold_what_each_benchmark_promises(smoke_run):
    found = {title.split(" ")[0]: rows for title, rows in tables(smoke_run[1]).items()}
    arms = [row[0] for row in found["1."]]
    assert arms == ["mmscale, packed", "mmscale, packed, logits at every position", "mmscale, padded",
                    "mmscale, packed, one masked SDPA call per row", "transformers LLaVA, padded"]
    per_sample, row_mask = found["1."][0], found["1."][3]
    assert numeric(per_sample[5]) > numeric(row_mask[5])  # useful FLOPs: each sample's square vs the row's
    assert numeric(found["1."][-1][-1]) == 1.0 and numeric(found["1."][0][-1]) > 0
    assert all(0 < numeric(cell) <= 1 for row in found["2."] for cell in row[1:])
    wait = numeric(found["3."][-1][-1])
    assert 0 <= wait <= 1
    assert [row[0] for row in found["4."]] == ["baseline", "VIRAL online", "VIRAL cached", "teacher forward only"]
    assert len(found["5."]) == 4 and all(numeric(row[2]) > 0 for row in found["5."])
    kernels = {row[0].split(" ")[0]: row for row in found["6."]}
    assert numeric(kernels["SDPA"][1]) > 0
    if not torch.cuda.is_available():
        assert "not run: FlexAttention has no backward pass on CPU" in kernels["FlexAttention,"][0]
    # The memory plan against measured steps: a decoder and a cross-attention configuration.
    assert len(found["7."]) == 2 and all(abs(numeric(row[-1])) < 50 for row in found["7."])
    assert [row[0].split(":")[0] for row in found["8."]] == ["near the start", "near the start", "near the end"]
    assert all(numeric(row[1]) > 0 and numeric(row[2]) > 0 for row in found["8."])
    assert [row[0].split(" ")[0] for row in found["9."]] == ["--from", "--from", "--to", "--to", "--to"]
    assert all(numeric(row[1]) > 0 for row in found["9."])


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path; on a GPU `make gpu-check` runs it whole")
def test_gpu_check_runs_on_cpu_as_far_as_it_can_and_says_why_it_skips(tmp_path):
    """`make gpu-check` without a GPU: pip resolves the gpu extra from wheels alone (a dry run),
    and every stage either runs on CPU or names what it skipped and why."""
    report = tmp_path / "gpu-extra.json"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--only-binary=:all:",
                          "-c", "constraints.txt", "--report", str(report), "-e", ".[gpu]"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-2000:]
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--steps", "3", "--demo-steps", "4", "--install-report",
         str(report), "--results", str(results), "--scratch", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^## \d{4}-\d\d-\d\d — `make gpu-check`", results.read_text(), re.M)
    rows = {(row[0], row[1].split(":")[0]): row for row in tables(results.read_text())["GPU check (make gpu-check)"]}
    outcome = {key: row[2] for key, row in rows.items()}
    assert outcome[("environment", "kernel flash4 for training in bf16")].startswith("skipped: flash-attn 4 is not")
    assert "no backward pass on CPU" in outcome[("environment", "kernel flex for training in bf16")]
    install = rows[("install", "gpu extra (dry run")]
    assert install[2] == "ok" and "flash-attn-4" in install[1] and "py3-none-any" in install[3]
    assert outcome[("gpu tests", "pytest -m gpu")] == "ok" and "skipped: needs a CUDA GPU" in rows[
        ("gpu tests", "pytest -m gpu")][3]
    for kernel in ("flash2", "flash4", "torch_varlen"):
        assert "CUDA" in outcome[("kernels", kernel)] or "not installed" in outcome[("kernels", kernel)], kernel
    assert outcome[("kernels", "sdpa")] == "ok"
    assert re.match(r"out \S+, dq \S+, dk \S+, dv \S+", rows[("kernels", "sdpa")][3])
    assert outcome[("kernels", "flex")] == "ok" and "backward skipped" in rows[("kernels", "flex")][3]
    trained = [row for key, row in rows.items() if key[0] == "train 1B" and row[2] == "ok"]
    assert len(trained) == 1 and "tokens/s/GPU" in trained[0][3]  # SDPA, the one kernel that trains on CPU
    assert outcome[("train + convert", "mmscale train demo recipe, packed, 1 rank(s) over gloo")] == "ok"
    converted = rows[("train + convert", "mmscale convert --to hf of the 1-rank run (verified by transformers)")]
    assert converted[2] == "ok" and converted[3].startswith("verified on")
    assert outcome[("train + convert", "mmscale train demo recipe, packed, 2 rank(s) over gloo")].startswith(
        "skipped: the 2-rank NCCL run needs 2 GPUs")
