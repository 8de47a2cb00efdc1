"""Validate a recipe before any calibration starts: :func:`load_recipe`.

llm-compressor parses recipes lazily and its errors come late (after the model is loaded) and
terse (``No modifier of type 'X' found.``, a pydantic dump). :func:`load_recipe` checks, in order:

1. the file exists (a path or the name of a shipped recipe, see :func:`qvlm_modifiers.recipe_path`);
2. it is YAML (a mapping);
3. it has at least one Modifier in llm-compressor's ``<name>_stage: <group>_modifiers: <Type>:``
   layout;
4. every Modifier type is known to llm-compressor's ``ModifierFactory`` (the message lists this
   package's Modifiers and reminds to ``import qvlm_modifiers``, which registers them);
5. every key of a Modifier is one of its fields. llm-compressor's ``Modifier`` base class sets
   pydantic ``extra="forbid"``, so an unknown key already fails there, but as a generic
   ValidationError; we name the field, the Modifier and its valid fields (and a close match);
6. the Modifier builds (other pydantic errors, e.g. a wrong type, are reported per field);
7. quantization bit widths are ones the checkpoint format and our kernels handle: integer
   weights 2-8 bits, activations 8 bits (int or float) or unquantized.

Each failure raises :class:`~qvlm_modifiers.errors.RecipeError` naming the problem and the fix.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

import yaml

from qvlm_modifiers.errors import RecipeError
from qvlm_modifiers.recipes import recipe_path

__all__ = ["load_recipe", "known_modifiers", "override_group_size", "SUPPORTED_WEIGHT_BITS", "SUPPORTED_ACTIVATION_BITS"]

SUPPORTED_WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)
SUPPORTED_ACTIVATION_BITS = (8,)

_LAYOUT_HINT = (
    "A recipe is a mapping like\n"
    "  quant_stage:\n"
    "    quant_modifiers:\n"
    "      QuantizationModifier:\n"
    "        targets: [Linear]\n"
    "        scheme: W4A16\n"
    "(stage keys end in '_stage', group keys end in '_modifiers')."
)


def known_modifiers() -> dict[str, type]:
    """Every Modifier type a recipe may name: llm-compressor's plus registered ones (ours)."""
    from llmcompressor.modifiers.factory import ModifierFactory

    from qvlm_modifiers._registry import register_modifiers

    if not ModifierFactory._loaded:
        ModifierFactory.refresh()
        register_modifiers()
    return {
        **ModifierFactory._main_registry,
        **ModifierFactory._experimental_registry,
        **ModifierFactory._registered_registry,
    }


def _our_modifier_names() -> list[str]:
    from qvlm_modifiers._registry import all_modifiers

    return [cls.__name__ for cls in all_modifiers()]


def _iter_modifier_entries(obj: dict) -> list[tuple[str, str, Any]]:
    """(location, type, args) for every Modifier entry, in llm-compressor's layout."""
    entries = []
    for stage_key, stage_val in obj.items():
        if not (stage_key.endswith("_stage") and isinstance(stage_val, dict)):
            continue
        for group_key, group_val in stage_val.items():
            if not (group_key.endswith("_modifiers") and isinstance(group_val, dict)):
                continue
            for mod_type, mod_args in group_val.items():
                entries.append((f"{stage_key}.{group_key}.{mod_type}", mod_type, mod_args))
    return entries


def _field_names(cls: type) -> list[str]:
    return [name for name in getattr(cls, "model_fields", {}) if not name.endswith("_")]


def _check_bits(location: str, modifier: Any) -> None:
    from llmcompressor.modifiers.quantization import QuantizationMixin

    if not isinstance(modifier, QuantizationMixin):
        return
    try:
        config = modifier.resolve_quantization_config()
    except Exception as err:  # invalid scheme name / config_groups
        raise RecipeError(
            f"{location}: the quantization scheme cannot be resolved ({err}). Use a preset "
            "scheme name such as W4A16, W4A16_ASYM, W8A8 or W8A16, or valid config_groups."
        ) from err
    for group_name, scheme in config.config_groups.items():
        weights = scheme.weights
        if weights is not None and weights.type == "int":
            if weights.num_bits not in SUPPORTED_WEIGHT_BITS:
                raise RecipeError(
                    f"{location} ({group_name}): {weights.num_bits}-bit integer weights are not "
                    f"supported. Use num_bits in {list(SUPPORTED_WEIGHT_BITS)} (4 or 8 for vLLM "
                    "serving)."
                )
        for kind, args in (("input", scheme.input_activations), ("output", scheme.output_activations)):
            # a Modifier may declare extra activation widths it can only simulate (fake-quant),
            # e.g. QVLMModifier's paper settings W4A4/W6A6 (dynamic per-token or static per-tensor)
            simulated = getattr(type(modifier), "simulated_activation_bits", ())
            if args is not None and kind == "input" and args.num_bits in simulated:
                continue
            if args is not None and args.num_bits not in SUPPORTED_ACTIVATION_BITS:
                raise RecipeError(
                    f"{location} ({group_name}): {args.num_bits}-bit {kind} activations are not "
                    f"supported. Use 8-bit activations (W4A8, W8A8) or none (W4A16)."
                )


