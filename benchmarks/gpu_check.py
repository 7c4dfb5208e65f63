"""`make gpu-check`: does this machine train mmscale on its GPU, and how fast? One table.

    python -m benchmarks.gpu_check [--steps 40] [--install-report FILE] [--results benchmarks/RESULTS.md]

`make gpu-check` first installs the gpu extra from wheels alone (`pip install --only-binary=:all:`:
a package that would compile fails the install rather than building for half an hour; without a
GPU, pip resolves the same install as a dry run) and hands pip's report to --install-report.
Then, one row each:
1. environment: the GPUs, versions, and each attention kernel: ready, or why not;
2. install: the gpu extra's packages and their wheel tags (no source build among them);
3. the tests marked `gpu` (pytest -m gpu);
4. each attention kernel's forward and backward on packed bf16 rows of several samples against
   the fp32 reference (the dense block-diagonal mask): the largest error relative to the largest
   reference value, of the output and of the q, k and v gradients;
5. the ~1B decoder VLM of benchmark 6 trained --steps steps on packed rows with each kernel:
   tokens/s, MFU, peak memory (benchmarks.gpu);
6. `mmscale train` of the demo recipe on packed rows (bf16 on CUDA) and `mmscale convert --to hf`
   of its checkpoint, which loads the export with transformers and checks it against the run;
7. the same training on 2 ranks over NCCL when the machine has two GPUs.
Without CUDA each stage runs as far as the CPU allows and says what it skipped and why: the
kernel check runs SDPA and FlexAttention's forward (CPU has no FlexAttention backward), stage 5
the toy model in fp32, stage 6 one process over gloo in fp32.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import DEMO_RECIPE, REPO
from benchmarks.report import Table, append, cell, header
from mmscale.models import attention

STAGE_TIMEOUT_S = 300  # a child process (pytest, mmscale train, convert) that runs longer has hung
PASS_ERROR = 2e-2  # bf16 keeps 8 bits of mantissa: errors of a few 1e-3 relative are rounding
ROW_SAMPLES = (700, 1500, 300, 1200)  # tokens of the samples packed in a row (LLaVA-like spread)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed training steps of the ~1B model per kernel")
    parser.add_argument("--demo-steps", type=int, default=30, help="steps of the demo recipe's mmscale train")
    parser.add_argument("--install-report", type=Path,
                        help="pip's --report of the gpu extra's install (make gpu-check writes it)")
    parser.add_argument("--results", type=Path, help="append the table to this Markdown file (benchmarks/RESULTS.md)")
    parser.add_argument("--scratch", type=Path, default=REPO / "runs", help="folder for the demo shards and run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    table = Table("GPU check (make gpu-check)", ["stage", "what", "outcome", "numbers", "stage s"])
    args.scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=args.scratch) as scratch:
        for stage in (environment, lambda: install(args.install_report), gpu_tests, kernel_accuracy,
                      lambda: kernel_training(args.steps), lambda: train_and_convert(Path(scratch), args.demo_steps)):
            start = time.perf_counter()
            rows = [[*row[:3], " ".join(str(row[3]).split()), None] for row in stage()]  # one line per cell
            rows[0][-1] = round(time.perf_counter() - start, 1)
            for row in rows:
                print(" | ".join(cell(value) for value in row), flush=True)
            table.rows += rows
    failed = [row for row in table.rows if row[2].startswith("FAILED")]
    table.notes += [
        f"{sum(row[2] == 'ok' for row in table.rows)} ok, {len(failed)} failed, "
        f"{sum(row[2].startswith('skipped') for row in table.rows)} skipped (each with its reason). Kernel errors: "
        f"the largest |bf16 - fp32| over the largest |fp32| value, of the output and the q/k/v gradients; "
        f"above {PASS_ERROR:g} fails. Stage s: each stage's wall clock, first calls (compilation) included.",
    ]
    entry = "\n\n".join([header("`make gpu-check`", load_before, os.getloadavg()[0]), table.markdown()])
    print("\n" + table.markdown(), flush=True)
    if args.results:
        append(args.results, entry)
        print(f"\nappended to {args.results}")
    return 1 if failed else 0


def gpu() -> str:
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    props = torch.cuda.get_device_properties(0)
    return (f"{torch.cuda.device_count()} x {props.name} (compute capability {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB)")


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> list[list]:
    cuda = torch.version.cuda or "none (CPU build)"
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "—"
    packages = ", ".join(f"{p} {version(p) or 'absent'}" for p in ("deepspeed", "transformers", "flash-attn",
                                                                    "flash-attn-4", "nvidia-cutlass-dsl"))
    rows = [["environment", f"{gpu()}; torch {torch.__version__}, CUDA {cuda}, NCCL {nccl}; {packages}", "ok", ""]]
    device, head = ("cuda" if torch.cuda.is_available() else "cpu"), [128]
    for kernel in attention.KERNELS[1:]:
        why = attention.unavailable(kernel, device, torch.bfloat16, head)
        rows.append(["environment", f"kernel {kernel} for training in bf16", f"skipped: {why}" if why else "ok", ""])
    return rows


def install(report: Path | None) -> list[list]:
    """What pip installed (or, without a GPU, would install) for the gpu extra, from its --report."""
    if report is None or not report.exists():
        return [["install", "gpu extra", "skipped: no pip report (make gpu-check writes one)", ""]]
    planned = json.loads(report.read_text())["install"]
    files = {item["metadata"]["name"]: item["download_info"]["url"].rsplit("/", 1)[-1] for item in planned
             if item["metadata"]["name"] != "mmscale"}
    if not files:
        return [["install", "gpu extra", "ok", f"already installed (flash-attn-4 {version('flash-attn-4')}): "
                 "pip had nothing to install; the first install's report lists the wheels"]]
    built = [name for name, file in files.items() if not file.endswith(".whl")]
    wheels = [file.removesuffix(".whl") for file in files.values() if file.endswith(".whl")]
    tags = sorted({"-".join(wheel.split("-")[-3:]) for wheel in wheels})  # python-abi-platform
    dry = " (dry run: no GPU here)" if not torch.cuda.is_available() else ""
    what = f"gpu extra{dry}: {len(files)} packages ({', '.join(sorted(files))})"
    outcome = f"FAILED: built from source: {', '.join(built)}" if built else "ok"
    return [["install", what, outcome, f"all wheels; tags {', '.join(tags)}" if not built else ""]]


def gpu_tests() -> list[list]:
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs"],
                              cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=STAGE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return [["gpu tests", "pytest -m gpu", f"FAILED: still running after {STAGE_TIMEOUT_S} s", ""]]
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    reasons = sorted(set(re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", proc.stdout)))
    outcome = "ok" if proc.returncode == 0 else f"FAILED (pytest exit {proc.returncode})"
    return [["gpu tests", "pytest -m gpu", outcome, summary + (f" (skipped: {'; '.join(reasons)})" if reasons else "")]]


def packed_rows(scale: int, device: str) -> torch.Tensor:
    """Two rows of segment ids: the samples of ROW_SAMPLES (divided by `scale`), and the same
    samples' first and last with the rest of the row padding."""
    lengths = [n // scale for n in ROW_SAMPLES]
    first = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)])
    second = torch.zeros_like(first)
    second[: lengths[0]] = 1
    second[lengths[0] : lengths[0] + lengths[-1]] = 2
    return torch.stack([first, second]).to(device)


