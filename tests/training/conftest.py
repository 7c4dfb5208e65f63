"""Fixtures of the training tests."""

from __future__ import annotations

import deepspeed.comm
import pytest

from mmscale.training import init_distributed
from mmscale.training.distributed import free_port


@pytest.fixture(scope="module")
def world_of_one():
    """One in-process group of one rank (gloo) for a test module."""
    world = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    with pytest.MonkeyPatch.context() as env:
        for key, value in world.items():
            env.setenv(key, value)
        init_distributed(timeout_s=60)
        yield
        # DeepSpeed's own call also drops its cached groups, so that a later module can start a new world.
        deepspeed.comm.destroy_process_group()
