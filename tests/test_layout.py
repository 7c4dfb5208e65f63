"""The package's layout as README.md's Layout section states it, and each folder's one-line
summary in its `__init__.py`."""

from __future__ import annotations

import ast
import re

from tests.helpers.recipes import REPO

PACKAGE = REPO / "mmscale"


def layout_entries() -> set[str]:
    """The `mmscale/...` paths README.md's Layout block names at the start of a line."""
    section = (REPO / "README.md").read_text().split("## Layout", 1)[1]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    return {m.group(1) for m in re.finditer(r"^(mmscale/\S+)", block, re.M)}


def test_the_readme_layout_names_every_folder_and_top_level_module_and_nothing_else():
    folders = {f"{p.parent.relative_to(REPO).as_posix()}/" for p in PACKAGE.rglob("*/__init__.py")}
    modules = {f"mmscale/{p.name}" for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert layout_entries() == folders | modules


def test_every_folder_says_in_its_first_docstring_line_what_lives_there():
    for init in sorted(PACKAGE.rglob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init.relative_to(REPO)} has no docstring saying what lives in its folder"
        first = doc.splitlines()[0]
        assert first.endswith(".") and len(first) <= 120, (
            f"{init.relative_to(REPO)}: the docstring's first line must be one sentence that fits a line: {first!r}"
        )
