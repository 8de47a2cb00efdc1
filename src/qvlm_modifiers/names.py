"""Module names on disk vs in memory: the one home of that mapping.

transformers 5 saves several VLMs under their legacy checkpoint names (LLaVA: ``vision_tower.*``,
``multi_modal_projector.*``) while the model in memory calls the same modules
``model.vision_tower.*``; compressed-tensors writes ``quantization_config.ignore`` with the on-disk
names and transformers matches it against the in-memory ones. The save path
(:mod:`qvlm_modifiers.save`) writes both forms; the packed loader maps on-disk entries of checkpoints
written elsewhere back to in-memory names (:func:`in_memory_ignore_entries`).
"""

from __future__ import annotations

import re

from torch import nn

__all__ = [
    "in_memory_ignore",
    "checkpoint_names",
    "reload_safe_ignore",
    "in_memory_ignore_entries",
    "weight_renamings",
]


def in_memory_ignore_entries(model: nn.Module, ignore: list[str]) -> list[str]:
    """``ignore`` plus the in-memory form of every entry that matches no module as written.

    compressed-tensors 0.19 writes on-disk names (``vision_tower.x``) while the model being loaded
    has in-memory names (``model.vision_tower.x``). An entry that already matches is kept as is.
    For one that matches nothing: plain names go through the model's checkpoint conversion
    mapping (transformers ``WeightRenaming``s, on-disk -> in-memory) and otherwise match modules
    whose name ends with ``"." + entry``; ``re:`` patterns get the same renaming applied to their
    literal prefix, else are also tried after an arbitrary ``prefix.``. Class-name entries are
    left alone. Entries are only added, never removed (unmatched entries are harmless)."""
    names = [n for n, _ in model.named_modules() if n]
    name_set = set(names)
    renamings = weight_renamings(model)
    out = list(dict.fromkeys(ignore))
    for entry in ignore:
        if entry.startswith("re:"):
            body = entry[3:]
            if any(re.match(body, n) for n in names):
                continue
            for src, dst in renamings:
                if re.match(src, body):
                    candidate = "re:" + re.sub(src, dst, body, count=1)
                    if candidate not in out and any(re.match(candidate[3:], n) for n in names):
                        out.append(candidate)
            prefixed = r"re:(?:.*\.)?" + body
            if prefixed not in out and any(re.match(prefixed[3:], n) for n in names):
                out.append(prefixed)
            continue
        if entry in name_set or "." not in entry and not any(n.endswith("." + entry) for n in names):
            continue  # exact name, or a class name such as "Linear"
        added = False
        for src, dst in renamings:
            candidate = re.sub(src, dst, entry, count=1)
            if candidate != entry and candidate in name_set and candidate not in out:
                out.append(candidate)
                added = True
        if not added:
            for n in names:
                if n.endswith("." + entry) and n not in out:
                    out.append(n)
    return out


def weight_renamings(model: nn.Module) -> list[tuple[str, str]]:
    """(source regex, target) pairs of the model's on-disk -> in-memory key renamings."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        transforms = get_model_conversion_mapping(model, add_legacy=False)
    except Exception:  # older/newer transformers without this API: suffix matching still works
        return []
    pairs = []
    for t in transforms:
        if isinstance(t, WeightRenaming) and len(t.source_patterns) == 1 and len(t.target_patterns) == 1:
            pairs.append((t.source_patterns[0], t.target_patterns[0]))
    return pairs


def in_memory_ignore(model: nn.Module) -> list[str]:
    """In-memory names of every module that a reload would quantize but that is not quantized.

    This is the exact complement of what transformers' reload does: ``apply_quantization_config``
    quantizes each module that matches a config group's ``targets`` (compressed-tensors
    ``is_match``: names, ``re:`` regexes, or class names along the MRO) and not ``ignore``. So every
    unquantized module that matches the targets of the model's schemes is listed here.

    This is also wider than upstream's rule, which only lists modules whose *exact* class name
    was quantized somewhere: a ``Linear`` subclass such as the
    ``NonDynamicallyQuantizableLinear`` inside SigLIP's attention-pooling head
    (LLaVA-OneVision's vision tower) matches ``targets: [Linear]`` on reload but was never
    written to ``ignore``, so the reload tried to quantize it and failed.
    """
    from compressed_tensors.quantization.utils import is_module_quantized
    from compressed_tensors.utils.match import is_match

    targets: list[str] = []
    for _, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None:
            targets.extend(t for t in scheme.targets if t not in targets)
    if not targets:
        return []
    return [
        name
        for name, module in model.named_modules()
        if name and not is_module_quantized(module) and is_match(name, module, targets)
    ]


def checkpoint_names(model: nn.Module, names: list[str]) -> list[str]:
    """On-disk (checkpoint) names of the modules ``names``, renamed exactly as transformers'
    ``save_pretrained`` renames their weights (``revert_weight_conversion``: the conversions the
    model was loaded with, or its architecture's default ones for a model built in memory)."""
    import torch

    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # pragma: no cover - other transformers versions
        return list(names)
    result = []
    for name in names:
        try:
            renamed = list(revert_weight_conversion(model, {f"{name}.weight": torch.empty(0)}))
        except Exception:  # noqa: BLE001 - a converter that needs real tensors: keep the name
            renamed = []
        if len(renamed) == 1 and renamed[0].endswith(".weight"):
            result.append(renamed[0][: -len(".weight")])
        else:
            result.append(name)
    return result


def reload_safe_ignore(on_disk_ignore: list[str], in_memory: list[str]) -> list[str]:
    """``on_disk_ignore`` followed by the in-memory names it lacks (order kept, no duplicates)."""
    result = list(dict.fromkeys(on_disk_ignore))
    seen = set(result)
    for name in in_memory:
        if name not in seen:
            result.append(name)
            seen.add(name)
    return result
