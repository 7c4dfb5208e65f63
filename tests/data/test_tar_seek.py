"""Seeking to a shard's n-th sample through its tar headers."""

from __future__ import annotations

import io
import tarfile

import pytest

from mmscale.data.tar_seek import _NotPlain, _plain_members, _sample_offset, _tarfile_members, tar_samples
from tests.helpers.corrupt import good_sample, write_shard


def _handler(error: Exception) -> bool:
    raise error


def _first_keys(path, skip: int, n: int = 3) -> list[str]:
    samples = tar_samples([{"url": str(path)}], _handler, skip)
    return [next(samples)["__key__"] for _ in range(n)]


def test_the_header_walk_finds_what_tarfile_finds(tmp_path):
    shard = tmp_path / "s.tar"
    write_shard(shard, [good_sample(f"k{i:03d}") for i in range(40)])
    with open(shard, "rb") as f:
        plain = list(_plain_members(f))
        assert plain == list(_tarfile_members(f)) and len(plain) == 80  # a .json and a .png each
    assert _first_keys(shard, 0) == ["k000", "k001", "k002"]
    assert _first_keys(shard, 37) == ["k037", "k038", "k039"]
    with open(shard, "rb") as f:
        assert _sample_offset(f, 40) is None  # no such sample


@pytest.mark.parametrize("form", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_long_names_are_read_from_pax_records_or_by_tarfile(tmp_path, form):
    """Names over 100 bytes take a pax record (read here) or a GNU long-name record (tarfile's)."""
    shard = tmp_path / "long.tar"
    with tarfile.open(shard, "w", format=form) as tar:
        for i in range(6):
            for ext in ("json", "txt"):
                data = f"{i}".encode()
                info = tarfile.TarInfo(f"{'x' * 120}{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with open(shard, "rb") as f:
        if form == tarfile.PAX_FORMAT:
            assert list(_plain_members(f)) == list(_tarfile_members(f))
        else:
            with pytest.raises(_NotPlain):
                list(_plain_members(f))
    assert _first_keys(shard, 4, 2) == [f"{'x' * 120}4", f"{'x' * 120}5"]
