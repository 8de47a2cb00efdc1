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


register_modifiers()

# Processors of Qwen2/2.5-VL, LLaVA-OneVision and Idefics3 reload without torchvision (CPU torch).
from qvlm_modifiers.compat import install_torchvision_free_standins as _install_standins  # noqa: E402

_install_standins()

# Our save path, the checked oneshot wrapper and recipe validation (see save.py / api.py).
from qvlm_modifiers.api import oneshot  # noqa: E402
from qvlm_modifiers.recipe_check import load_recipe  # noqa: E402
from qvlm_modifiers.save import install_oneshot_save_hook as _install_oneshot_save_hook  # noqa: E402
from qvlm_modifiers.save import save_pretrained  # noqa: E402

# llm-compressor's own oneshot(..., output_dir=...) then also writes checkpoints that reload
# exactly (one rebound name in llmcompressor.entrypoints.utils; see qvlm_modifiers.save).
_install_oneshot_save_hook()


# Packed W3/W4 loading: "compressed-tensors" checkpoints keep their weights packed and run the
# Triton kernels on CUDA (see qvlm_modifiers.packed_loader; QVLM_PACKED_KERNELS=0 turns it off).
from qvlm_modifiers.packed_loader import register as _register_packed_loader  # noqa: E402

_register_packed_loader()

# glibc heap setting for long CPU calibrations (qvlm_modifiers.heap): it must precede model loading
# but slows CPU inference, so at import only on request (QVLM_MALLOC_TUNING=1); `qvlm quantize`
# applies it itself.
from qvlm_modifiers.heap import apply_if_requested as _apply_heap_setting_if_requested  # noqa: E402

_apply_heap_setting_if_requested()
