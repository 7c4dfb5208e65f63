"""Processes the tests start and wait on: a subprocess's environment, a command run to its end,
polling, and an in-process distributed world of one rank."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from tests.helpers.recipes import REPO


def subprocess_env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def run_command(cmd: list[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env={**subprocess_env(), **env}, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode:
        print(proc.stdout[-5000:], proc.stderr[-5000:], sep="\n")
    return proc


def wait_for(condition: Callable[[], object], seconds: float = 5.0) -> bool:
    """Whether `condition()` holds within `seconds` (polled every 10 ms)."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


@contextmanager
def one_rank_world() -> Iterator[None]:
    """An in-process distributed group of one rank (gloo), as `mmscale train` makes for one process."""
    import deepspeed.comm

    from mmscale.training import init_distributed
    from mmscale.training.distributed import free_port

    world = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    with pytest.MonkeyPatch.context() as env:
        for key, value in world.items():
            env.setenv(key, value)
        init_distributed(timeout_s=60)
        try:
            yield
        finally:
            # DeepSpeed's own call also drops its cached groups, so that a later world can start.
            deepspeed.comm.destroy_process_group()
