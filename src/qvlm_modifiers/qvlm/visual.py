"""Q-VLM visual-encoder optimization (VEO, Eq. 8-10): learn the vision tower's ranges by SGD.

Paper (Sec. 3.4): with the vision encoder quantized, its "rounding functions" (here: the clipping
ranges of its Linear weights) are optimised by gradient descent on

    L = L_reg + lambda1 * L_ent + lambda2 * L_err                                  (Eq. 10)
    L_ent = sum_k || dE^(n) / dX^(k) || * D(k, k+1)                                 (Eq. 8)
    L_err = || X^v_q - X^v_r || + eta * || X^(n)_q - X^(n)_r ||                     (Eq. 9)

* ``L_reg``: autoregressive next-token loss of the model with the quantized vision tower (on the
  answer tokens when the batch has a ``loss_mask``, else on all non-image tokens);
* ``D(k, k+1)``: the soft conditional entropy of Eq. 4-5 (:func:`soft_dependency`, differentiable)
  between consecutive decoder-layer inputs of the language model;
* the Jacobian weight ``||dE/dX^(k)||`` with ``E = ||X^(n)_q - X^(n)_r||^2`` is the first-order
  approximation the reference code's author describes (issue #18): computed once per batch at the
  starting ranges, normalised to sum to 1, and kept constant (so L is a fixed function of the
  ranges and gradient descent decreases it);
* ``X^v``: the projector output (visual tokens fed to the LM); ``X^(n)``: the LM's last hidden state.
  Both error terms are mean squared errors (so lambda2/eta do not depend on the model width).

The learnable parameters are log-multipliers of each weight range: ``low = low0 * exp(a)``,
``high = high0 * exp(b)`` per qparam (group/channel), starting from the lp-norm ranges. Rounding
uses the straight-through estimator (:func:`ste_round`). Activations of the vision tower are
quantized dynamically per token (no range to learn) in the loop, as at inference.

The paper gives no values for lambda1, lambda2 or eta; our defaults (see ``QVLMModifier``) come
with a sweep on the real evaluation model (``eval/results/smolvlm-tiny/veo_sweep.md``): VEO lowers
the answer KL at every setting tried, and the settings could not be ranked against each other.
"""

from __future__ import annotations

import torch

from qvlm_modifiers.qvlm.entropy import level_grid, level_probabilities

