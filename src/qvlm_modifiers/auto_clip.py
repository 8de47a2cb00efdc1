"""AWQ's activation-aware per-group weight clip search (``auto_clip``), shared by MBQ and Q-VLM.

AWQ (Lin et al., MLSys 2024) measures a quantized weight by the error it causes in the layer's
output, ``L = || Q(W) X - W X ||^2`` (the objective of its Eq. 4). Its released code
(``awq/quantize/auto_clip.py``) applies that objective to clipping: for every output row ``c`` and
input group ``G`` of ``W`` it keeps the clip ratio ``r`` whose dequantized group ``W_r[c, G]``
minimises the squared error of that group's contribution to output ``c`` on calibration tokens
``x_n``::

    r*[c, G] = argmin_{r in grid}  sum_n  w_n * ( x_n[G] . (W[c, G] - W_r[c, G]) )**2

Cross terms between the groups of one row are ignored (as AWQ does), so every ``(c, G)`` is an
independent 1-D search over ``grid = 1.0, 1 - 1/n_grid, ...`` (:func:`clip_ratios`). Ratio 1.0 is
"no clipping" and comes first, and ties keep the earlier ratio, so the search never does worse on
its tokens than not clipping. AWQ weights every token 1 (``w_n = 1``).

The sum over tokens can be taken once, before the search: with the per-group second moment
``H_G = sum_n w_n x_n[G] x_n[G]^T`` (``S x S``, :func:`group_input_gram`) the objective is the
quadratic form ``d^T H_G d`` of ``d = W[c, G] - W_r[c, G]`` (:func:`group_output_error_gram`): the
same number up to float rounding, at ``S`` instead of ``tokens`` multiply-adds per weight and ratio
(8x fewer for AWQ's 512 tokens on 64-weight groups). ``error="gram"`` selects it.

This module is the common math: the ratio grid and the argmin loop (:func:`search_group_clip`).
What a ratio does to a group is the caller's ``dequantize(group, r)``, which is where the two users
differ:

* MBQ (:mod:`qvlm_modifiers.mbq.clip_search`): AWQ's own candidate, ``W`` clamped to
  ``+-r * max|W[c, G]|`` then fake-quantized from its own min/max; ``w_n`` are MBQ's modality weights.
* Q-VLM (:mod:`qvlm_modifiers.qvlm.clip_search`): the group's quantization range
  ``[min, max]`` shrunk to ``[r * min, r * max]``; uniform ``w_n`` (mean over tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

__all__ = [
    "Dequantize",
    "clip_ratios",
    "group_input_gram",
    "group_output_error",
    "group_output_error_gram",
    "search_group_clip",
]

# (rows, groups, group_size) float32 weight and a ratio -> the dequantized candidate, same shape
Dequantize = Callable[[torch.Tensor, float], torch.Tensor]


def clip_ratios(n_grid: int = 20, max_shrink: float = 0.5, include_end: bool = False) -> list[float]:
    """AWQ's candidate ratios ``1 - i / n_grid``, 1.0 first, down toward ``1 - max_shrink``.

    ``include_end=False`` is AWQ's code, ``range(int(max_shrink * n_grid))``: 1.0 .. 0.55 for the
    defaults, the end point left out (at least 1.0 is kept). ``include_end=True`` goes to
    ``i = round(max_shrink * n_grid)`` inclusive: 1.0 .. 0.5 (Q-VLM's grid).
    """
    if n_grid < 1 or not 0.0 <= max_shrink < 1.0:
        raise ValueError(f"clip grid needs n_grid >= 1 and 0 <= max_shrink < 1, got {n_grid}, {max_shrink}")
    if include_end:
        steps = int(round(max_shrink * n_grid)) + 1
    else:
        steps = max(1, int(max_shrink * n_grid))
    return [1.0 - i / n_grid for i in range(steps)]


def group_output_error(
    x: torch.Tensor, weight: torch.Tensor, dequantized: torch.Tensor, token_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Per ``(c, G)``: ``sum_n w_n (x_n[G] . (W - W_r)[c, G])**2``, the squared error of group ``G``'s
    contribution to output ``c`` (the objective above); the mean over tokens when ``token_weights``
    is None. ``x`` is ``(tokens, G, S)``, ``weight`` and ``dequantized`` ``(rows, G, S)``."""
    partial = torch.einsum("tgs,cgs->tcg", x, weight - dequantized).pow(2)  # (tokens, rows, G)
    if token_weights is None:
        return partial.mean(dim=0)
    return torch.einsum("tcg,t->cg", partial, token_weights)


def group_input_gram(x: torch.Tensor, token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per group ``G``: ``H_G = sum_n w_n x_n[G]^T x_n[G]`` (``(G, S, S)``), the mean over tokens when
    ``token_weights`` is None, so that ``d^T H_G d`` is :func:`group_output_error`'s value.
    ``x`` is ``(tokens, G, S)``."""
    if token_weights is None:
        return torch.einsum("tgs,tgu->gsu", x, x) / x.shape[0]
    xg = x.transpose(0, 1)  # (G, tokens, S): one batched matmul (the 3-operand einsum is ~9x slower)
    return torch.bmm((xg * token_weights[None, :, None]).transpose(1, 2), xg)


def group_output_error_gram(gram: torch.Tensor, weight: torch.Tensor, dequantized: torch.Tensor) -> torch.Tensor:
    """:func:`group_output_error` from the groups' second moments ``gram`` (:func:`group_input_gram`):
    per ``(c, G)`` the quadratic form ``d^T H_G d`` of ``d = (W - W_r)[c, G]``."""
    d = weight - dequantized
    return (torch.einsum("cgs,gsu->cgu", d, gram) * d).sum(dim=-1)


@torch.no_grad()
def search_group_clip(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    ratios: Sequence[float],
    dequantize: Dequantize,
    token_weights: torch.Tensor | None = None,
    rows_per_chunk: int = 256,
    error: Literal["tokens", "gram"] = "tokens",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ratio of ``ratios`` minimising :func:`group_output_error` for every ``(row, group)``.

    :param weight: ``(out, groups, group_size)``, the weight the clip is searched on
    :param inputs: ``(tokens, groups, group_size)``, the layer's inputs for it
    :param ratios: the candidates, 1.0 first (:func:`clip_ratios`); the first minimum wins (``<``)
    :param dequantize: ``dequantize(w, r)``: a ``(rows, groups, group_size)`` float32 chunk of
        ``weight`` as ratio ``r`` dequantizes it (the method's clip rule and quantizer)
    :param token_weights: ``(tokens,)`` non-negative ``w_n``; None: uniform (mean over tokens)
    :param rows_per_chunk: output rows per step (memory: ``rows * tokens * groups`` floats with
        ``error="tokens"``, ``rows * groups * group_size`` with ``"gram"``)
    :param error: ``"tokens"``: the error summed over the tokens for every candidate (AWQ's code);
        ``"gram"``: from the groups' second moments, computed once (:func:`group_output_error_gram`;
        the same objective up to float rounding, so a near-tie may resolve the other way)
    :return: ``(ratio, index)``, each ``(out, groups)``: the chosen ratio (float32) and its index in
        ``ratios`` (1.0 and 0 where no candidate has a finite error)
    """
    if weight.dim() != 3 or inputs.dim() != 3 or inputs.shape[1:] != weight.shape[1:]:
        raise ValueError(f"weight {tuple(weight.shape)} / inputs {tuple(inputs.shape)} are not (out|tokens, G, S)")
    x = inputs.to(weight.device, torch.float32)
    tw = None if token_weights is None else token_weights.to(weight.device, torch.float32)
    if error not in ("tokens", "gram"):
        raise ValueError(f"error must be 'tokens' or 'gram', got {error!r}")
    gram = group_input_gram(x, tw) if error == "gram" else None
    best_ratio, best_idx = [], []
    for start in range(0, weight.shape[0], rows_per_chunk):
        w = weight[start : start + rows_per_chunk].float()
        min_err = torch.full(w.shape[:2], float("inf"), device=w.device)
        ratio = torch.ones(w.shape[:2], device=w.device)
        idx = torch.zeros(w.shape[:2], dtype=torch.long, device=w.device)
        for i, r in enumerate(ratios):
            dequantized = dequantize(w, float(r)).float()
            if gram is None:
                err = group_output_error(x, w, dequantized, tw)
            else:
                err = group_output_error_gram(gram, w, dequantized)
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            ratio = torch.where(better, torch.full_like(ratio, float(r)), ratio)
            idx = torch.where(better, torch.full_like(idx, i), idx)
        best_ratio.append(ratio)
        best_idx.append(idx)
    return torch.cat(best_ratio), torch.cat(best_idx)
