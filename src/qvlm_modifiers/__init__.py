"""qvlm-modifiers: Q-VLM and MBQ quantization Modifiers for vision-language models.

``import qvlm_modifiers`` registers every Modifier of this package with llm-compressor's
``ModifierFactory`` so YAML recipes can name them like built-ins (``MBQModifier``,
``QVLMModifier``) and compose them with llm-compressor's own Modifiers.
"""

from __future__ import annotations

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


from qvlm_modifiers._registry import register_modifiers  # noqa: E402
from qvlm_modifiers.recipes import list_recipes, recipe_path  # noqa: E402

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
