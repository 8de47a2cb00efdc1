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

__all__ = ["in_memory_ignore_entries", "weight_renamings"]


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


