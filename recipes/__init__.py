"""The shipped recipes (the YAML files beside this module) and the one recipe lookup.

Installed as ``qvlm_modifiers.recipes``; ``qvlm_modifiers.recipe_path`` / ``list_recipes`` are these.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["list_recipes", "recipe_path"]

_SUFFIXES = (".yaml", ".yml")


def list_recipes() -> dict[str, Path]:
    """Shipped recipes by name (file stem), e.g. ``{"mbq_w3": Path(.../mbq_w3.yaml)}``."""
    return {p.stem: p for p in sorted(Path(__file__).parent.glob("*.yaml"))}


def recipe_path(name_or_path: str | os.PathLike) -> Path:
    """An existing recipe file, or the shipped recipe of that name (``"mbq_w3"`` or ``"mbq_w3.yaml"``).

    Raises :class:`~qvlm_modifiers.errors.RecipeError` naming the fix: for a path to a YAML file that
    does not exist, and for a name that is no shipped recipe (listing them)."""
    from qvlm_modifiers.errors import RecipeError

    candidate = Path(name_or_path).expanduser()
    if candidate.is_file():
        return candidate
    if candidate.suffix in _SUFFIXES and (os.sep in str(name_or_path) or candidate.parent != Path(".")):
        raise RecipeError(
            f"Recipe file {str(candidate)!r} does not exist. Check the path, or pass the name of a shipped "
            "recipe (qvlm_modifiers.list_recipes())."
        )
    recipes = list_recipes()
    stem = candidate.stem if candidate.suffix in _SUFFIXES else str(name_or_path)
    if stem in recipes:
        return recipes[stem]
    raise RecipeError(
        f"Recipe {str(name_or_path)!r} not found: it is neither an existing YAML file nor a shipped "
        f"recipe. Shipped recipes: {', '.join(recipes) or '(none)'}. Pass one of those names or the "
        "path of a recipe YAML file."
    )
