"""Process-group set-up under torchrun, the DeepSpeed launcher, or no launcher at all."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist

from mmscale.errors import UserError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: int) -> tuple[int, int]:
    """Join (or, with no launcher, create) the process group; returns (rank, world_size).

    Every collective gets `timeout_s`, so a dead rank ends the job instead of hanging it.
    """
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        # Each srun task would otherwise become its own world of one, all writing one run dir.
        raise UserError(
            "several SLURM tasks but no RANK/WORLD_SIZE: run one `torchrun` per node under srun "
            "(see slurm/README.md) rather than `mmscale train` in every task"
        )
    if "RANK" not in os.environ:  # a plain `mmscale train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    # A barrier first: a rank leaving while its peer still talks to it can abort the peer at
    # exit ("terminate called without an active exception"), seen about once in 60 CPU runs.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
