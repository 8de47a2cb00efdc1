"""Compatibility name: ``qvlm_modifiers.qvlm.modifier`` is where ``QVLMModifier`` used to live.

The Modifier is now in :mod:`qvlm_modifiers.qvlm.base` (recipe fields and lifecycle), its math and
plumbing in the modules beside it. Import it as ``from qvlm_modifiers.qvlm import QVLMModifier``;
this module keeps older imports (``qvlm_modifiers._registry``, user code) working. Why the paper's
static per-input-channel activation ranges are not offered (the shipped W4A4/W6A6/W8A8 recipes point
here): see :mod:`qvlm_modifiers.qvlm.scheme`.
"""

from qvlm_modifiers.qvlm.base import QVLMModifier
from qvlm_modifiers.qvlm.metadata import METADATA_ATTRIBUTE

__all__ = ["QVLMModifier", "METADATA_ATTRIBUTE"]
