"""File helpers shared by checkpoints, run directories and model folders."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

TMP_PREFIX = ".tmp-"  # what a write in progress is called; readers never take it for the real thing


def fsync(path: Path) -> None:
    """Make a file's contents, or a directory's entries (a rename, a new file), durable."""
    # A directory is synced through a read-only descriptor too.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, text: str, sync: bool = True) -> None:
    """Replace `path` with `text` in one step: a reader sees the old content or the new, never a part.

    sync=False leaves out the fsyncs: still atomic, but a crash of the machine may keep the old
    content; for records rewritten every few seconds, where they would cost a shared file system more.
    """
    tmp = path.with_name(TMP_PREFIX + path.name)
    with open(tmp, "w") as f:
        f.write(text)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync:
        fsync(path.parent)


def crc32_of(path: Path) -> int:
    """The CRC32 of a file's bytes, read in 16 MiB pieces (a checkpoint shard or a weight file
    can be larger than memory allows to read at once)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc
