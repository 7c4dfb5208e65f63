"""Checkpoint files on the local two-node cluster: each node's rank makes the files it wrote durable."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from mmscale.training.checkpoint import checkpoint_dir
from tests.helpers.checkpoints import SYNCING
from tests.helpers.recipes import REPO

pytestmark = pytest.mark.slurm

# SYNCING (one save of 2 ranks, each printing the files it fsynced), saying which node ran it.
ON_A_NODE = "import os; print('NODE', os.environ['SLURMD_NODENAME'], flush=True)\n" + SYNCING


@pytest.mark.parametrize("stage", [2, 3])
def test_each_node_syncs_the_checkpoint_files_its_rank_wrote(slurm_cluster, job_env, tmp_path, stage):
    """One task per node (srun), each a rank that finds its peers from SLURM's variables: node2's
    rank fsyncs its own ZeRO partitions and nothing of node1's, node1's rank the rest."""
    command = ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--label", "--time=5",
               job_env["MMSCALE_PYTHON"], "-c", ON_A_NODE, str(tmp_path), str(stage)]
    proc = subprocess.run(command, cwd=REPO, env={**job_env, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    nodes = {int(line.split(":")[0]): line.split("NODE ")[1] for line in lines if "NODE " in line}
    synced = {int(line.split(":")[0]): {Path(p).name for p in json.loads(line.split("SYNCED ", 1)[1])}
              for line in lines if "SYNCED " in line}
    assert nodes == {0: "node1", 1: "node2"}
    written = {p.name for p in (checkpoint_dir(tmp_path) / "step_0000001").iterdir()}
    mine = {rank: {n for n in written if f"zero_pp_rank_{rank}_" in n} for rank in (0, 1)}
    assert mine[0] and mine[1]
    assert mine[1] <= synced[1] and not mine[0] & synced[1]
    assert written - mine[1] <= synced[0] and not mine[1] & synced[0]  # the marker and rank 0's files
