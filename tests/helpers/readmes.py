"""The `mmscale` commands README.md and slurm/README.md show, and each as a user would type it."""

from __future__ import annotations

import re
import shlex

from tests.helpers.recipes import REPO

PLACEHOLDERS = {"N": "1", "MIN": "60"}  # a synopsis's numeric placeholders, where argparse wants a number


def shown_commands(readme: str) -> list[str]:
    """The `mmscale ...` lines of the file's fenced code blocks, continuation lines joined."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", (REPO / readme).read_text(), flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line.split("  #")[0].strip() for line in lines if line.startswith("mmscale ")]


def as_typed(synopsis: str) -> list[str]:
    """A synopsis as a user would type it: optional parts in (the first of alternatives), no `...`."""
    line = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(" | ")[0], synopsis)
    words = [w.split("|")[0] for w in shlex.split(line) if w != "..."]
    return [PLACEHOLDERS.get(w, w) for w in words[1:]]


SHOWN = [line for readme in ("README.md", "slurm/README.md") for line in shown_commands(readme)]
