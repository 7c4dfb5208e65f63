"""Reading a local Hugging Face model folder: config.json plus safetensors weights, their
fingerprints (what a run that left frozen weights out of its checkpoints checks), and the
messages that name weights which do not fit a model.

Only local folders: nothing here may reach a hub, so a missing folder is a user error
naming the path rather than a download attempt.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from mmscale.errors import UserError
from mmscale.utils.files import crc32_of


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(
            f"{folder} is not a Hugging Face model folder (no config.json); point the recipe at a local "
            "folder written by save_pretrained (weights are never downloaded)"
        )
    return json.loads(path.read_text())


def _weight_files(folder: str | Path) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no *.safetensors weights; save the model with save_pretrained(safe_serialization=True)")
    return files


def read_state_dict(
    folder: str | Path, keep: Callable[[str], bool] | None = None, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of the folder's safetensors files (sharded or not), on CPU; with `keep`, only
    those whose names it accepts (the others are never read); with `dtype`, floating-point ones
    in that dtype, cast as they are read (`read_unmapped`)."""
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        if dtype is not None:
            state.update(read_unmapped(file, keep, dtype))
            continue
        with safe_open(file, "pt") as f:
            state.update({name: f.get_tensor(name) for name in f.keys() if keep is None or keep(name)})
    return state


# safetensors' dtype names (the format's header) in torch.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def read_unmapped(file: Path, keep: Callable[[str], bool] | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors read into memory of their own, floating-point ones cast to `dtype`.

    Written here rather than with safetensors' torch API because that API maps the file: the
    mapped pages stay resident, and count against the job's memory, until the last tensor read
    from them is gone, so a whole model cast on reading (or later, in place) holds both copies;
    read one by one, each stored tensor goes once its cast is made. The format is a little-endian
    u64 header length, a JSON header (dtype, shape, byte offsets per tensor), then the bytes.
    """
    state = {}
    with open(file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        base = f.tell()
        for name, info in header.items():
            if name == "__metadata__" or (keep is not None and not keep(name)):
                continue
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise UserError(f"{file}: tensor {name} is stored as {info['dtype']}, which mmscale does not read")
            start, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]])
            if tensor.numel() * tensor.element_size() != end - start:
                raise UserError(f"{file}: tensor {name}'s shape does not match its bytes; the file is damaged")
            f.seek(base + start)
            if f.readinto(tensor.view(-1).view(torch.uint8).numpy()) != end - start:
                raise UserError(f"{file} ends inside tensor {name}: the file is truncated; write it again")
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


def as_fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every floating-point tensor in fp32, cast one by one in the dict itself (fp32
    ones not copied), so a large model's weights exist about once at any time. bf16 is exact in fp32."""
    for key, tensor in state.items():
        if tensor.is_floating_point():
            state[key] = tensor.float()
    return state


def folder_fingerprint(folder: str | Path) -> dict[str, str]:
    """Each weight file's and config.json's size and CRC32, by file name: what tells that a folder
    still holds the weights a run started from (about 3 GB/s of reading, from the page cache
    after a load)."""
    files = [*_weight_files(folder), Path(folder) / "config.json"]
    return {file.name: f"{file.stat().st_size}:{crc32_of(file):08x}" for file in files}


def fingerprint_change(recorded: dict[str, dict[str, str]], current: dict[str, dict[str, str]]) -> str | None:
    """How the folders' fingerprints now (`current`) differ from `recorded` (folder -> file -> size
    and CRC32), in words; None if they do not."""
    for folder, files in recorded.items():
        now = current.get(folder, {})
        for name in sorted(files.keys() | now.keys()):
            if files.get(name) != now.get(name):
                was, became = files.get(name, "absent"), now.get(name, "absent")
                return f"{Path(folder) / name} changed (size:crc32 {was} then, {became} now)"
    return None


def stored_float_dtypes(folder: str | Path) -> Counter[str]:
    """How many floating-point tensors the folder stores in each safetensors dtype ("BF16",
    "F32"...), from the files' headers alone."""
    counts: Counter[str] = Counter()
    for file in _weight_files(folder):
        with safe_open(file, "pt") as f:
            dtypes = (f.get_slice(name).get_dtype() for name in f.keys())
            counts.update(d for d in dtypes if d.startswith(("F", "BF")))
    return counts


SHOWN = 5  # keys named in an error message


def listed(keys: list[str]) -> str:
    """A few of `keys` for an error message, and how many more there are."""
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def weight_problems(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> list[str]:
    """What keeps `found` from loading into a module whose state dict is `expected`: missing,
    unexpected and misshapen weights, each naming a few; empty if it fits."""
    problems = []
    if missing := sorted(set(expected) - set(found)):
        problems.append(f"missing {listed(missing)}")
    if unexpected := sorted(set(found) - set(expected)):
        problems.append(f"not in the model {listed(unexpected)}")
    misshapen = [f"{k} {tuple(found[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                 if k in found and found[k].shape != v.shape]
    if misshapen:
        problems.append(f"shapes (checkpoint vs model) differ: {listed(misshapen)}")
    return problems
