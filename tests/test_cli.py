"""The command line: overrides anywhere among the options, and every `mmscale` command that
README.md and slurm/README.md show parses as written (synopses with their optional parts in)."""

from __future__ import annotations

import pytest

from mmscale.cli import parse
from tests.helpers.readmes import SHOWN, as_typed


def test_the_readmes_show_commands():
    assert len(SHOWN) >= 15 and any(line.startswith("mmscale submit") for line in SHOWN)


@pytest.mark.parametrize("line", SHOWN)
def test_every_command_the_readmes_show_parses(line):
    parse(as_typed(line))


def test_overrides_may_follow_the_options():
    args = parse(["submit", "recipes/demo.yaml", "a.b=1", "--nodes", "2", "--gpus-per-node", "0", "train.steps=60"])
    assert (args.recipe, args.nodes, args.gpus_per_node) == ("recipes/demo.yaml", 2, 0)
    assert args.overrides == ["a.b=1", "train.steps=60"]


@pytest.mark.parametrize("argv", [["plan", "r.yaml", "--nodez", "2"], ["eval", "run", "--data", "d", "x=1"]])
def test_a_mistyped_option_or_a_stray_override_is_still_refused(argv, capsys):
    with pytest.raises(SystemExit):
        parse(argv)
    assert "unrecognized arguments" in capsys.readouterr().err
