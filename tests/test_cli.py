"""The command line: overrides anywhere among the options, and every `mmscale` command that
README.md and slurm/README.md show parses as written (synopses with their optional parts in)."""

from __future__ import annotations

import re
import shlex

import pytest

from mmscale.cli import parse
from tests.conftest import REPO

PLACEHOLDERS = {"N": "1", "MIN": "60"}  # a synopsis's numeric placeholders, where argparse wants a number


def _shown_commands(readme: str) -> list[str]:
    """The `mmscale ...` lines of the file's fenced code blocks, continuation lines joined."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", (REPO / readme).read_text(), flags=re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line.split("  #")[0].strip() for line in lines if line.startswith("mmscale ")]


def _as_typed(synopsis: str) -> list[str]:
    """A synopsis as a user would type it: optional parts in (the first of alternatives), no `...`."""
    line = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(" | ")[0], synopsis)
    words = [w.split("|")[0] for w in shlex.split(line) if w != "..."]
    return [PLACEHOLDERS.get(w, w) for w in words[1:]]


SHOWN = [line for readme in ("README.md", "slurm/README.md") for line in _shown_commands(readme)]


def test_the_readmes_show_commands():
    assert len(SHOWN) >= 15 and any(line.startswith("mmscale submit") for line in SHOWN)


@pytest.mark.parametrize("line", SHOWN)
def test_every_command_the_readmes_show_parses(line):
    parse(_as_typed(line))


def test_overrides_may_follow_the_options():
    args = parse(["submit", "recipes/demo.yaml", "a.b=1", "--nodes", "2", "--gpus-per-node", "0", "train.steps=60"])
    assert (args.recipe, args.nodes, args.gpus_per_node) == ("recipes/demo.yaml", 2, 0)
    assert args.overrides == ["a.b=1", "train.steps=60"]


@pytest.mark.parametrize("argv", [["plan", "r.yaml", "--nodez", "2"], ["eval", "run", "--data", "d", "x=1"]])
def test_a_mistyped_option_or_a_stray_override_is_still_refused(argv, capsys):
    with pytest.raises(SystemExit):
        parse(argv)
    assert "unrecognized arguments" in capsys.readouterr().err
