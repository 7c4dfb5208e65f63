"""The benchmarks' one entry (`make bench`, `python -m benchmarks`): run them, print a table
each, and append the tables, dated, to a results file.

    python -m benchmarks [--smoke] [--only throughput fill ...] [--results benchmarks/RESULTS.md]

--smoke runs everything at toy size in well under a minute (the tests do, so the benchmarks
cannot rot); its numbers say that the code runs, not how fast. Without --results nothing is
written; `make bench` passes benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, Context
from benchmarks.report import Table, append, header

# In the order of issue 9: module name -> what it measures.
BENCHMARKS = {
    "throughput": "training throughput, mmscale packed vs transformers LLaVA padded",
    "fill": "packing fill, padded vs packed, on the LLaVA-665K-like length mix",
    "data_loader": "data loader samples/s/core, and the share of step time waiting for data",
    "viral": "VIRAL step time: baseline, online teacher, cached features",
    "checkpoint": "checkpoint save/load time against dd's sequential write/read bandwidth",
    "gpu": "MFU of a ~1B decoder VLM with each attention kernel (CPU: a toy-size smoke run)",
    "memory": "the memory plan (mmscale plan) against two measured DeepSpeed steps per rank",
    "resume": "restoring a reader's position near a long stream's start and end: seeking vs reading again",
    "convert_memory": "peak host memory of mmscale convert (import and verified export) of a ~1B decoder VLM",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes: checks that everything runs")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run these benchmarks alone")
    parser.add_argument("--results", type=Path, help="append the tables to this Markdown file (benchmarks/RESULTS.md)")
    parser.add_argument("--scratch", type=Path, default=REPO / "runs",
                        help="folder for the temporary shards, checkpoints and dd files; its disk is the one measured")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    tables: list[Table] = []
    args.scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-", dir=args.scratch) as scratch:
        ctx = Context(smoke=args.smoke, scratch=Path(scratch), mix_samples=128 if args.smoke else 1024)
        for name in args.only or BENCHMARKS:
            print(f"\n[{name}] {BENCHMARKS[name]} ...", flush=True)
            start = time.perf_counter()
            for table in importlib.import_module(f"benchmarks.{name}").run(ctx):
                print(table.markdown(), flush=True)
                tables.append(table)
            print(f"[{name}] {time.perf_counter() - start:.0f} s", flush=True)
    title = "`make bench`" + (" --smoke (toy sizes: the numbers say it runs, not how fast)" if args.smoke else "")
    entry = "\n\n".join([header(title, load_before, os.getloadavg()[0]), *(t.markdown() for t in tables)])
    if args.results:
        append(args.results, entry)
        print(f"\nappended to {args.results}")
