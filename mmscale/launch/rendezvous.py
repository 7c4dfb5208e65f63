"""Where the ranks of a SLURM job meet, read from SLURM's own variables.

Every launcher of mmscale agrees on these, so that any node of a job computes the same answer
without talking to the others: the rendezvous host is the first host of the job's node list
and the port is derived from the job id (a requeued job keeps its id, hence its port; two jobs
sharing a first node get different ports unless their ids differ by a multiple of PORT_SPAN).
slurm/train.sbatch computes the same in bash, with `scontrol show hostnames`.
"""

from __future__ import annotations

import os
import re

from mmscale.errors import UserError

PORT_BASE = 15000
# Ports 15000-29999: below Linux's ephemeral range (32768+), where the kernel picks client ports.
PORT_SPAN = 15000

# The first item of a node list: commas inside brackets ("gpu[01-03,07]") do not end it.
_FIRST_ITEM = re.compile(r"[^,\[]*(?:\[[^\]]*\][^,\[]*)*")
# A bracket group, whose first element (up to "-" or ",") names the first host.
_BRACKETS = re.compile(r"\[([^\]\-,]+)[^\]]*\]")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "node[1-2]" -> "node1", "gpu-a[07-09,12],gpu-b1" ->
    "gpu-a07", "rack[2-3]-n[5-6]" -> "rack2-n5" (zero padding kept, as SLURM names hosts)."""
    item = _FIRST_ITEM.match(nodelist.strip()).group(0)
    if not item:
        raise ValueError(f"cannot read a host from the SLURM node list {nodelist!r}")
    return _BRACKETS.sub(r"\1", item)


def rendezvous_port(job_id: str | int) -> int:
    """The rendezvous port of SLURM job `job_id` (array tasks have job ids of their own)."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def slurm_task_env(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for one task of a multi-task srun
    step ("one task per GPU": `srun --ntasks-per-node=8 mmscale train ...`), or None outside one.

    MASTER_ADDR and MASTER_PORT already in the environment win over the derived ones. Raises
    UserError in a batch script of several tasks outside srun, where each `mmscale train`
    would become a world of one writing the same run directory.
    """
    env = os.environ if environ is None else environ
    in_step = "SLURM_STEP_ID" in env and "SLURM_STEP_NUM_TASKS" in env
    if not in_step:
        if int(env.get("SLURM_NTASKS", "1")) > 1:
            raise UserError(
                "this job has several SLURM tasks, but `mmscale train` runs in the batch script, outside srun: "
                "start it with srun (one task per GPU) or run one torchrun per node under srun (slurm/train.sbatch)"
            )
        return None
    if int(env["SLURM_STEP_NUM_TASKS"]) == 1:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": env["SLURM_LOCALID"],
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
        "MASTER_PORT": env.get("MASTER_PORT") or str(rendezvous_port(env["SLURM_JOB_ID"])),
    }