def kernel_accuracy() -> list[list]:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    segments = packed_rows(1 if cuda else 8, device)
    heads, kv_heads, dim = (16, 8, 128) if cuda else (4, 2, 64)
    generator = torch.Generator(device).manual_seed(0)
    q32, k32, v32, weights = (torch.randn(2, h, segments.shape[1], dim, device=device, generator=generator)
                              for h in (heads, kv_heads, kv_heads, heads))
    layout = attention.pack_layout(segments)
    reference = gradients(lambda q, k, v: attention.masked_attention(q, k, v, layout.mask), q32, k32, v32, weights)
    rows = []
    for kernel in attention.KERNELS[1:]:
        what = f"{kernel}: {segments.shape[1]}-token packed rows, {heads}/{kv_heads} heads of {dim}, bf16 vs fp32"
        backward = attention.unavailable(kernel, device, torch.bfloat16, [dim]) is None
        why = attention.unavailable(kernel, device, torch.bfloat16, [dim], backward=False)
        if why:
            rows.append(["kernels", what, f"skipped: {why}", ""])
            continue
        q, k, v = (t.bfloat16() for t in (q32, k32, v32))
        def run(q, k, v, kernel=kernel):
            return attention.attention(q, k, v, True, attention.pack_layout(segments), kernel=kernel)

        ours = gradients(run, q, k, v, weights) if backward else [run(q, k, v).detach()]
        errors = [float((a.float() - b).abs().max() / b.abs().max()) for a, b in zip(ours, reference)]
        outcome = "ok" if max(errors) <= PASS_ERROR else "FAILED: error above the limit"
        numbers = "out {:.1e}".format(errors[0]) + (", dq {:.1e}, dk {:.1e}, dv {:.1e}".format(*errors[1:]) if backward
                                                      else "; backward skipped: " + attention.unavailable(
                                                          kernel, device, torch.bfloat16, [dim]))
        rows.append(["kernels", what, outcome, numbers])
    return rows


