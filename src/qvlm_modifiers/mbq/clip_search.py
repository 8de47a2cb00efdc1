"""Activation-aware weight clipping after the scale search (AWQ's ``auto_clip``), token-weighted for MBQ.

The search itself is AWQ's, shared with Q-VLM (:mod:`qvlm_modifiers.auto_clip`): for every output row
``c`` and input group ``G`` of the (scaled) weight ``W``, the clipping threshold
``m = ratio * max|W[c, G]|`` minimizing the group's output error on calibration tokens ``x_n``

    err(c, G, m) = sum_n w_n * ( x_n[G] . W[c, G]  -  x_n[G] . Q(clamp(W[c, G], -m, m)) )**2

is kept, for ``ratio`` in AWQ's ``1 - i / n_grid``, ``i < max_shrink * n_grid`` (1.0, 0.95, ..,
0.55; :func:`~qvlm_modifiers.auto_clip.clip_ratios`). ``Q`` quantizes each group from its own
(clamped) min/max. What is MBQ's here: the token weights. AWQ's are all 1 (``w_n = 1``, 512 strided
tokens); MBQ's are the modality weights of its reconstruction loss (Eq. 16-17: text
``text_weight``, vision ``r``, ignored 0), see :func:`modality_token_weights`. MBQ with uniform
weights therefore *is* AWQ's clip search, which makes the two sides of the MBQ-vs-AWQ comparison
use the same clipping.

Departures from ``auto_clip``: tokens are sampled per modality (``n`` per modality, strided) and
reweighted by ``count / n`` so the sample estimates the full-calibration sum (AWQ strides over all
tokens, which on VLM data would keep almost only vision tokens); the quantizer is the follow-up
scheme's own (what gets deployed), passed in as ``fake_quant``; the error of every candidate is
computed from each group's token-weighted input second moment, built once per group instead of a
sum over the tokens per candidate (``error="gram"``: the same objective up to float rounding; as
Q-VLM's).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qvlm_modifiers.auto_clip import clip_ratios, search_group_clip

__all__ = ["clip_ratios", "search_clip", "apply_clip", "modality_token_weights", "strided_sample"]

FakeQuant = Callable[[torch.Tensor], torch.Tensor]


def strided_sample(n_total: int, n_keep: int) -> torch.Tensor:
    """Indices of ``min(n_total, n_keep)`` tokens spread evenly over ``range(n_total)`` (AWQ strides)."""
    if n_total <= n_keep:
        return torch.arange(n_total)
    return torch.linspace(0, n_total - 1, n_keep).round().long()


def modality_token_weights(
    is_vision: torch.Tensor,
    text_count: int,
    vision_count: int,
    vision_weight: float,
    text_weight: float = 1.0,
    normalization: str = "pooled",
) -> torch.Tensor:
    """Per sampled token weight ``w_n`` for :func:`search_clip`, from the MBQ loss's weights.

    :param is_vision: boolean per sampled token (the others are text)
    :param text_count: text tokens in the full calibration set (the sample is reweighted to it)
    :param vision_count: vision tokens in the full calibration set
    :param normalization: ``"pooled"`` (each token counts ``weight``; the MBQ MAE loss, and AWQ with
        weights 1) or ``"per_modality"`` (each modality averaged over its own count; the MBQ MSE
        loss). The argmin is unchanged by a common factor, so totals are not divided out.
    """
    is_vision = is_vision.bool()
    n_vision = int(is_vision.sum())
    n_text = is_vision.numel() - n_vision
    weights = torch.zeros(is_vision.shape, dtype=torch.float32)
    if normalization == "pooled":
        if n_text:
            weights[~is_vision] = text_weight * text_count / n_text
        if n_vision:
            weights[is_vision] = vision_weight * vision_count / n_vision
    elif normalization == "per_modality":
        if n_text:
            weights[~is_vision] = text_weight / n_text
        if n_vision:
            weights[is_vision] = vision_weight / n_vision
    else:
        raise ValueError(f"normalization must be 'pooled' or 'per_modality', got {normalization!r}")
    return weights


@torch.no_grad()
def search_clip(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    token_weights: torch.Tensor,
    group_size: int,
    fake_quant: FakeQuant,
    ratios: list[float],
    rows_per_chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (output row, input group) clipping threshold minimizing the token-weighted output error.

    :param weight: ``(out, in)`` weight, already scaled (``W * s``)
    :param inputs: ``(tokens, in)`` the layer's inputs for that weight (``x / s``)
    :param token_weights: ``(tokens,)`` non-negative weights ``w_n``
    :param group_size: input channels per quantization group (``in`` for per-channel)
    :param fake_quant: quantize-dequantize of a ``(rows, group_size)`` tensor, each row from its
        own min/max (the follow-up scheme's quantizer)
    :param ratios: candidate ``m / max|W[c, G]|``; the first minimum wins (AWQ's ``err < best``)
    :param rows_per_chunk: output rows per step; each step holds ``rows * in`` floats per candidate
        (the Gram form does not scale with the tokens)
    :return: ``(max_val, ratio_index)``, both ``(out, in // group_size)``
    """
    out_f, in_f = weight.shape
    if in_f % group_size:
        raise ValueError(f"in_features {in_f} is not a multiple of group_size {group_size}")
    if inputs.shape[-1] != in_f or inputs.shape[0] != token_weights.shape[0]:
        raise ValueError(
            f"inputs {tuple(inputs.shape)} / token_weights {tuple(token_weights.shape)} do not match the "
            f"weight's {in_f} input channels"
        )
    n_groups = in_f // group_size

    def clamp_then_quantize(w: torch.Tensor, ratio: float) -> torch.Tensor:
        """AWQ's candidate: each group clamped to ``+-ratio * max|W[c, G]|``, then the scheme's fake-quant."""
        max_val = w.abs().amax(dim=-1, keepdim=True) * ratio
        return fake_quant(torch.clamp(w, -max_val, max_val).reshape(-1, group_size)).reshape(w.shape)

    grouped = weight.float().reshape(out_f, n_groups, group_size)
    ratio, idx = search_group_clip(
        grouped, inputs.reshape(-1, n_groups, group_size), ratios, clamp_then_quantize,
        token_weights=token_weights, rows_per_chunk=rows_per_chunk, error="gram",
    )
    return grouped.abs().amax(dim=-1) * ratio, idx


def apply_clip(
    weight: torch.Tensor, max_val: torch.Tensor, group_size: int, scales: torch.Tensor | None = None
) -> torch.Tensor:
    """``clamp(W[c, G], -max_val[c, G], max_val[c, G])`` per group (AWQ ``apply_clip``); same dtype.

    With ``scales`` (the per-input-channel ``s`` of the scale search), ``weight`` is the *unscaled*
    ``W`` and ``max_val`` was searched on ``W * s``: the result is ``clamp(W, -m / s, m / s)``, whose
    product with ``s`` is ``clamp(W * s, -m, m)`` (``s > 0``), so the scaling applied afterwards
    yields the clipped scaled weight.
    """
    bound = max_val.to(weight.device, torch.float32).repeat_interleave(group_size, dim=1)
    if scales is not None:
        bound = bound / scales.to(weight.device, torch.float32).view(1, -1)
    return torch.clamp(weight.float(), -bound, bound).to(weight.dtype)
