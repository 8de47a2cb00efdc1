"""qvlm-modifiers: Q-VLM and MBQ quantization Modifiers for vision-language models.

``import qvlm_modifiers`` registers every Modifier of this package with llm-compressor's
``ModifierFactory`` so YAML recipes can name them like built-ins (``MBQModifier``,
``QVLMModifier``) and compose them with llm-compressor's own Modifiers.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "recipe_path",
    "list_recipes",
    "register_modifiers",
    "oneshot",
    "save_pretrained",
    "load_recipe",
]


def _recipes_dir() -> Path:
    from qvlm_modifiers import recipes as _recipes_pkg  # ships recipes/*.yaml as package data

    return Path(_recipes_pkg.__file__).parent


def list_recipes() -> dict[str, Path]:
    """Shipped recipes by name (file stem), e.g. ``{"mbq_w3": Path(.../mbq_w3.yaml)}``."""
    return {p.stem: p for p in sorted(_recipes_dir().glob("*.yaml"))}


def recipe_path(name_or_path: str | Path) -> Path:
    """Resolve a shipped recipe name (``"mbq_w3"``) or an existing YAML path to a file path."""
    from qvlm_modifiers.errors import RecipeError

    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    recipes = list_recipes()
    stem = candidate.stem if candidate.suffix in (".yaml", ".yml") else str(name_or_path)
    if stem in recipes:
        return recipes[stem]
    raise RecipeError(
        f"Recipe {str(name_or_path)!r} not found: it is neither an existing YAML file nor a shipped "
        f"recipe. Shipped recipes: {', '.join(recipes) or '(none)'}. Pass one of those names or the "
        "path of a recipe YAML file."
    )


def register_modifiers() -> list[str]:
    """Register this package's Modifiers with llm-compressor (idempotent). Returns their names."""
    from llmcompressor.modifiers.factory import ModifierFactory

    from qvlm_modifiers._registry import all_modifiers

    names = []
    for cls in all_modifiers():
        ModifierFactory.register(cls.__name__, cls)
        names.append(cls.__name__)
    return names


# What ``import qvlm_modifiers`` does, all of it:
# 1. registers our Modifiers with llm-compressor's ModifierFactory (its public extension point), so
#    recipes name them like built-ins;
# 2. qvlm_modifiers.upstream.install(): checks the upstream versions, then the integrations that
#    need upstream internals (processor stand-ins without torchvision, the packed compressed-tensors
#    loader, reload-safe saves from llm-compressor's own oneshot). See that module for each one.
# 3. the glibc heap setting for long CPU calibrations, only when QVLM_MALLOC_TUNING=1 asks for it
#    (it must precede model loading; `qvlm quantize` applies it itself).
register_modifiers()

from qvlm_modifiers import upstream as _upstream  # noqa: E402

_upstream.install()

from qvlm_modifiers.api import oneshot  # noqa: E402
from qvlm_modifiers.heap import apply_if_requested as _apply_heap_setting_if_requested  # noqa: E402
from qvlm_modifiers.recipe_check import load_recipe  # noqa: E402
from qvlm_modifiers.save import save_pretrained  # noqa: E402

_apply_heap_setting_if_requested()