def gradients(run, q, k, v, weights) -> list[torch.Tensor]:
    """[output, dq, dk, dv] of run(q, k, v) under a fixed random weighting of the output."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = run(q, k, v)
    grads = torch.autograd.grad((out.float() * weights).sum(), (q, k, v))
    return [out.detach(), *grads]


def kernel_training(steps: int) -> list[list]:
    from benchmarks.gpu import kernel_table

    full = torch.cuda.is_available()
    table = kernel_table(full=full, steps=steps)
    gc.collect()  # the 1B engine is gone: its GPU memory goes back before stage 6 trains
    if full:
        torch.cuda.empty_cache()
    size = "~1B decoder VLM in bf16" if full else "toy decoder VLM in fp32 (no CUDA: the ~1B run needs a GPU)"
    rows = []
    for name, tokens, _tflops, mfu, memory, _step in table.rows:
        kernel, _, why = name.partition(" (not run: ")
        if why:
            rows.append(["train 1B", f"{kernel}: {size}", f"skipped: {why[:-1]}", ""])
        else:
            numbers = f"{tokens:,.0f} tokens/s/GPU, MFU {cell(mfu)}, peak {memory:.1f} GB"
            rows.append(["train 1B", f"{kernel}: {size}, {steps} steps on packed rows", "ok", numbers])
    return rows


def child_env() -> dict[str, str]:
    """This environment without the world of one that stage 5 made here (a child starts its own)."""
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in launcher}


def mmscale(*args: str, ranks: int = 1) -> subprocess.CompletedProcess:
    """`mmscale ARGS` in a child process (under torchrun for several ranks); a hung one is a
    failure after STAGE_TIMEOUT_S, not a check that never ends."""
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc-per-node={ranks}"]
    command = [*launcher, "-m", "mmscale", *map(str, args)]
    try:
        return subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True,
                              timeout=STAGE_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(command, 124, "", f"still running after {STAGE_TIMEOUT_S} s: {e}")


def train_and_convert(scratch: Path, steps: int) -> list[list]:
    data = scratch / "demo"
    built = mmscale("shards", "demo", "--out", data, "--train-samples", "1024", "--val-samples", "64",
                    "--eval-samples", "64")
    if built.returncode:
        return [["train + convert", "mmscale shards demo", "FAILED", built.stderr[-300:]]]
    rows = []
    gpus = torch.cuda.device_count()
    for ranks in (1, 2):
        what = f"mmscale train demo recipe, packed, {ranks} rank(s) over {'NCCL' if gpus else 'gloo'}"
        if ranks == 2 and gpus < 2:
            rows.append(["train + convert", what, f"skipped: the 2-rank NCCL run needs 2 GPUs, this machine has {gpus} "
                         "(the CPU test suite trains on 2 gloo ranks)", ""])
            continue
        run = scratch / f"run-{ranks}"
        proc = mmscale("train", DEMO_RECIPE, f"run.dir={run}", f"data.train={data}/train", f"data.val={data}/val",
                       f"data.eval={data}/eval", f"data.tokenizer={data}/tokenizer", "data.pack=true",
                       f"train.steps={steps}", f"train.warmup_steps={steps // 4}",
                       f"train.log_every={max(1, steps // 5)}", "train.val_every=0", "train.eval_every=0",
                       f"train.checkpoint_every={steps}", ranks=ranks)
        if proc.returncode:
            rows.append(["train + convert", what, f"FAILED (exit {proc.returncode})", proc.stderr[-300:]])
            continue
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses = [m["loss"] for m in metrics if m.get("loss") is not None]
        last = [m for m in metrics if m.get("tokens_per_s")][-1]
        rows.append(["train + convert", what, "ok", f"loss {losses[0]:.2f} -> {losses[-1]:.2f}, "
                     f"{last['tokens_per_s']:,.0f} tokens/s, peak {last.get('peak_mem_gb') or 0:.1f} GB"])
        converted = mmscale("convert", run, "--to", "hf", scratch / f"hf-{ranks}")
        verdict = [line for line in converted.stdout.splitlines() if line.startswith("verified")]
        rows.append(["train + convert", f"mmscale convert --to hf of the {ranks}-rank run (verified by transformers)",
                     "ok" if converted.returncode == 0 else f"FAILED (exit {converted.returncode})",
                     verdict[0] if verdict else converted.stderr[-300:]])
    return rows


if __name__ == "__main__":
    sys.exit(main())
