"""The one list of Modifier classes that ``import qvlm_modifiers`` registers with llm-compressor."""

from __future__ import annotations


def all_modifiers() -> list[type]:
    from qvlm_modifiers.lm_scoped import LMAWQModifier, LMSmoothQuantModifier

    classes: list[type] = [LMAWQModifier, LMSmoothQuantModifier]
    try:
        from qvlm_modifiers.mbq.modifier import MBQModifier
    except ImportError as err:  # pragma: no cover - only while the module is being written
        if "qvlm_modifiers.mbq.modifier" not in str(err):
            raise
    else:
        classes.append(MBQModifier)
    try:
        from qvlm_modifiers.qvlm.modifier import QVLMModifier
    except ImportError as err:  # pragma: no cover
        if "qvlm_modifiers.qvlm.modifier" not in str(err):
            raise
    else:
        classes.append(QVLMModifier)
    return classes
