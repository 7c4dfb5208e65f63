"""The local SLURM cluster for the tests marked `slurm`, and a reference job on it (the helpers that
submit and watch jobs: tests/helpers/slurm.py).

`slurm_cluster` starts slurm/local-cluster/start.sh once per session (it installs the Debian
packages first if it can) and stops the cluster at the end, unless it was running before.
Every job trains the tiny demo recipe on 2 nodes x 1 rank with ZeRO-2 over gloo.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.helpers.recipes import REPO
from tests.helpers.slurm import job_overrides, make_job_env, sbatch, wait_until_ended

CLUSTER = REPO / "slurm" / "local-cluster"


def _cluster_running() -> bool:
    try:
        return subprocess.run(["scontrol", "ping"], check=False, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (slurm/local-cluster/start.sh)")
    was_running = _cluster_running()
    started = subprocess.run(["bash", str(CLUSTER / "start.sh")], check=False, capture_output=True, text=True,
                             timeout=600)
    if started.returncode:
        if "not installed" in started.stderr:  # install.sh said why on stderr
            pytest.skip(f"slurmctld is not installable here: {started.stderr.strip()[-400:]}")
        pytest.fail(f"slurm/local-cluster/start.sh failed:\n{started.stdout[-2000:]}\n{started.stderr[-2000:]}")
    yield
    if not was_running:
        subprocess.run(["bash", str(CLUSTER / "stop.sh")], check=False, capture_output=True, timeout=120)


@pytest.fixture
def job_env(tmp_path) -> dict[str, str]:
    return make_job_env(tmp_path)


class FinishedJob(NamedTuple):
    job_id: str
    state: str
    run_dir: Path
    log: Path


@pytest.fixture(scope="session")
def reference_run(slurm_cluster, demo_data, tmp_path_factory) -> FinishedJob:
    """The demo trained by slurm/train.sbatch on 2 nodes, uninterrupted: what resumed runs must repeat."""
    base = tmp_path_factory.mktemp("reference")
    job_id, log = sbatch(job_overrides(demo_data, base / "run"), make_job_env(base), base / "logs")
    return FinishedJob(job_id, wait_until_ended(job_id), base / "run", log)
