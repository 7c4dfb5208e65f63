"""9. Convert memory: peak host memory of `mmscale convert` on a ~1B decoder VLM, against its fp32 weights.

A LLaVA folder of benchmark 6's 0.97B model (random weights, fp32 and bf16 copies) is imported
with `mmscale convert --from hf FOLDER --to mmscale OUT` and released again with `mmscale convert
OUT --to hf RELEASE` (fp32 and bf16), each a process of its own whose peak resident memory
(VmHWM) is read as it exits. The export verifies the release by running the mmscale
model and then the reloaded folder on the same probe; the row "both models resident" is the
export as it ran before the verification let the mmscale model go first (`export_hf` with
`release_source=False`, what tests use to inspect the model afterwards). --smoke: the toy model.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import DEMO_RECIPE, REPO, Context
from benchmarks.gpu import GPU_MODEL, IMAGE_ID, TOY_MODEL
from benchmarks.report import Table
from mmscale.config import load_recipe

# The export as it was: the mmscale model kept while the release is reloaded and verified.
BOTH_RESIDENT = (
    "import sys; from pathlib import Path; from mmscale.convert.export import export_hf; "
    "from mmscale.convert.mmscale_folder import from_mmscale_folder; "
    "export_hf(from_mmscale_folder(Path(sys.argv[1])), Path(sys.argv[2]), sys.argv[3], release_source=False)"
)


def run(ctx: Context) -> list[Table]:
    recipe = load_recipe(DEMO_RECIPE, TOY_MODEL if ctx.smoke else GPU_MODEL)
    hf, params = write_llava_folder(recipe, ctx.scratch / "convert" / "llava")
    weights_gb = params * 4 / 1e9
    table = Table(f"9. Convert memory: peak host memory of mmscale convert, {params / 1e9:.2f}B parameters",
                  ["command", "peak RSS GB", "x fp32 weights", "above start-up, x fp32 weights", "seconds"])
    start_up, _ = peak_rss(["-c", "import mmscale.convert.export, mmscale.convert.mmscale_folder"])
    work = ctx.scratch / "convert"
    mmscale = ["-m", "mmscale", "convert"]
    steps = [
        ("--from hf (fp32 folder) --to mmscale", [*mmscale, "--from", "hf", hf / "fp32", "--to", "mmscale",
                                                  work / "mmscale"]),
        ("--from hf (bf16 folder) --to mmscale", [*mmscale, "--from", "hf", hf / "bf16", "--to", "mmscale",
                                                  work / "mmscale-bf16"]),
        *((f"--to hf --dtype {dtype}", [*mmscale, work / "mmscale", "--to", "hf", work / f"release-{dtype}",
                                        "--dtype", dtype]) for dtype in ("fp32", "bf16")),
        ("--to hf --dtype fp32, both models resident (before)",
         ["-c", BOTH_RESIDENT, work / "mmscale", work / "release-before", "fp32"]),
    ]
    for name, command in steps:
        peak, seconds = peak_rss(command)
        table.rows.append([name, peak / 1e9, peak / 1e9 / weights_gb, (peak - start_up) / 1e9 / weights_gb, seconds])
    table.notes += [
        f"fp32 weights: {weights_gb:.2f} GB. Peak RSS: the process's VmHWM; start-up (Python, torch, "
        f"transformers, mmscale's converters imported, no weight read) is {start_up / 1e9:.2f} GB. Each command "
        "in a process of its own, one after the other, on the same disk.",
    ]
    return [table]


def write_llava_folder(recipe, folder: Path) -> tuple[Path, int]:
    """`recipe`'s decoder VLM as LLaVA folders in fp32 and bf16 (random N(0, 0.02) weights); their
    parent folder and the parameter count."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from mmscale.models.hf import LLAVA

    vocab = recipe.model.llm.vocab_size
    config = LlavaConfig.from_dict(LLAVA.config_to_hf(recipe.model, vocab, IMAGE_ID, {}))
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02, generator=generator)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder / "fp32")
    model.to(torch.bfloat16).save_pretrained(folder / "bf16")
    return folder, params


# Runs `python -m MODULE ARGS` or `python -c CODE ARGS` and writes the process's peak resident
# memory (VmHWM) to FILE as it exits. Not getrusage's maxrss: Linux keeps that across exec, so a
# child would inherit the benchmark process's own peak (it forks from it), gigabytes here.
PEAK_WRAPPER = """
import atexit, runpy, sys
out, kind, target = sys.argv[1:4]
def report():
    with open('/proc/self/status') as status:
        open(out, 'w').write(next(line.split()[1] for line in status if line.startswith('VmHWM:')))
atexit.register(report)
sys.argv = [target, *sys.argv[4:]]
if kind == '-m':
    runpy.run_module(target, run_name='__main__', alter_sys=True)
else:
    exec(compile(target, '<code>', 'exec'), {'__name__': '__main__'})
"""


def peak_rss(command: list[str]) -> tuple[int, float]:
    """Peak resident bytes of `python -m MODULE ...` or `python -c CODE ...` (`command` without the
    interpreter), and its wall time; it must succeed."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        peak = Path(folder) / "vmhwm"
        proc = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, str(peak), *map(str, command)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(map(str, command))} failed: {proc.stderr[-2000:]}")
        return int(peak.read_text()) * 1024, time.perf_counter() - start  # VmHWM is in kB
