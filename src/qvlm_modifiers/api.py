"""``qvlm_modifiers.oneshot``: llm-compressor's ``oneshot`` with the VLM pitfalls handled.

Same signature as ``llmcompressor.oneshot`` (every keyword is forwarded) plus ``overwrite``.
Before calibration starts it

- checks ``output_dir`` (new or empty unless ``overwrite``, writable) -> ``OutputDirError``;
- validates a recipe given as a path or shipped recipe name (:func:`~qvlm_modifiers.recipe_check.load_recipe`)
  -> ``RecipeError``;
- loads a model given as a path with ``AutoModelForImageTextToText`` (llm-compressor would use
  ``AutoModelForCausalLM``) and its processor from the same path;
- checks the model is a supported VLM family -> ``UnsupportedModelError``;
- warns when the recipe packs a SigLIP vision tower (LLaVA-OneVision, Gemma 3): that checkpoint
  reloads in transformers only after ``import qvlm_modifiers`` (see :func:`_warn_if_reload_needs_our_loader`);
- gives a never-saved model a ``name_or_path`` (llm-compressor reloads the config from it): the
  config is written to a temporary directory, removed again at the end;
- fills ``sequential_targets`` with the family's decoder layer class when the recipe needs
  calibration data (GPTQ, AWQ, SmoothQuant, MBQ, Q-VLM use the sequential pipeline), so the
  vision tower is not split into sequential subgraphs;
- passes ``processor=`` (VLMs need it; a dataset without a processor -> ``CalibrationDataError``);
- uses the batch-size-1 VLM collator of :mod:`qvlm_modifiers.data` when no ``data_collator``
  was given and that module is available.

Afterwards it saves through :func:`qvlm_modifiers.save.save_pretrained` (compressed-tensors,
reloads exactly, atomic) instead of llm-compressor's in-place save.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from qvlm_modifiers.errors import CalibrationDataError, RecipeError

__all__ = ["oneshot"]

logger = logging.getLogger(__name__)

_UNSET = object()


def _recipe_modifiers(recipe: Any) -> list:
    from llmcompressor.modifiers import Modifier
    from llmcompressor.recipe import Recipe

    if recipe is None:
        return []
    if isinstance(recipe, Recipe):
        return list(recipe.modifiers)
    if isinstance(recipe, Modifier):
        return [recipe]
    if isinstance(recipe, (list, tuple)):
        out: list = []
        for item in recipe:
            out.extend(_recipe_modifiers(item))
        return out
    return []


def _prepare_recipe(recipe: Any) -> Any:
    """Validate path/name recipes (and lists of them); Modifier/Recipe objects pass through."""
    if isinstance(recipe, (str, os.PathLike)):
        text = str(recipe)
        # A YAML string (llm-compressor accepts those) is not a path or a name.
        if "\n" in text and not Path(text).exists():
            return recipe
        from qvlm_modifiers.recipe_check import load_recipe

        return load_recipe(recipe)
    if isinstance(recipe, (list, tuple)) and recipe and all(
        isinstance(r, (str, os.PathLike)) for r in recipe
    ):
        from llmcompressor.recipe import Recipe

        loaded = [_prepare_recipe(r) for r in recipe]
        modifiers = [m for r in loaded for m in _recipe_modifiers(r)]
        return Recipe.from_modifiers(modifiers)
    return recipe


def _warn_if_reload_needs_our_loader(model: Any, modifiers: list) -> bool:
    """Warn (and return True) when the recipe packs Linears of a SigLIP vision tower.

    transformers 5.15-5.17's ``SiglipPreTrainedModel._init_weights`` reads ``Linear.weight``; a
    pack-quantized Linear (int weights without int8 activations: W4A16, W3A16, W8A16, W4A8) only
    has ``weight_packed``, so plain transformers cannot reload such a checkpoint
    (``AttributeError``). ``import qvlm_modifiers`` (the packed loader,
    :func:`qvlm_modifiers.upstream.skip_init_of_compressed_linears`) reloads it exactly, and
    that fix cannot be written into the checkpoint: what a Linear looks like during
    initialization follows from its scheme, not from the stored tensors. W8A8 int stores
    ``weight`` and reloads everywhere.
    """
    from compressed_tensors.utils.match import match_named_modules
    from llmcompressor.modifiers.quantization import QuantizationMixin

    from qvlm_modifiers.families import get_family

    fam = get_family(model)
    vision = model.get_submodule(fam.vision_tower)
    if not type(vision).__name__.startswith("Siglip"):
        return False
    for modifier in modifiers:
        if not isinstance(modifier, QuantizationMixin):
            continue
        config = modifier.resolve_quantization_config()
        for scheme in config.config_groups.values():
            weights, acts = scheme.weights, scheme.input_activations
            packed = weights is not None and weights.type == "int" and (acts is None or weights.num_bits < 8)
            if not packed:
                continue
            for name, _ in match_named_modules(model, scheme.targets, config.ignore):
                if name.startswith(fam.vision_tower + "."):
                    logger.warning(
                        "The recipe packs the SigLIP vision tower of %s (%s, ...) to %d-bit weights: the checkpoint "
                        "reloads in transformers only after `import qvlm_modifiers` (plain transformers 5.17 fails "
                        "in SiglipPreTrainedModel._init_weights, which reads Linear.weight).",
                        fam.architecture, name, weights.num_bits,
                    )
                    return True
    return False


def _is_saved(model: Any) -> bool:
    name = getattr(model.config, "_name_or_path", "") or ""
    return bool(name) and (Path(name) / "config.json").is_file()


def oneshot(
    model: Any,
    processor: Any = None,
    dataset: Any = None,
    recipe: Any = None,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    sequential_targets: list[str] | None = None,
    data_collator: Any = _UNSET,
    save_compressed: bool = True,
    **kwargs: Any,
):
    """Quantize a VLM with a recipe and save a checkpoint that reloads exactly.

    :param model: a supported VLM (``PreTrainedModel``) or a path to one
    :param processor: its processor (loaded from ``model``'s path when ``None`` and possible)
    :param dataset: calibration data (e.g. :func:`qvlm_modifiers.data.build_calibration_dataset`)
    :param recipe: a recipe path, shipped recipe name, YAML string, Recipe or Modifier(s)
    :param output_dir: where to save (compressed-tensors); nothing is saved when ``None``
    :param overwrite: replace an existing non-empty ``output_dir``
    :param sequential_targets: defaults to the family's decoder layer class when calibrating
    :param data_collator: defaults to :func:`qvlm_modifiers.data.collate_fn` when available
    :param save_compressed: pack weights in the saved checkpoint
    :param kwargs: every other ``llmcompressor.oneshot`` argument; ``use_loss_mask`` defaults to
        True when the recipe has one of this package's Modifiers (they weigh tokens by modality)
    :return: the calibrated model
    """
    import llmcompressor

    from qvlm_modifiers.families import decoder_layer_class_name, get_family
    from qvlm_modifiers.save import check_output_dir, save_pretrained

    out = check_output_dir(output_dir, overwrite=overwrite) if output_dir is not None else None
    recipe = _prepare_recipe(recipe)
    if recipe is None:
        raise RecipeError(
            "No recipe given. Pass recipe= a shipped recipe name (qvlm_modifiers.list_recipes()), "
            "a YAML path, or Modifier instances."
        )

    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model_path = str(model)
        model = AutoModelForImageTextToText.from_pretrained(
            model_path, dtype=kwargs.pop("precision", "auto")
        )
        if processor is None:
            processor = AutoProcessor.from_pretrained(model_path)
    elif isinstance(processor, (str, os.PathLike)):
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(processor))

    get_family(model)  # UnsupportedModelError with the supported list
    _warn_if_reload_needs_our_loader(model, _recipe_modifiers(recipe))

    if processor is None and getattr(model.config, "_name_or_path", ""):
        from transformers import AutoProcessor

        try:  # the model's own directory or hub id
            processor = AutoProcessor.from_pretrained(model.config._name_or_path)
        except Exception:  # noqa: BLE001 - a checkpoint without processor files
            processor = None
    if processor is None and dataset is not None:
        raise CalibrationDataError(
            "Calibration needs the model's processor, but none was given and none could be "
            "loaded from the model's directory. Pass processor=AutoProcessor.from_pretrained(...)."
        )

    if sequential_targets is None and any(
        getattr(m, "requires_calibration_data", False) for m in _recipe_modifiers(recipe)
    ):
        sequential_targets = [decoder_layer_class_name(model)]

    if "use_loss_mask" not in kwargs and dataset is not None:
        from qvlm_modifiers._registry import all_modifiers

        # MBQ / Q-VLM read the per-token modality labels (loss_mask: text/vision) from
        # state.loss_masks; llm-compressor fills it only when asked. Other recipes keep
        # llm-compressor's default (AWQ would otherwise restrict its loss to answer tokens).
        ours = tuple(all_modifiers())
        if any(isinstance(m, ours) for m in _recipe_modifiers(recipe)):
            kwargs["use_loss_mask"] = True

    if data_collator is _UNSET:
        data_collator = "truncation"  # llm-compressor's default
        try:
            from qvlm_modifiers.data import collate_fn
        except ImportError:
            pass
        else:
            data_collator = collate_fn

    # llm-compressor reads the config back from name_or_path: give a never-saved model one.
    original_name = getattr(model.config, "_name_or_path", "")
    config_dir = None
    if not _is_saved(model):
        config_dir = tempfile.mkdtemp(prefix="qvlm-config-")
        model.config.save_pretrained(config_dir)
        model.config._name_or_path = config_dir
    try:
        llmcompressor.oneshot(
            model=model,
            processor=processor,
            dataset=dataset,
            recipe=recipe,
            sequential_targets=sequential_targets,
            data_collator=data_collator,
            save_compressed=save_compressed,
            output_dir=None,  # saved below through our path
            **kwargs,
        )
        if out is not None:
            save_pretrained(model, processor, out, overwrite=overwrite, save_compressed=save_compressed)
    finally:
        if config_dir is not None:
            model.config._name_or_path = original_name
            shutil.rmtree(config_dir, ignore_errors=True)
    return model
