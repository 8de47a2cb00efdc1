"""MBQ's per-channel scale search: the alpha grid, the scale formula and the W-A fake-quant candidate.

The search is AWQ's (paper Sec. 3.3 "channel-wise equalization"; reference
``auto_scale.py:_search_module_scale`` L110-199), for weight-only *and* weight-activation modes:

- scales ``s = mean_tokens(|x|) ** alpha``, clamped at 1e-4, normalised by ``sqrt(max(s) * min(s))``
  (no weight-magnitude term, i.e. AWQ's ``duo_scaling=False``); optionally llm-compressor AWQ's
  "duo" form ``s = x_mean ** a / (w_mean ** (1 - a) + 1e-4)`` (``w_mean``: per input channel mean of
  ``|W|`` normalised by each quantization group's max, AWQModifier ``_compute_layer_means``), same
  clamp and normalisation, on AWQ's duo grid (:func:`duo_grid`: the identity plus ``k / (n - 2)``,
  ``k = 0 .. n - 2``: ``n`` candidates in all);
- ``alpha`` on MBQ's grid ``k / n_grid`` for ``k = 0 .. n_grid - 1`` (``n_grid = 20``: 0, 0.05, ...,
  0.95; 1.0 is *not* a candidate), or optionally AWQ's ``k / (n_grid - 1)`` (includes 1.0);
- weight-only candidate: ``Q(W * s) / s`` applied to ``x`` (done by llm-compressor's AWQ loop with the
  follow-up scheme's weight quantizer);
- weight-activation candidate (W4A8 / W8A8, reference ``auto_scale_wa.py`` L92-219 with
  ``qlinear.WALinear``; paper Eq. 14-15): ``Q_w(W * s) @ Q_tok(x / s)`` with per-output-channel
  symmetric int weights and *dynamic per-token symmetric* int activations -- not SmoothQuant's
  closed form ``max|x|^a / max|W|^(1-a)``.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = [
    "AlphaGrid",
    "alpha_grid",
    "duo_grid",
    "activation_scales",
    "duo_scales",
    "candidate_scales",
    "fake_quantize_per_token_symmetric",
    "fake_quantize_per_channel_symmetric",
    "wa_candidate_input",
]

AlphaGrid = Literal["mbq", "awq"]


def alpha_grid(n_grid: int, kind: AlphaGrid = "mbq") -> list[float]:
    """The grid of exponents ``alpha`` searched per mapping.

    ``"mbq"``: ``k / n_grid``, k = 0..n_grid-1 (reference ``auto_scale.py``: ``ratio = k / n_grid``).
    ``"awq"``: ``k / (n_grid - 1)``, k = 0..n_grid-1 (llm-compressor ``AWQModifier`` with
    ``duo_scaling=False``).
    """
    if n_grid < 1 or (kind == "awq" and n_grid < 2):
        raise ValueError(f"n_grid must be >= {2 if kind == 'awq' else 1}, got {n_grid}")
    if kind == "mbq":
        return [k / n_grid for k in range(n_grid)]
    if kind == "awq":
        return [k / (n_grid - 1) for k in range(n_grid)]
    raise ValueError(f"alpha grid must be 'mbq' or 'awq', got {kind!r}")


def duo_grid(n_grid: int, duo_scaling: bool | str) -> list[tuple[float, bool]]:
    """llm-compressor ``AWQModifier._get_grid_search_params`` for ``duo_scaling`` True / ``"both"``.

    ``True``: ``[(0, False)]`` (the identity, ``s = 1``) then ``(k / (n_grid - 2), True)`` for
    ``k = 0 .. n_grid - 2`` (``n_grid`` candidates). ``"both"``: ``m = n_grid // 2`` exponents
    ``k / (m - 1)``, each without and with the weight term.
    """
    if duo_scaling is True:
        if n_grid < 3:
            raise ValueError(f"duo_scaling: true needs n_grid >= 3, got {n_grid}")
        return [(0.0, False)] + [(k / (n_grid - 2), True) for k in range(n_grid - 1)]
    if duo_scaling == "both":
        half = int(n_grid / 2)
        if half < 2:
            raise ValueError(f"duo_scaling: both needs n_grid >= 4, got {n_grid}")
        return [(k / (half - 1), duo) for k in range(half) for duo in (False, True)]
    raise ValueError(f"duo_grid is for duo_scaling true or 'both', got {duo_scaling!r}")


def _normalise(scales: torch.Tensor) -> torch.Tensor:
    scales = scales / (scales.max() * scales.min()).sqrt()
    scales[torch.isinf(scales)] = 1
    scales[torch.isnan(scales)] = 1
    return scales


def duo_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = x_mean ** a / (w_mean ** (1 - a) + 1e-4)``, clamped at 1e-4, normalised as
    :func:`activation_scales` (op for op AWQModifier's duo branch)."""
    scales = (x_mean.pow(alpha) / (w_mean.to(x_mean.device).pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    return _normalise(scales.view(-1))


def candidate_scales(
    x_mean: torch.Tensor, alpha: float, duo: bool = False, w_mean: torch.Tensor | None = None
) -> torch.Tensor:
    """The scales of one grid candidate ``(alpha, duo)`` (what AWQ's loop applies to the weights)."""
    if duo:
        if w_mean is None:
            raise ValueError("a duo-scaling candidate needs the balance layers' w_mean")
        return duo_scales(x_mean, w_mean, alpha)
    return activation_scales(x_mean, alpha)


def activation_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = x_mean ** alpha``, clamped at 1e-4, divided by ``sqrt(max(s) * min(s))``.

    Op for op the formula of llm-compressor's ``AWQModifier._compute_best_scale`` (duo_scaling off)
    and of the reference ``_search_module_scale``, so the W-A hook sees the very scales the AWQ loop
    applies to the weights.
    """
    return _normalise(x_mean.pow(alpha).clamp(min=1e-4).view(-1))


def fake_quantize_per_token_symmetric(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Dynamic symmetric per-token fake quantization (reference ``quantize_activation_per_token_absmax``).

    ``step = max(|x|, over the last dim) / (2^(bits-1) - 1)`` (clamped at 1e-5 as the reference does),
    ``x_q = round(x / step) * step``. The same rule vLLM's dynamic per-token int8 kernels use.
    """
    q_max = 2 ** (bits - 1) - 1
    step = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / q_max
    return (x / step).round().clamp(-q_max, q_max) * step


def fake_quantize_per_channel_symmetric(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel fake quantization of a ``(out, in)`` weight (reference ``WALinear``).

    ``step = max(|w_row|) / (2^(bits-1) - 1)``. The modifier quantizes weights with the follow-up
    scheme's own quantizer instead (what is deployed); this function is the reference's rule, used by
    tests as an independent oracle.
    """
    q_max = 2 ** (bits - 1) - 1
    step = w.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / q_max
    return (w / step).round().clamp(-q_max, q_max) * step


def wa_candidate_input(x: torch.Tensor, scales: torch.Tensor, act_bits: int) -> torch.Tensor:
    """Input that makes a layer holding ``Q_w(W*s)/s`` compute ``Q_w(W*s) @ Q_tok(x/s)``.

    The AWQ loop leaves ``Q_w(W*s)/s`` in the balance layer (that is the weight-only candidate applied
    to ``x``). Feeding it ``s * Q_tok(x / s)`` gives ``(Q_w(W*s)/s) @ (s * Q_tok(x/s)) =
    Q_w(W*s) @ Q_tok(x/s)``: the reference W-A candidate (Eq. 14-15), without copying AWQ's loop.
    """
    s = scales.to(device=x.device, dtype=x.dtype)
    return fake_quantize_per_token_symmetric(x / s, act_bits) * s
