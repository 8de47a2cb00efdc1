"""MBQ (modality-balanced quantization, CVPR'25) for llm-compressor, one module per paper idea.

- :mod:`~qvlm_modifiers.mbq.sensitivity`: the gradient pass (vision/text sensitivity per layer),
  also usable standalone: :func:`compute_modality_sensitivity`
- :mod:`~qvlm_modifiers.mbq.loss`: the modality-weighted reconstruction loss (Eq. 16-17)
- :mod:`~qvlm_modifiers.mbq.scale_search`: alpha grid, scale formula (activation-only or AWQ's duo
  form), W-A fake-quant candidate
- :mod:`~qvlm_modifiers.mbq.clip_search`: AWQ ``auto_clip``-style clip search, token-weighted
- :mod:`~qvlm_modifiers.mbq.diagnostics`: per-mapping choices and losses for the log and the run record
- :mod:`~qvlm_modifiers.mbq.modifier`: :class:`MBQModifier` (recipe key ``MBQModifier``)
"""

from qvlm_modifiers.mbq.sensitivity import ModalitySensitivity, compute_modality_sensitivity

__all__ = ["MBQModifier", "ModalitySensitivity", "compute_modality_sensitivity"]


def __getattr__(name):
    if name == "MBQModifier":  # lazy: keeps `import qvlm_modifiers.mbq.sensitivity` light
        from qvlm_modifiers.mbq.modifier import MBQModifier

        return MBQModifier
    raise AttributeError(name)
