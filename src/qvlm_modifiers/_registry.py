"""The one list of this package's Modifiers, and their registration with llm-compressor.

Registration uses llm-compressor's public extension point (``ModifierFactory.register``), so YAML
recipes name our Modifiers like built-ins and compose them with llm-compressor's own.
"""

from __future__ import annotations

__all__ = ["all_modifiers", "register_modifiers"]


def all_modifiers() -> list[type]:
    from qvlm_modifiers.lm_scoped import LMAWQModifier, LMSmoothQuantModifier
    from qvlm_modifiers.mbq.modifier import MBQModifier
    from qvlm_modifiers.qvlm import QVLMModifier

    return [LMAWQModifier, LMSmoothQuantModifier, MBQModifier, QVLMModifier]


def register_modifiers() -> list[str]:
    """Register this package's Modifiers with llm-compressor (idempotent). Returns their names."""
    from llmcompressor.modifiers.factory import ModifierFactory

    names = []
    for cls in all_modifiers():
        ModifierFactory.register(cls.__name__, cls)
        names.append(cls.__name__)
    return names
