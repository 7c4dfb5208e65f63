"""Tables, and the facts every results entry starts with: date, machine, versions, commit."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.common import REPO


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # printed under the table: what was measured, how, caveats

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines)


def cell(value: object) -> str:
    """Numbers to about 3 significant digits (big ones with thousands separators); None is a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if float(value).is_integer():
        return f"{value:,.0f}"
    size = abs(value)
    if size >= 1000:
        return f"{value:,.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}" if size >= 0.01 else f"{value:.2g}"


def machine() -> str:
    """Cores, memory and accelerator of this machine, in one line."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), {memory:.0f} GiB, {gpu}"


def versions() -> str:
    packages = ("torch", "deepspeed", "transformers", "webdataset")
    named = [f"{package} {importlib.metadata.version(package)}" for package in packages]
    return ", ".join([f"Python {platform.python_version()}", *named])


def commit() -> str:
    """The checked-out commit, marked `+changes` when the working tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" +changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def header(title: str, load_before: float, load_after: float) -> str:
    today = datetime.date.today().isoformat()
    return "\n".join([
        f"## {today} — {title}",
        "",
        f"Machine: {machine()}. {versions()}. Commit {commit()}. Load average (1 min) {load_before:.2f} before "
        f"the run and {load_after:.2f} after it, the benchmarks' own load included.",
    ])


def append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write("\n" + text.rstrip() + "\n")
