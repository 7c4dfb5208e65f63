"""Durable, atomic writes of files and folders, and hashes of files read in pieces: the one
implementation behind checkpoints, run records, shards, caches and released model folders."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = ".tmp-"  # what a write in progress is called; readers never take it for the real thing
_PIECE = 1 << 24  # 16 MiB: a checkpoint shard or a weight file can be larger than memory allows to read at once


def fsync(path: Path) -> None:
    """Make a file's contents, or a directory's entries (a rename, a new file), durable."""
    # A directory is synced through a read-only descriptor too.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dirs(folder: Path) -> None:
    """fsync every directory of the tree under `folder`, deepest first, so that every file in it
    keeps its name after a machine crash (the files' contents are synced by whoever wrote them)."""
    for parent, _, _ in os.walk(folder, topdown=False):
        fsync(Path(parent))


def temporary_sibling(path: Path) -> Path:
    """A name beside `path` for writing it: hidden, marked in progress, and this process's own, so
    that several processes (the nodes of a job on a shared file system) may write `path` at once."""
    return path.with_name(f"{TMP_PREFIX}{path.name}.{socket.gethostname()}-{os.getpid()}")


def write_durably(path: Path, content: str | bytes, sync: bool = True) -> None:
    """Replace `path` with `content` in one step: a reader sees the old content or the new, never a part.

    sync=False leaves out the fsyncs: still atomic, but a crash of the machine may keep the old
    content; for records rewritten every few seconds, where they would cost a shared file system more.
    """
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        fsync(path.parent)


def commit_folder(tmp: Path, final: Path) -> None:
    """Give the complete folder `tmp` the name `final`, durably: its tree is synced first, and a
    `final` that exists already (the same checkpoint step saved again) is renamed away, not deleted
    in place, before it is replaced, so that a crash at any point leaves a whole folder under `final`."""
    fsync_dirs(tmp)
    replaced = None
    if final.exists():
        replaced = final.with_name(f"{TMP_PREFIX}replaced-{final.name}")
        shutil.rmtree(replaced, ignore_errors=True)
        final.rename(replaced)
    tmp.rename(final)
    fsync(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced)


@contextmanager
def folder_written_whole(out: Path) -> Iterator[Path]:
    """A `.tmp-` sibling of the new folder `out` to write into: committed as `out` when the block
    succeeds, removed when it raises, so that `out` appears complete or not at all."""
    tmp = out.parent / f"{TMP_PREFIX}{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a write to the same `out` that was killed
    try:
        tmp.mkdir(parents=True)
        yield tmp
        commit_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pieces(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while piece := f.read(_PIECE):
            yield piece


def crc32_of(path: Path) -> int:
    """The CRC32 of a file's bytes (checkpoint files: cheap enough to check at every resume)."""
    crc = 0
    for piece in _pieces(path):
        crc = zlib.crc32(piece, crc)
    return crc


def sha256_of(path: Path) -> str:
    """The hex SHA-256 of a file's bytes (shards, whose manifests name them by it)."""
    digest = hashlib.sha256()
    for piece in _pieces(path):
        digest.update(piece)
    return digest.hexdigest()
