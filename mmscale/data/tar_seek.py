"""Reading a tar shard from its n-th sample: seeking past the members before it, not reading them."""

from __future__ import annotations

import itertools
import re
import tarfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import webdataset as wds


def tar_samples(urls: list[dict], handler: Callable, skip: int) -> Iterator[dict]:
    """webdataset's samples of the shards `urls` (its tarfile_to_samples, step by step), from the
    first shard's sample `skip`: a local shard is sought to it through the tar headers alone (the
    members' data is passed over by seeking), a remote one read up to it."""
    streams = wds.tariterators.url_opener(iter(urls), handler=handler)
    local = bool(urls) and Path(urls[0]["url"]).is_file()
    if skip and local:
        streams = _sought(streams, skip)
    files = wds.tariterators.tar_file_expander(streams, handler=handler)
    samples = wds.tariterators.group_by_keys(files, handler=handler)
    return samples if local or not skip else itertools.islice(samples, skip, None)


def _sought(streams: Iterator[dict], skip: int) -> Iterator[dict]:
    """The opened shards, the first positioned at the header of its sample `skip`: its members are
    grouped by key as webdataset groups them (a mistake shows in the checked mark, see `_restored`)."""
    first = next(streams, None)
    if first is not None:
        offset = _sample_offset(first["stream"], skip)
        first["stream"].seek(*((offset,) if offset is not None else (0, 2)))  # past its end: no such sample
        yield first
    yield from streams


def _sample_offset(stream: BinaryIO, skip: int) -> int | None:
    """The byte offset of the first member of sample `skip` in the tar `stream`, or None if it
    has fewer samples or cannot be read as a tar (the seek then finds nothing, and the restore
    reads the stream again, whose reading meets, and counts, the error as the first one did)."""
    for members in (_plain_members, _tarfile_members):
        try:
            return _offset_of(members(stream), skip)
        except _NotPlain:
            continue
        except (tarfile.TarError, OSError):
            return None
    return None


def _offset_of(members: Iterator[tuple[str, int, bool]], skip: int) -> int | None:
    """The offset of sample `skip`'s first member, its members grouped by key as webdataset groups them."""
    key, seen = None, -1
    for name, offset, is_file in members:
        meta = "/" not in name and name.startswith(wds.tariterators.meta_prefix) and name.endswith(
            wds.tariterators.meta_suffix)
        member_key = wds.tariterators.base_plus_ext(name)[0]
        if not is_file or meta or re.match(r"__[^/]*__($|/)", name) or member_key is None:
            continue
        if member_key != key:
            key, seen = member_key, seen + 1
            if seen == skip:
                return offset
    return None


class _NotPlain(Exception):
    """A tar member that its 512-byte header alone does not describe."""


def _plain_members(stream: BinaryIO) -> Iterator[tuple[str, int, bool]]:
    """(name, header offset, is a file) of each member, read from the ustar headers and the pax
    records before them (Python's tarfile, hence webdataset's TarWriter, gives every member one,
    for its fractional mtime): a few reads and seeks a member. Written out because `tarfile`
    builds a TarInfo per member, ~60 µs each, which made a seek deep into a shard of 8,000
    members cost half a second. Anything else (GNU long names, global pax records, base-256
    sizes, names that are not UTF-8) raises _NotPlain, and tarfile reads the shard instead."""
    offset, first, records = 0, None, {}
    while True:
        stream.seek(offset)
        header = stream.read(512)
        if len(header) < 512 or not header.strip(b"\0"):
            return  # the end-of-archive blocks
        kind, size = header[156:157], header[124:136]
        if kind not in (b"0", b"\0", b"5", b"x") or size[0] & 0x80:
            raise _NotPlain
        try:
            length = int(size.split(b"\0", 1)[0].strip() or b"0", 8)
            if kind == b"x":  # a pax record for the next member, whose header starts here
                first, records = offset if first is None else first, _pax_records(stream.read(length))
                offset += 512 + -(-length // 512) * 512
                continue
            name = header[:100].split(b"\0", 1)[0].decode()
            prefix = header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
            length = int(records.get("size", length))
        except ValueError as e:  # UnicodeDecodeError included
            raise _NotPlain from e
        name = records.get("path", f"{prefix}/{name}" if prefix else name)
        yield name, offset if first is None else first, kind != b"5"
        offset += 512 + -(-length // 512) * 512
        first, records = None, {}


def _pax_records(data: bytes) -> dict[str, str]:
    """A pax extended header's "LENGTH KEY=VALUE\\n" records."""
    records, at = {}, 0
    while at < len(data) and data[at:at + 1] != b"\0":
        length = int(data[at:data.index(b" ", at)])
        key, _, value = data[data.index(b" ", at) + 1 : at + length - 1].partition(b"=")
        records[key.decode()] = value.decode()
        at += length
    return records


def _tarfile_members(stream: BinaryIO) -> Iterator[tuple[str, int, bool]]:
    stream.seek(0)
    tar = tarfile.open(fileobj=stream, mode="r:")  # seekable: headers read, data sought past
    for info in iter(tar.next, None):
        yield info.name, info.offset, info.isreg()
