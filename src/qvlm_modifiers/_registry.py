"""The one list of Modifier classes that ``import qvlm_modifiers`` registers with llm-compressor."""

from __future__ import annotations


def all_modifiers() -> list[type]:
    from qvlm_modifiers.lm_scoped import LMAWQModifier, LMSmoothQuantModifier
    from qvlm_modifiers.mbq.modifier import MBQModifier
    from qvlm_modifiers.qvlm.modifier import QVLMModifier

    return [LMAWQModifier, LMSmoothQuantModifier, MBQModifier, QVLMModifier]
