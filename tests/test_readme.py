"""The README contract: exactly two set-up-and-go commands, and both work."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from tests.helpers.recipes import REPO


def readme_commands() -> list[str]:
    """The commands of the first bash block under '## Set up and go', comments stripped."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Set up and go", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_readme_has_exactly_two_commands_and_ci_runs_the_second():
    commands = readme_commands()
    assert commands == ["make demo", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(rf"^{re.escape(commands[1])}$", ci, re.M), ".ci/run must call the README's test command"


@pytest.mark.slow
def test_readme_demo_command_runs_from_a_copy_of_the_repo(tmp_path):
    """Run `make demo` in a copy of the tracked tree, at toy size, reusing this checkout's venv."""
    copy = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)  # keeps mtimes, so make sees the venv as up to date
    os.symlink(REPO / ".venv", copy / ".venv")
    # The venv is this checkout's: make must never reinstall it from the copy (an editable
    # install would point the checkout's venv at this temporary folder, and break it when the
    # folder goes). So the copy's install inputs get a time a second before the venv's stamp
    # (in nanoseconds: a float time can round past it, and make then reinstalls).
    before = (REPO / ".venv" / ".installed").stat().st_mtime_ns - 10**9
    for name in ("pyproject.toml", "constraints.txt"):
        os.utime(copy / name, ns=(before, before))
    env = dict(
        os.environ,
        DEMO_DATA_ARGS="--train-samples 96 --val-samples 32 --eval-samples 16",
        ARGS="train.steps=4 train.warmup_steps=1 train.val_batches=1 train.micro_batch_size=4 data.num_workers=1",
    )
    command = readme_commands()[0]
    proc = subprocess.run(command, shell=True, cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = copy / "runs" / "demo"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in losses)
    assert (copy / "data" / "demo" / "manifest.json").is_file()
