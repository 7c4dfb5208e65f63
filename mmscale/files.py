"""File helpers shared by checkpoints and model folders."""

from __future__ import annotations

import zlib
from pathlib import Path


def crc32_of(path: Path) -> int:
    """The CRC32 of a file's bytes, read in 16 MiB pieces (a checkpoint shard or a weight file
    can be larger than memory allows to read at once)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc
