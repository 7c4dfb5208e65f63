"""Fixtures of the training tests."""

from __future__ import annotations

import pytest

from tests.helpers.processes import one_rank_world


@pytest.fixture(scope="module")
def world_of_one():
    """One in-process group of one rank (gloo) for a test module."""
    with one_rank_world():
        yield
