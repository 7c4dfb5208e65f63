"""pip refuses to install mmscale where it cannot run: an older Python, an older DeepSpeed.

The package is built into a wheel and handed to pip's real resolver, offline (--no-index:
the other requirements are met by this environment's installed packages)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.recipes import REPO

MIN_PYTHON = "3.11"  # typing.Self (training/signals.py, launch/submit.py)
# fp32 summing of bf16 gradients under ZeRO-2 and skipping non-finite steps under ZeRO-3 (see pyproject.toml).
MIN_DEEPSPEED = "0.19.8"


def _pip(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}  # no site find-links
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the sources: building in place would leave build/ and *.egg-info in the checkout.
    source = out / "source"
    source.mkdir()
    shutil.copytree(REPO / "mmscale", source / "mmscale", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    proc = _pip("wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), str(source))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = out.glob("mmscale-*.whl")
    return built


def test_the_wheel_installs_here(wheel):
    proc = _pip("install", "--dry-run", "--no-index", str(wheel))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Would install mmscale-" in proc.stdout


def test_pip_refuses_a_python_older_than_the_code_needs(wheel):
    older = f"3.{int(MIN_PYTHON.split('.')[1]) - 1}"
    proc = _pip("install", "--dry-run", "--no-deps", "--no-index", "--only-binary=:all:", "--python-version", older,
                str(wheel))
    assert proc.returncode != 0
    assert f"requires a different Python: {older}.0 not in '>={MIN_PYTHON}'" in proc.stderr


def test_pip_refuses_a_deepspeed_older_than_the_code_needs(wheel, tmp_path):
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(f"deepspeed<{MIN_DEEPSPEED}\n")  # a cluster pinned to an older DeepSpeed
    proc = _pip("install", "--dry-run", "--no-index", "-c", str(constraints), str(wheel))
    assert proc.returncode != 0
    assert f"depends on deepspeed>={MIN_DEEPSPEED}" in proc.stdout + proc.stderr