def load_recipe(path_or_name: str | os.PathLike):
    """Parse and validate a recipe file or shipped recipe name; returns an llm-compressor
    ``Recipe`` (pass it as ``oneshot(recipe=...)``). Raises :class:`RecipeError`."""
    from llmcompressor.recipe import Recipe
    from pydantic import ValidationError

    path = recipe_path(path_or_name)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"Recipe {str(path)!r} cannot be read ({err}). Pass a readable YAML file.") from err
    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise RecipeError(
            f"Recipe {str(path)!r} is not valid YAML{where}: {problem}. Fix the YAML syntax "
            "(indentation with spaces, 'key: value' pairs)."
        ) from err
    if not isinstance(obj, dict):
        raise RecipeError(
            f"Recipe {str(path)!r} is not a YAML mapping (got {type(obj).__name__}). {_LAYOUT_HINT}"
        )
    entries = _iter_modifier_entries(obj)
    if not entries:
        raise RecipeError(f"Recipe {str(path)!r} contains no Modifier. {_LAYOUT_HINT}")

    registry = known_modifiers()
    for location, mod_type, mod_args in entries:
        if mod_type not in registry:
            ours = _our_modifier_names()
            close = difflib.get_close_matches(mod_type, list(registry), n=3)
            raise RecipeError(
                f"Recipe {str(path)!r}: unknown Modifier {mod_type!r} at {location}. "
                + (f"Did you mean {', '.join(close)}? " if close else "")
                + f"This package's Modifiers: {', '.join(ours) or '(none registered)'}; they are "
                "registered by `import qvlm_modifiers` (do it before the recipe is parsed). "
                "llm-compressor's include QuantizationModifier, GPTQModifier, AWQModifier, "
                "SmoothQuantModifier."
            )
        if mod_args is None:
            raise RecipeError(
                f"Recipe {str(path)!r}: {mod_type} at {location} has no arguments (an empty YAML "
                f"value), which llm-compressor cannot parse. Write `{mod_type}: {{}}` to use its "
                "defaults, or give its fields."
            )
        if not isinstance(mod_args, dict):
            raise RecipeError(
                f"Recipe {str(path)!r}: the arguments of {mod_type} at {location} must be a mapping "
                f"of field: value, got {type(mod_args).__name__}. {_LAYOUT_HINT}"
            )
        cls = registry[mod_type]
        valid = _field_names(cls)
        for key in mod_args:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                raise RecipeError(
                    f"Recipe {str(path)!r}: {mod_type} has no field {key!r} (at {location}). "
                    + (f"Did you mean {close[0]!r}? " if close else "")
                    + f"Valid fields of {mod_type}: {', '.join(valid)}. Remove or rename the field."
                )

    try:
        recipe = Recipe.create_instance(str(path))
    except ValidationError as err:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in err.errors()
        )
        raise RecipeError(
            f"Recipe {str(path)!r} has invalid Modifier arguments: {details}. Fix these values "
            "(see the Modifier's documented fields)."
        ) from err
    except Exception as err:  # noqa: BLE001 - llm-compressor's own checks (e.g. AWQ order)
        raise RecipeError(
            f"Recipe {str(path)!r} is not a valid llm-compressor recipe: {err}. Fix the recipe "
            "(see the shipped recipes, qvlm_modifiers.list_recipes(), for working examples)."
        ) from err

    for (location, _, _), modifier in zip(entries, recipe.modifiers):
        _check_bits(location, modifier)
    return recipe


# weight-argument keys written when a preset scheme is expanded (the rest are compressed-tensors defaults)
_WEIGHT_KEYS = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")


def override_group_size(recipe_text: str, group_size: int) -> tuple[str, int]:
    """Rewrite every group-quantized weight scheme of a recipe to ``group_size``.

    For models whose Linear input widths are not multiples of a recipe's group (SmolLM2-135M's
    hidden size 576 = 4.5 x 128; llm-compressor refuses such a group), the same method can run
    at a group that divides them. Preset schemes (``scheme: W4A16_ASYM``) are expanded into the
    equivalent ``config_groups`` (compressed-tensors' ``preset_name_to_scheme``) first; per-channel
    and per-tensor schemes are left alone. Returns the new YAML text and how many weight schemes
    were changed (0 when the recipe has no group-quantized weights).
    """
    from compressed_tensors.quantization import preset_name_to_scheme

    if group_size < 1:
        raise RecipeError(f"group_size must be a positive integer, got {group_size}.")
    obj = yaml.safe_load(recipe_text)
    if not isinstance(obj, dict):
        raise RecipeError(f"A recipe must be a YAML mapping to override its group size. {_LAYOUT_HINT}")
    changed = 0
    for location, _mod_type, args in _iter_modifier_entries(obj):
        if not isinstance(args, dict):
            continue
        if isinstance(args.get("scheme"), str):
            targets = args.get("targets", ["Linear"])
            scheme = preset_name_to_scheme(args.pop("scheme"), targets if isinstance(targets, list) else [targets])
            group = {"targets": list(scheme.targets)}
            for kind in ("weights", "input_activations", "output_activations"):
                quant_args = getattr(scheme, kind)
                if quant_args is not None:
                    dumped = quant_args.model_dump()
                    group[kind] = {k: dumped[k] for k in _WEIGHT_KEYS if dumped.get(k) is not None}
            args["config_groups"] = {"group_0": group}
        for group in (args.get("config_groups") or {}).values():
            weights = group.get("weights") if isinstance(group, dict) else None
            if isinstance(weights, dict) and weights.get("strategy") == "group":
                weights["group_size"] = group_size
                changed += 1
    return yaml.safe_dump(obj, sort_keys=False), changed
