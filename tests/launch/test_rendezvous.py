"""Rendezvous from SLURM's variables (no cluster needed): the first host, the port, a task's rank."""

from __future__ import annotations

import pytest

from mmscale.errors import UserError
from mmscale.launch.rendezvous import PORT_BASE, PORT_SPAN, first_host, rendezvous_port, slurm_task_env


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("node7", "node7"),
        ("node[1-2]", "node1"),
        ("gpu-a[07-09,12],gpu-b1", "gpu-a07"),
        ("gpu-a[12,07-09]", "gpu-a12"),  # SLURM's order, not the smallest number
        ("rack[2-3]-n[05-06]", "rack2-n05"),
        ("h100-001,h100-002", "h100-001"),
        ("node[1-2]-ib", "node1-ib"),
    ],
)
def test_first_host_reads_slurm_node_lists(nodelist, host):
    assert first_host(nodelist) == host


def test_first_host_refuses_an_empty_list():
    with pytest.raises(ValueError, match="node list"):
        first_host(",node1")


def test_port_follows_the_job_id_and_stays_below_the_ephemeral_range():
    assert rendezvous_port("123") == rendezvous_port(123) == PORT_BASE + 123
    assert rendezvous_port(PORT_SPAN + 123) == rendezvous_port(123)  # wraps around
    assert rendezvous_port(123) != rendezvous_port(124)
    assert all(PORT_BASE <= rendezvous_port(j) < 32768 for j in (0, 1, 14999, 10**9 + 7))


def _step(**extra: str) -> dict[str, str]:
    """A task's variables in a 2-node x 4-task srun step of job 4242."""
    return {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8",
            "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[03-04]", **extra}


def test_a_task_of_a_multi_task_step_gets_its_rank_and_the_rendezvous():
    assert slurm_task_env(_step()) == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu03", "MASTER_PORT": str(PORT_BASE + 4242)}


def test_the_step_node_list_and_exported_rendezvous_win():
    env = slurm_task_env(_step(SLURM_STEP_NODELIST="gpu[04-05]"))
    assert env["MASTER_ADDR"] == "gpu04"
    env = slurm_task_env(_step(MASTER_ADDR="login", MASTER_PORT="29400"))
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("login", "29400")


def test_no_slurm_or_a_single_task_is_a_world_of_one():
    assert slurm_task_env({}) is None
    assert slurm_task_env(_step(SLURM_STEP_NUM_TASKS="1", SLURM_NTASKS="1")) is None
    assert slurm_task_env({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None  # a batch script of one task


def test_a_batch_script_of_several_tasks_outside_srun_is_refused():
    batch = {k: v for k, v in _step().items() if not k.startswith("SLURM_STEP")}
    with pytest.raises(UserError, match="outside srun"):
        slurm_task_env(batch)
