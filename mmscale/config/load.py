"""Read a YAML recipe, apply `key.sub=value` overrides, validate, and explain mistakes."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import get_args

import yaml
from pydantic import BaseModel, ValidationError

from mmscale.config.schema import Recipe
from mmscale.errors import UserError


class RecipeError(UserError, ValueError):
    """A recipe that cannot be used; the message names the key or file and the fix."""


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], object]]:
    """`["train.steps=50", "data.val=null"]` -> `[(["train", "steps"], 50), (["data", "val"], None)]`.

    Values are parsed as YAML, so numbers, booleans, null and lists get their types.
    """
    parsed = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise RecipeError(f"override '{item}' is not of the form key.sub=value")
        parsed.append((key.split("."), yaml.safe_load(value) if value else ""))
    return parsed


def apply_override(tree: dict, path: list[str], value: object) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"override {'.'.join(path)}: '{'.'.join(path[: i + 1])}' is a value, not a section")
        node = child
    node[path[-1]] = value


def _fields_at(loc: tuple, model: type[BaseModel] = Recipe) -> list[str]:
    """The valid keys of the section that `loc` (a pydantic error location) points into."""
    for part in loc[:-1]:
        annotation = model.model_fields[part].annotation
        # An optional section (X | None) names its keys through X.
        sections = [a for a in (annotation, *get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not sections:
            return []
        model = sections[0]
    return list(model.model_fields)


def _explain(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            valid = _fields_at(e["loc"])
            close = difflib.get_close_matches(str(e["loc"][-1]), valid, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            lines.append(f"  unknown key '{key}': {hint}valid keys here: {', '.join(valid)}")
        elif e["type"] == "missing":
            lines.append(f"  missing required key '{key}'")
        elif key:
            lines.append(f"  '{key}': {e['msg']} (got {e.get('input')!r})")
        else:  # a check across sections; its message names the keys
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Load and validate a recipe; raise RecipeError naming every bad key."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path} is not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise RecipeError(f"recipe {path} must be a mapping of sections, got {type(tree).__name__}")
    for key, value in parse_overrides(list(overrides)):
        apply_override(tree, key, value)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as e:
        raise RecipeError(_explain(e, str(path))) from None


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (what a run actually used, defaults included)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
