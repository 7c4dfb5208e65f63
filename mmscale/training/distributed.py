"""Process-group set-up under torchrun, the DeepSpeed launcher, srun (one task per GPU), or no launcher at all."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist

from mmscale.launch.rendezvous import slurm_task_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: int) -> tuple[int, int]:
    """Join (or, with no launcher, create) the process group; returns (rank, world_size).

    The rank comes from the launcher's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT
    (torchrun, the DeepSpeed launcher), else from SLURM's task variables in a multi-task srun
    step (see `slurm_task_env`), else the process is a world of one. Every collective gets
    `timeout_s`, so a dead rank ends the job instead of hanging it.
    """
    if "RANK" not in os.environ:
        slurm = slurm_task_env()
        if slurm is not None:
            os.environ.update(slurm)
        else:  # a plain `mmscale train`: a world of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        # With one task per GPU SLURM may bind each task to its own GPU (--gpus-per-task=1),
        # which the task then sees as device 0 whatever its local rank.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    # A barrier first: a rank leaving while its peer still talks to it can abort the peer at
    # exit ("terminate called without an active exception"), seen about once in 60 CPU runs.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
