"""Writing one WebDataset shard so that its final name never holds a part of it: the shard builder
(mmscale.data.build) and VIRAL's teacher cache (mmscale.alignment.cache) both write through it."""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Self

import webdataset as wds

from mmscale.data.schema import TAR_MTIME
from mmscale.utils.files import sha256_of

_UNFINISHED = ".tmp-"  # `.NAME.tar.tmp-PID`: hidden, and not a `.tar` the loader would read


def remove_unfinished(out: Path, names: str = "*") -> None:
    """Remove the shards named like `names` (a glob) that a killed writer left unfinished in `out`."""
    for stale in out.glob(f".{names}.tar{_UNFINISHED}*"):
        stale.unlink()


class ShardWriter:
    """One shard, written under a temporary name beside `target`. `commit` gives it its final
    name once complete (synced first, so a power cut cannot shorten it) and returns its size and
    sha256, as the manifests list them; `discard`, or an exception inside its `with` block,
    removes it. `encoder=False` writes members that are bytes already (a shard copied as it is)."""

    def __init__(self, target: Path, encoder: bool = True):
        self.target = target
        self.tmp = target.with_name(f".{target.name}{_UNFINISHED}{os.getpid()}")
        self.samples = 0
        self._tar = wds.TarWriter(str(self.tmp), encoder=encoder, mtime=TAR_MTIME)

    def write(self, sample: dict) -> None:
        self._tar.write(sample)
        self.samples += 1

    def commit(self) -> dict:
        self._tar.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        stats = {"bytes": self.tmp.stat().st_size, "sha256": sha256_of(self.tmp)}
        os.replace(self.tmp, self.target)
        return stats

    def discard(self) -> None:
        self._tar.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if error is not None:
            self.discard()
