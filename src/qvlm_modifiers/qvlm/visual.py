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

:func:`optimize_vision_encoder` is the training loop (Adam over the calibration set, the whole
model in the graph, only the log-multipliers trainable). It runs before llm-compressor's sequential
pass (which cannot backpropagate through the whole model) and writes the learned ranges as standard
``weight_scale`` / ``weight_zero_point``, so the saved checkpoint needs nothing of VEO.

The paper gives no values for lambda1, lambda2 or eta; our defaults (see ``QVLMModifier``) come
with a sweep on the real evaluation model (``eval/results/smolvlm-tiny/veo_sweep.md``): VEO lowers
the answer KL at every setting tried, and the settings could not be ranked against each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from loguru import logger

from qvlm_modifiers.errors import CalibrationDataError, RecipeError
from qvlm_modifiers.qvlm.entropy import level_grid, level_probabilities
from qvlm_modifiers.qvlm.range_variables import commit_qparams
from qvlm_modifiers.qvlm.ranges import WEIGHT_INIT_NORM, flatten_for_ranges, lp_norm_range, range_qparams

__all__ = [
    "ste_round",
    "fake_quant_range_ste",
    "dynamic_token_fake_quant_ste",
    "soft_dependency",
    "jacobian_weights",
    "veo_objective",
    "optimize_vision_encoder",
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


# ---------------------------------------------------------------------------------------------
# the training loop
# ---------------------------------------------------------------------------------------------


def _learnable_ranges(vision: torch.nn.Module, done: set[int], shrink_factors: Sequence[float]) -> list[tuple]:
    """Per quantized Linear of the vision tower not yet quantized: ``(module, weight args, observed
    weight, low0, high0, a, b)`` with the lp-norm initial range ``[low0, high0]`` and the zero
    log-multipliers ``a``, ``b`` (trainable)."""
    learn = []
    for _, m in vision.named_modules():
        scheme = getattr(m, "quantization_scheme", None)
        if scheme is None or scheme.weights is None or id(m) in done:
            continue
        args = scheme.weights
        observed = flatten_for_ranges(m.weight.detach(), "weight", args)
        low0, high0 = lp_norm_range(observed, args, shrink_factors, WEIGHT_INIT_NORM)
        log_low = torch.zeros_like(low0, requires_grad=True)
        log_high = torch.zeros_like(high0, requires_grad=True)
        learn.append((m, args, observed, low0, high0, log_low, log_high))
    return learn


def _ste_forward(m, args, observed, low0, high0, log_low, log_high):
    """The Linear's forward during VEO: weight QDQ on the learnable range (STE), input QDQ per
    token (STE) when the scheme quantizes activations."""
    act = m.quantization_scheme.input_activations

    def forward(x):
        w = fake_quant_range_ste(
            observed.to(x.device), (low0 * log_low.exp()).to(x.device), (high0 * log_high.exp()).to(x.device),
            args.num_bits, bool(args.symmetric),
        ).reshape(m.weight.shape)
        if act is not None:
            x = dynamic_token_fake_quant_ste(x, act.num_bits, bool(act.symmetric))
        return torch.nn.functional.linear(x, w.to(x.dtype), m.bias)

    return forward


def _labelled_batches(loader: Iterable, image_id: int) -> list[tuple[dict, torch.Tensor]]:
    """``(model inputs, next-token labels)`` per calibration batch: ``L_reg`` counts the answer
    tokens (``loss_mask == 1``) when the batch has a ``loss_mask``, else every non-image token."""
    batches = []
    for batch in loader:
        batch = dict(batch)
        loss_mask = batch.pop("loss_mask", None)
        labels = batch["input_ids"].clone()
        if loss_mask is not None:
            labels[torch.as_tensor(loss_mask).reshape(labels.shape) != 1] = -100
        else:
            labels[labels == image_id] = -100
        batches.append((batch, labels))
    return batches


def optimize_vision_encoder(
    model: torch.nn.Module,
    loader: Iterable | None,
    done: set[int],
    num_levels: int,
    *,
    shrink_factors: Sequence[float],
    lambda_ent: float,
    lambda_err: float,
    eta: float,
    lr: float,
    epochs: int,
) -> list[dict[str, float]]:
    """VEO (Eq. 8-10): learn the quantized vision tower's weight ranges, then write them.

    The FP references (projector output ``X^v_r``, last hidden state ``X^(n)_r``) come from one
    pass with quantization disabled (the state in which llm-compressor starts calibration). Then
    ``epochs`` passes of Adam (``lr``) over the batches of ``loader`` on :func:`veo_objective`, the
    Jacobian weights of Eq. 8 fixed per batch at its first evaluation, and one more pass that only
    measures. The learned ranges are written as ``weight_scale`` / ``weight_zero_point`` and the
    weights replaced by their fake-quantized values; their ids are added to ``done``. Every Linear
    forward and ``requires_grad`` flag is restored.

    :param done: ids of modules already quantized (skipped)
    :param num_levels: M of Eq. 5 for the entropy term
    :return: per pass, the mean ``total``/``reg``/``ent``/``err`` terms over the batches:
        ``[0]`` is the first training pass (each batch before its own update: about the initial
        loss), ``[-1]`` the measurement-only pass after training
    """
    from llmcompressor.utils.dev import get_main_device

    from qvlm_modifiers.families import get_family, image_token_id

    family = get_family(model)
    if loader is None:
        raise CalibrationDataError(
            "QVLMModifier: optimize_vision_encoder needs calibration data; pass a dataset to oneshot."
        )
    learn = _learnable_ranges(model.get_submodule(family.vision_tower), done, shrink_factors)
    if not learn:
        raise RecipeError(
            "QVLMModifier: optimize_vision_encoder found no quantized Linear in the vision tower "
            f"({family.vision_tower}); set quantize_vision_tower: true and keep the vision tower "
            "out of `ignore`."
        )
    projector = model.get_submodule(family.projector)
    captured: list[torch.Tensor] = []
    handle = projector.register_forward_hook(lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out))
    batches = _labelled_batches(loader, image_token_id(model))
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    saved_forward = {id(m): m.__dict__.get("forward") for m, *_ in learn}
    history = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        device = get_main_device()  # the sequential pipeline's onload device
        references = []
        with torch.no_grad():
            for batch, _ in batches:  # FP vision tower (quantization is disabled here)
                captured.clear()
                out = model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()},
                            output_hidden_states=True)
                references.append((captured[-1].detach(), out.hidden_states[-1].detach()))
        for item in learn:
            item[0].forward = _ste_forward(*item)
        params = [t for item in learn for t in item[5:]]
        optimizer = torch.optim.Adam(params, lr=lr)
        weights: dict[int, torch.Tensor | None] = {}  # Eq. 8 Jacobian weights per batch, fixed
        with torch.enable_grad():
            for epoch in range(epochs + 1):
                sums = {"total": 0.0, "reg": 0.0, "ent": 0.0, "err": 0.0}
                for index, ((batch, labels), (vision_r, final_r)) in enumerate(zip(batches, references)):
                    captured.clear()
                    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    has_labels = bool((labels != -100).any())
                    out = model(**inputs, labels=labels.to(device) if has_labels else None, output_hidden_states=True)
                    reg = out.loss if has_labels else out.logits.new_zeros(())
                    terms = veo_objective(
                        reg, list(out.hidden_states), final_r, captured[-1], vision_r, num_levels,
                        lambda_ent, lambda_err, eta, weights=weights.get(index),
                    )
                    weights[index] = terms["weights"]
                    if epoch < epochs:  # the last pass only measures
                        optimizer.zero_grad()
                        terms["total"].backward()
                        optimizer.step()
                    for key in sums:
                        sums[key] += float(terms[key].detach()) / len(batches)
                history.append(sums)
                logger.info(f"Q-VLM VEO epoch {epoch}: " + ", ".join(f"{k} {v:.5g}" for k, v in sums.items()))
    finally:
        handle.remove()
        for m, *_ in learn:
            if saved_forward[id(m)] is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = saved_forward[id(m)]
        for p in model.parameters():
            p.requires_grad_(requires_grad.get(id(p), False))
    with torch.no_grad():
        for m, args, _, low0, high0, log_low, log_high in learn:
            scale, zero_point = range_qparams(low0 * log_low.exp(), high0 * log_high.exp(), args)
            m.weight_scale.data.copy_(scale.reshape(m.weight_scale.shape))
            if getattr(m, "weight_zero_point", None) is not None:
                m.weight_zero_point.data.copy_(zero_point.reshape(m.weight_zero_point.shape))
            commit_qparams(m)
            done.add(id(m))
    return history
