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
(AWQ: 20 steps down to 0.5). ``r = 1`` is min/max, i.e. round-to-nearest, so the chosen error is
never above RTN's on the inputs searched.

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

from qvlm_modifiers.qvlm.ranges import fake_quantize_observed, minmax_range, range_qparams

__all__ = [
    "CLIP_MAX_TOKENS",
    "clip_ratio_grid",
    "clip_input_tokens",
    "group_output_errors",
    "auto_clip_ranges",
    "blend_ratios",
]

# calibration tokens the clip search uses per Linear (AWQ: n_sample_token = 512)
CLIP_MAX_TOKENS = 512
# output channels per chunk of the error computation (memory: chunk * tokens * groups floats)
_OC_CHUNK = 64


def clip_ratio_grid(grid: int = 20, max_shrink: float = 0.5) -> list[float]:
    """AWQ's ratios ``1 - i/grid`` for ``i = 0 .. round(max_shrink * grid)``: 1.0 (min/max) first."""
    if grid < 1 or not 0.0 <= max_shrink < 1.0:
        raise ValueError(f"need grid >= 1 and 0 <= max_shrink < 1, got {grid}, {max_shrink}")
    return [1.0 - i / grid for i in range(int(round(max_shrink * grid)) + 1)]


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


def _grouped_inputs(x: torch.Tensor, observed_shape: torch.Size) -> torch.Tensor:
    """``x`` ``(T, in)`` as ``(T, G, S)`` matching the observed weight ``(1, O, G, S)``."""
    _, _, groups, size = observed_shape
    if groups * size != x.shape[-1]:
        raise ValueError(f"inputs have {x.shape[-1]} features, weight groups {groups} x {size}")
    return x.reshape(x.shape[0], groups, size)


def group_output_errors(
    observed: torch.Tensor, x_grouped: torch.Tensor, low: torch.Tensor, high: torch.Tensor, args: QuantizationArgs
) -> torch.Tensor:
    """Per ``(o, g)``: the mean over tokens of ``(sum_{s in g} (W - Q(W))_{o,s} X_{t,s})^2``, the
    squared error of group ``g``'s contribution to output ``o`` (the term of AWQ Eq. 4), with ``Q``
    the quantizer of the range ``(low, high)`` (each ``(O, G)``). ``observed`` is ``(1, O, G, S)``,
    ``x_grouped`` ``(T, G, S)``."""
    scale, zero_point = range_qparams(low, high, args)
    dq = fake_quantize_observed(observed, scale, zero_point, args)
    delta = (observed - dq)[0]  # (O, G, S)
    out = torch.empty(delta.shape[:2], dtype=torch.float32, device=delta.device)
    for o in range(0, delta.shape[0], _OC_CHUNK):
        partial = torch.einsum("tgs,ogs->tog", x_grouped, delta[o:o + _OC_CHUNK])  # (T, o, G)
        out[o:o + _OC_CHUNK] = partial.pow(2).mean(dim=0)
    return out


@torch.no_grad()
def auto_clip_ranges(
    observed: torch.Tensor, inputs: torch.Tensor, args: QuantizationArgs, ratios: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AWQ's per-group clip search (module docstring): for every ``(o, g)`` the ratio of ``ratios``
    with the smallest :func:`group_output_errors`; ties keep the earlier ratio (put 1.0 first so
    that a group no clip improves stays at min/max).

    :param observed: the weight as ``flatten_for_ranges`` gives it, ``(1, O, G, S)`` (group / channel
        strategies; channel is ``G = 1``)
    :param inputs: the Linear's inputs ``(T, in_features)`` (:func:`clip_input_tokens`)
    :returns: ``(ratio, low, high)``, each ``(O, G)``: the chosen ratio and range per group
    """
    if args.strategy not in (QuantizationStrategy.GROUP, QuantizationStrategy.CHANNEL) or observed.dim() != 4:
        raise ValueError(f"auto_clip_ranges needs group or channel weight ranges, got {args.strategy}")
    observed = observed.float()
    x = _grouped_inputs(inputs.to(observed.device).float(), observed.shape)
    low, high = minmax_range(observed)
    best_err = torch.full_like(low, float("inf"))
    best_ratio = torch.ones_like(low)
    for r in ratios:
        err = group_output_errors(observed, x, low * r, high * r, args)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, float(r)), best_ratio)
    return best_ratio, low * best_ratio, high * best_ratio


def blend_ratios(ratio: torch.Tensor, strength: float) -> torch.Tensor:
    """The per-group ratios moved toward 1.0 (min/max): ``1 - strength * (1 - ratio)``; ``strength``
    1 = AWQ's choice, 0 = no clipping. The block search chooses among strengths per Linear."""
    return 1.0 - strength * (1.0 - ratio)