__all__ = [
    "ste_round",
    "fake_quant_range_ste",
    "dynamic_token_fake_quant_ste",
    "soft_dependency",
    "jacobian_weights",
    "veo_objective",
]


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fake_quant_range_ste(
    observed: torch.Tensor, low: torch.Tensor, high: torch.Tensor, num_bits: int, symmetric: bool
) -> torch.Tensor:
    """QDQ of ``observed`` ``(N, *Q, S)`` with per-qparam range ``[low, high]`` (``Q``-shaped),
    differentiable in ``low``/``high`` through STE rounding. Same grid as compressed-tensors'
    ``calculate_qparams`` + ``fake_quantize`` (signed int, range widened to include 0)."""
    qmin, qmax = -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
    low = torch.minimum(low, torch.zeros_like(low)).unsqueeze(-1)
    high = torch.maximum(high, torch.zeros_like(high)).unsqueeze(-1)
    if symmetric:
        scale = torch.maximum(low.abs(), high.abs()) / ((qmax - qmin) / 2)
        zero_point = torch.zeros_like(scale)
    else:
        scale = (high - low) / (qmax - qmin)
        zero_point = torch.clamp(ste_round(qmin - low / scale), qmin, qmax)
    scale = scale.clamp_min(torch.finfo(scale.dtype).eps)
    q = torch.clamp(ste_round(observed / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def dynamic_token_fake_quant_ste(x: torch.Tensor, num_bits: int, symmetric: bool) -> torch.Tensor:
    """Dynamic per-token QDQ (compressed-tensors ``strategy: token, dynamic: true``) with STE."""
    low = x.amin(dim=-1)
    high = x.amax(dim=-1)
    return fake_quant_range_ste(x.unsqueeze(0), low, high, num_bits, symmetric).squeeze(0)


def soft_dependency(h_k: torch.Tensor, h_k1: torch.Tensor, num_levels: int, grid: str = "token") -> torch.Tensor:
    """Differentiable ``D(k, k+1)`` (Eq. 4 with Eq. 5's soft assignment), one tensor pair."""
    low_a, step_a = level_grid(h_k.detach(), num_levels, grid)
    low_b, step_b = level_grid(h_k1.detach(), num_levels, grid)
    pa = level_probabilities(h_k, low_a, step_a, num_levels, "soft")
    pb = level_probabilities(h_k1, low_b, step_b, num_levels, "soft")
    joint = pa.t() @ pb / pa.shape[0]
    marginal = joint.sum(dim=1, keepdim=True)
    cond = joint / marginal.clamp_min(1e-12)
    return -(joint * torch.log(cond.clamp_min(1e-12))).sum()


def jacobian_weights(final_q: torch.Tensor, final_r: torch.Tensor, hidden_q: list[torch.Tensor]) -> torch.Tensor:
    """First-order Jacobian weights of Eq. 8: ``w_k = ||dE/dX^(k)||`` with
    ``E = ||X^(n)_q - X^(n)_r||^2``, for the decoder-layer inputs ``hidden_q``; normalised to sum
    to 1 (so lambda1 weighs an average dependency, in nats). Detached constants."""
    energy = (final_q - final_r).pow(2).sum()
    grads = torch.autograd.grad(energy, hidden_q, retain_graph=True, allow_unused=True)
    norms = torch.stack([g.norm() if g is not None else energy.new_zeros(()) for g in grads]).detach()
    total = norms.sum()
    return norms / total if total > 0 else torch.full_like(norms, 1.0 / max(len(norms), 1))


def veo_objective(
    reg_loss: torch.Tensor,
    hidden_q: list[torch.Tensor],
    final_r: torch.Tensor,
    vision_q: torch.Tensor,
    vision_r: torch.Tensor,
    num_levels: int,
    lambda_ent: float,
    lambda_err: float,
    eta: float,
    weights: torch.Tensor | None = None,
    max_elements: int = 4096,
) -> dict[str, torch.Tensor]:
    """Eq. 8-10 for one batch. ``hidden_q`` = decoder-layer inputs ``X^(0..n-1)`` and the last
    hidden state ``X^(n)`` on the quantized-vision path (in the autograd graph); ``final_r`` /
    ``vision_r`` the FP references. ``weights``: the Jacobian weights of the ``n-1`` links
    (:func:`jacobian_weights` on ``hidden_q[:-2]``, fixed at the starting point so that the
    objective is a fixed function of the ranges); computed here when ``None``. Returns the total,
    its terms and the weights. ``max_elements`` evenly spaced tokens' elements per layer pair
    enter the soft entropy (bounds its cost)."""
    final_q = hidden_q[-1]
    err_final = (final_q - final_r).pow(2).mean()
    err_vision = (vision_q - vision_r).pow(2).mean()
    l_err = err_vision + eta * err_final
    l_ent = reg_loss.new_zeros(())
    links = len(hidden_q) - 2  # D(k, k+1) for decoder-layer inputs k = 0 .. n-2
    if lambda_ent and links > 0:
        if weights is None:
            weights = jacobian_weights(final_q, final_r, hidden_q[:links])
        for k in range(links):
            a = hidden_q[k].reshape(-1, hidden_q[k].shape[-1])
            b = hidden_q[k + 1].reshape(-1, hidden_q[k + 1].shape[-1])
            stride = max(1, a.numel() // max_elements)
            l_ent = l_ent + weights[k] * soft_dependency(a[::stride], b[::stride], num_levels)
    total = reg_loss + lambda_ent * l_ent + lambda_err * l_err
    return {"total": total, "reg": reg_loss.detach(), "ent": l_ent.detach(), "err": l_err.detach(), "weights": weights}
