"""Passing command-line options on to the functions they configure."""

from __future__ import annotations

import argparse


def given(args: argparse.Namespace, *names: str) -> dict[str, object]:
    """The options among `names` that the command line set. The others are left to the function
    or dataclass they go to, whose signature states each default once (the CLI imports it only
    when the command runs: `mmscale --help` should not pay for torch)."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}
