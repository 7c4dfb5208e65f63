"""Read a YAML recipe, apply `key.sub=value` overrides, validate, and explain mistakes."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, get_args, get_origin

import yaml
from pydantic import BaseModel, Tag, ValidationError

from mmscale.config.model import ARCH_SECTIONS
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


def _without_sections_of(arch: str, model: dict) -> dict:
    """The `model` section without the sections that only architecture `arch` has."""
    return {key: value for key, value in model.items() if key not in ARCH_SECTIONS.get(arch, ())}


def _switch_arch(tree: dict, overrides: list[tuple[list[str], object]]) -> None:
    """An override of model.arch replaces the recipe file's architecture: the file's sections that
    only its own arch has go with it (a decoder recipe run as cross_attention keeps its llm,
    pretrained and attention), while such sections that overrides write are errors as ever."""
    model = tree.get("model")
    arch = [value for key, value in overrides if key == ["model", "arch"]]
    if not isinstance(model, dict) or not arch:
        return
    written = model.get("arch", "decoder")
    if arch[-1] != written:
        tree["model"] = _without_sections_of(written, model)


def earlier_model_section(model: dict) -> dict:
    """A `model` section as an earlier mmscale dumped it (a run's recipe.yaml, a model folder's spec)
    in this version's terms; a section of this version comes back as it is. Earlier versions read
    both archs' sections and wrote them all, the other arch's with their ignored defaults (dropped
    here); wrote every tower field out (so no preset fills any); and took a float
    `alignment.layer` for a fraction (now `layer_fraction`)."""
    if "vision" not in model or "tiled_vision" not in model:
        return model
    arch = model.get("arch", "decoder")
    model = _without_sections_of(next(a for a in ARCH_SECTIONS if a != arch), model)
    if arch == "decoder":
        model["vision"] = {"preset": None, **model["vision"]}
        alignment = dict(model.get("alignment") or {})
        if isinstance(alignment.get("layer"), float):
            alignment["layer_fraction"], alignment["layer"] = alignment["layer"], None
        model["alignment"] = alignment
    return model


def _sections_of(annotation: object) -> dict[str, type[BaseModel]]:
    """The sections a field may hold, by union tag ("" where untagged): an optional section (X | None)
    holds X; the model section, one class per arch."""
    sections = {}
    for a in (annotation, *get_args(annotation)):
        if get_origin(a) is Annotated:
            tags = [m.tag for m in a.__metadata__ if isinstance(m, Tag)]
            a = get_args(a)[0]
        else:
            tags = [""]
        if isinstance(a, type) and issubclass(a, BaseModel):
            sections.update(dict.fromkeys(tags, a))
    return sections


def _located(loc: tuple) -> tuple[str, list[str]]:
    """A pydantic error location as the recipe's dotted key (a union's tag, the arch the model section
    was read as, left out), and the valid keys of the section that key lies in."""
    parts, keys = list(loc), []
    section: type[BaseModel] | None = Recipe
    container = section
    while parts:
        part = parts.pop(0)
        keys.append(str(part))
        container = section
        field = section.model_fields.get(part) if section is not None else None
        sections = _sections_of(field.annotation) if field is not None else {}
        tagged = parts and parts[0] in sections
        section = sections[parts.pop(0)] if tagged else next(iter(sections.values()), None)
    return ".".join(keys), list(container.model_fields) if container is not None else []


def _explain(err: ValidationError, source: str) -> str:
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        key, valid = _located(e["loc"])
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), valid, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            lines.append(f"  unknown key '{key}': {hint}valid keys here: {', '.join(valid)}")
        elif e["type"] == "missing":
            lines.append(f"  missing required key '{key}'")
        elif e["type"] == "union_tag_invalid":  # the model section's arch
            lines.append(f"  '{key}.arch': should be one of {e['ctx']['expected_tags']} (got {e['ctx']['tag']!r})")
        elif isinstance(e.get("input"), dict):  # a check across a section's keys; its message names them
            lines.append(f"  {key + ': ' if key else ''}{e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  '{key}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_recipe(path: str | Path, overrides: list[str] = (), dumped: bool = False) -> Recipe:
    """Load and validate a recipe; raise RecipeError naming every bad key. `dumped`: a recipe
    mmscale wrote (a run's recipe.yaml), which may be an earlier version's (`earlier_model_section`)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {path} is not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise RecipeError(f"recipe {path} must be a mapping of sections, got {type(tree).__name__}")
    if dumped and isinstance(tree.get("model"), dict):
        tree["model"] = earlier_model_section(tree["model"])
    parsed = parse_overrides(list(overrides))
    _switch_arch(tree, parsed)
    for key, value in parsed:
        apply_override(tree, key, value)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as e:
        raise RecipeError(_explain(e, str(path))) from None


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (what a run actually used, defaults included)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
