"""Teacher-forced distortion of a quantized model: the one definition of answer-token KL.

``qvlm eval`` (the product's command) and the evaluation lab (``qvlm_eval.metrics``) both score a
quantized model against its full-precision reference the same way:

* the positions scored are those whose logits *predict* a target token (position ``t`` predicts
  token ``t + 1``; :func:`predicting_positions`);
* at each such position, the full next-token distribution in float32 (:func:`next_token_logprobs`);
* ``KL(P_fp || Q_quant) = sum_v p_v (log p_v - log q_v)`` per position (:func:`kl_divergence`),
  averaged over every scored token of every row (:func:`mean_kl`), in nats.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["predicting_positions", "next_token_logprobs", "kl_divergence", "mean_kl"]


def predicting_positions(target_mask: torch.Tensor) -> torch.Tensor:
    """Indices ``t`` whose logits predict a target token, given a ``(seq,)`` boolean mask of the
    target tokens themselves (token 0 has no predicting position and is never scored)."""
    mask = torch.as_tensor(target_mask, dtype=torch.bool).reshape(-1)
    return torch.nonzero(mask[1:], as_tuple=False).reshape(-1)


def next_token_logprobs(logits: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """``(n_targets, vocab)`` float32 log-softmax of ``logits`` (``(seq, vocab)``, one row) at the
    positions that predict the tokens of ``target_mask``."""
    positions = predicting_positions(target_mask).to(logits.device)
    return torch.log_softmax(logits[positions].float(), dim=-1)


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row of log-probabilities: ``sum_v p_v (log p_v - log q_v)``."""
    return (logp.exp() * (logp - logq)).sum(-1)


def mean_kl(reference: Sequence[torch.Tensor], quantized: Sequence[torch.Tensor]) -> dict[str, float]:
    """Mean (over all scored tokens of all rows) and max KL(full precision || quantized) in nats."""
    if len(reference) != len(quantized):
        raise ValueError(f"{len(reference)} reference rows vs {len(quantized)} quantized rows")
    values = torch.cat([kl_divergence(p, q) for p, q in zip(reference, quantized)])
    return {"kl_mean": float(values.mean()), "kl_max": float(values.max()), "tokens": int(values.numel())}
