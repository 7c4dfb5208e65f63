"""The recipe: its typed sections, and the loader of YAML files with `key.sub=value` overrides."""

from mmscale.config.load import RecipeError, dump_recipe, load_recipe
from mmscale.config.schema import Recipe

__all__ = ["Recipe", "RecipeError", "dump_recipe", "load_recipe"]
