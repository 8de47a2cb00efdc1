"""Which quantization schemes Q-VLM searches, and what the scheme implies for the Modifier.

* :func:`check_scheme`: Q-VLM searches uniform *integer* ranges: weights per tensor, channel or
  group (a range per ``weight_scale`` entry); input activations either dynamic per token (no static
  range: nothing to search, the A-schemes the recipes ship) or static per tensor (one searched
  ``input_scale``). Output activations are not quantized. The paper's static per-*input-channel*
  activation ranges cannot be factored out of a GEMM's reduction, so no integer kernel nor
  compressed-tensors config can express them; they are not offered.
* :func:`entropy_levels`: M, the number of levels of Eq. 5's soft assignment: those of the
  input-activation quantizer (``2**num_bits``, <= 8 bits), else 16 (= 4-bit levels; weight-only
  schemes have no activation quantizer).
* :func:`ignored_outside_lm`: what stays in full precision besides the scheme's own ``ignore``:
  ``lm_head`` and the vision tower + projector, or only the projector with ``quantize_vision_tower``.
"""

from __future__ import annotations

from collections.abc import Iterable

from compressed_tensors.quantization import QuantizationConfig, QuantizationStrategy, QuantizationType

from qvlm_modifiers.errors import RecipeError

__all__ = ["check_scheme", "entropy_levels", "ignored_outside_lm"]


def check_scheme(config: QuantizationConfig) -> None:
    """Refuse, with what to use instead, a scheme whose ranges Q-VLM cannot search."""
    for scheme in config.config_groups.values():
        w = scheme.weights
        if w is not None and (w.type != QuantizationType.INT or w.strategy not in (
            QuantizationStrategy.TENSOR, QuantizationStrategy.CHANNEL, QuantizationStrategy.GROUP
        )):
            raise RecipeError(
                f"QVLMModifier searches uniform integer weight ranges per tensor/channel/group; "
                f"got weights {w.type}/{w.strategy}. Use an int scheme such as W4A16, W4A4, W8A8 "
                "or int config_groups with strategy tensor/channel/group."
            )
        a = scheme.input_activations
        if a is not None and a.dynamic is False and a.strategy != QuantizationStrategy.TENSOR:
            raise RecipeError(
                f"QVLMModifier: static input activations must be per-tensor (got {a.strategy}). "
                "Use dynamic per-token activations (strategy: token, dynamic: true) or static "
                "per-tensor ones."
            )
        if scheme.output_activations is not None:
            raise RecipeError("QVLMModifier does not quantize output activations; remove output_activations.")


def entropy_levels(config: QuantizationConfig) -> int:
    """M of Eq. 5: ``2**bits`` of the narrowest input-activation quantizer (<= 8 bits), else 16."""
    bits = [s.input_activations.num_bits for s in config.config_groups.values() if s.input_activations is not None]
    if bits and min(bits) <= 8:
        return 2 ** min(bits)
    return 16


def ignored_outside_lm(vision_regexes: Iterable[list[str]], quantize_vision_tower: bool) -> list[str]:
    """``lm_head``, then per family's ``vision_regexes`` (``[vision tower, projector, ...]``) the
    tower and projector, or only what follows the tower with ``quantize_vision_tower``; no repeats."""
    extra = ["lm_head"]
    for regexes in vision_regexes:
        extra.extend(regexes[1:] if quantize_vision_tower else regexes)
    return list(dict.fromkeys(extra))
