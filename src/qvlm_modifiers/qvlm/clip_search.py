"""Activation-aware per-group weight clipping (AWQ's ``auto_clip``), the weight candidates of Q-VLM's search.

Not in the Q-VLM paper. The paper's weight candidates are one percentile of the FP distribution per
Linear (Sec. 3.3); at W4A16 on 64/128-weight groups that is an order statistic of each group and
adds error (issue #24: Q-VLM W4A16 fell below round-to-nearest). AWQ (Lin et al., MLSys 2024,
``auto_clip_layer``) instead chooses, per output channel and input group, the clip ratio ``r`` of
the group's min/max range that minimises the error of that group's *contribution to the layer
output* on calibration inputs::

    r*_{o,g} = argmin_{r in grid} || sum_{s in g} (W_{o,s} - Q_r(W_{o,s})) X_{s,t} ||^2_t      (AWQ Eq. 4, per group)

with ``Q_r`` the uniform quantizer of the range ``[r * min_{o,g}, r * max_{o,g}]``. The cross terms
between groups of one output channel are ignored (as AWQ does), so every ``(o, g)`` is an
independent 1-D search. The grid is ``r = 1 - i / grid`` for ``i = 0 .. max_shrink * grid``
(20 steps down to 0.5, end point included). ``r = 1`` is min/max, i.e. round-to-nearest, so the
chosen error is never above RTN's on the inputs searched. The grid and the search loop are AWQ's,
shared with MBQ (:mod:`qvlm_modifiers.auto_clip`); what is Q-VLM's here is the candidate (the range
shrink ``Q_r`` above, through the compressed-tensors qparams of :mod:`~qvlm_modifiers.qvlm.ranges`),
the input tokens, and :func:`blend_ratios`.

Inputs: the Linear's calibration inputs with token position 0 left out (:func:`clip_input_tokens`):
the attention-sink token carries activations 100x the others' in later layers, and AWQ's error would
be that one token's.

Pure functions on tensors shaped like :func:`~qvlm_modifiers.qvlm.ranges.flatten_for_ranges` gives
them; the Modifier turns the chosen ranges into candidates (:mod:`~qvlm_modifiers.qvlm.range_variables`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy

from qvlm_modifiers.auto_clip import clip_ratios, search_group_clip
from qvlm_modifiers.qvlm.ranges import fake_quantize_observed, minmax_range, range_qparams

__all__ = [
    "CLIP_MAX_TOKENS",
    "clip_ratio_grid",
    "clip_input_tokens",
    "auto_clip_ranges",
    "blend_ratios",
]

# calibration tokens the clip search uses per Linear (AWQ: n_sample_token = 512)
CLIP_MAX_TOKENS = 512


def clip_ratio_grid(grid: int = 20, max_shrink: float = 0.5) -> list[float]:
    """AWQ's ratios ``1 - i/grid`` for ``i = 0 .. round(max_shrink * grid)``: 1.0 (min/max) first, the
    end point included (:func:`~qvlm_modifiers.auto_clip.clip_ratios` with ``include_end=True``)."""
    return clip_ratios(grid, max_shrink, include_end=True)


def clip_input_tokens(
    inputs: Sequence[torch.Tensor], exclude_first: bool = True, max_tokens: int = CLIP_MAX_TOKENS
) -> torch.Tensor:
    """The Linear's calibration inputs as ``(tokens, in_features)`` float32: per batch ``(B, L, H)``
    the positions ``1..L-1`` (``exclude_first``: position 0, the attention sink, left out), then at
    most ``max_tokens`` rows evenly spaced over all batches."""
    rows = []
    for x in inputs:
        x = x.detach()
        if exclude_first and x.dim() >= 3 and x.shape[-2] > 1:
            x = x[..., 1:, :]
        rows.append(x.reshape(-1, x.shape[-1]).float())
    flat = torch.cat(rows, dim=0)
    if flat.shape[0] > max_tokens:
        idx = torch.linspace(0, flat.shape[0] - 1, max_tokens, device=flat.device).long()
        flat = flat[idx]
    return flat


@torch.no_grad()
def auto_clip_ranges(
    observed: torch.Tensor, inputs: torch.Tensor, args: QuantizationArgs, ratios: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AWQ's per-group clip search (module docstring, :func:`~qvlm_modifiers.auto_clip.search_group_clip`):
    for every ``(o, g)`` the ratio of ``ratios`` whose shrunk range ``[r * min, r * max]`` gives the
    smallest mean squared error of the group's output contribution; ties keep the earlier ratio (put
    1.0 first so that a group no clip improves stays at min/max).

    :param observed: the weight as ``flatten_for_ranges`` gives it, ``(1, O, G, S)`` (group / channel
        strategies; channel is ``G = 1``)
    :param inputs: the Linear's inputs ``(T, in_features)`` (:func:`clip_input_tokens`)
    :returns: ``(ratio, low, high)``, each ``(O, G)``: the chosen ratio and range per group
    """
    if args.strategy not in (QuantizationStrategy.GROUP, QuantizationStrategy.CHANNEL) or observed.dim() != 4:
        raise ValueError(f"auto_clip_ranges needs group or channel weight ranges, got {args.strategy}")
    _, _, groups, size = observed.shape
    if groups * size != inputs.shape[-1]:
        raise ValueError(f"inputs have {inputs.shape[-1]} features, weight groups {groups} x {size}")

    def shrink_range(w: torch.Tensor, ratio: float) -> torch.Tensor:
        """``Q_r``: each group quantized with the range ``[r * min, r * max]`` (compressed-tensors qparams)."""
        low, high = minmax_range(w[None])
        scale, zero_point = range_qparams(low * ratio, high * ratio, args)
        return fake_quantize_observed(w[None], scale, zero_point, args)[0]

    # the error from the groups' second moments (one S x S matrix per group, not 512 tokens per
    # candidate) and every output row at once: one fake-quantization per ratio
    ratio, _ = search_group_clip(
        observed[0].float(), inputs.reshape(-1, groups, size), ratios, shrink_range,
        rows_per_chunk=observed.shape[1], error="gram",
    )
    low, high = minmax_range(observed.float())
    return ratio, low * ratio, high * ratio


def blend_ratios(ratio: torch.Tensor, strength: float) -> torch.Tensor:
    """The per-group ratios moved toward 1.0 (min/max): ``1 - strength * (1 - ratio)``; ``strength``
    1 = AWQ's choice, 0 = no clipping. The block search chooses among strengths per Linear."""
    return 1.0 - strength * (1.0 - ratio)
