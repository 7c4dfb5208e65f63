"""Process-group set-up under torchrun, the DeepSpeed launcher, srun (one task per GPU), or no launcher at all."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import groups as deepspeed_groups

from mmscale.errors import UserError
from mmscale.launch.rendezvous import slurm_task_env

# What gloo and NCCL put in the errors of a collective whose peer died, hung past the
# timeout, or whose connection broke (gloo raises plain RuntimeErrors, NCCL DistBackendErrors).
_PEER_FAILURE_MARKS = ("gloo/transport", "Connection reset", "Connection closed", "Timed out", "NCCL")


class PeerLost(UserError):
    """A collective failed because of another rank or the network, not because of this rank."""


def peer_lost(error: BaseException, rank: int, step: int) -> PeerLost | None:
    """A PeerLost that says what happened if `error` is a failed collective, else None."""
    if not (isinstance(error, dist.DistError) or any(mark in str(error) for mark in _PEER_FAILURE_MARKS)):
        return None
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return PeerLost(
        f"rank {rank} lost contact with the other ranks during step {step} ({first[:300]}): another rank died or "
        "hung past train.dist_timeout_s (its own log says why), or the network failed. Run the job again: it "
        "resumes from the newest complete checkpoint"
    )


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
    timeout = timedelta(seconds=timeout_s)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    # ZeRO's collectives run on a clone of the world group that DeepSpeed makes on first use
    # with torch's default timeout (30 min), not the one above, so a hung peer would stall the
    # other ranks that long (found by tests/reliability/test_dead_rank.py). Make the clone here.
    if not hasattr(deepspeed_groups, "_WORLD_GROUP"):
        raise RuntimeError("deepspeed.utils.groups no longer has _WORLD_GROUP; see mmscale.training.distributed")
    deepspeed_groups._WORLD_GROUP = dist.new_group(ranks=list(range(dist.get_world_size())), timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def gather_objects(obj: object) -> list:
    """Every rank's `obj`, in rank order (a collective, so also a barrier)."""
    objects = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def rank0_object(obj: object) -> object:
    """Collective: rank 0's `obj`, on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown_distributed() -> None:
    # A barrier first: no rank leaves while a peer still talks to it.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
