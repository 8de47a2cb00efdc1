"""Q-VLM dependency proxy: conditional entropy of consecutive layers' quantized activations.

Paper (Q-VLM, NeurIPS 2024, Sec. 3.2):

* Eq. 5 -- soft assignment of a full-precision activation ``x`` to the ``M`` uniform levels
  ``q_m`` of its activation quantizer::

      p(x_q = q_m) = softmax_m( -(x - q_m)^2 / Delta )          (Delta = quantization step)

* Eq. 4 -- dependency of layer k+1 on layer k = conditional entropy of the quantized
  activations, elements paired position-wise (``x_ij^(k)`` with ``x_ij^(k+1)``)::

      D(k, k+1) = - sum_{a,b} p(a, b) * log p(b | a)

  where ``p(a, b)`` is the joint level distribution over all paired elements; with the soft
  assignment of Eq. 5 each element pair contributes ``p_ij^(k)(a) * p_ij^(k+1)(b)``.

* Eq. 6 -- ``D(k_r, k_s)`` sums the link terms ``D(k, k+1)`` for ``k_r <= k < k_s``
  (see :mod:`qvlm_modifiers.qvlm.partition`).

What is paired (design note): the *input hidden states* of consecutive decoder layers,
``h_k`` (input of layer k) and ``h_{k+1}`` (input of layer k+1 = output of layer k), which have
the same shape. Each is assigned to the levels of an asymmetric uniform M-level quantizer. The
default level grid is per token (``level_grid="token"``: the range of every token row of the
hidden state, as the dynamic per-token activation quantizer of our schemes has), or per tensor
(``"tensor"``: one range per batch tensor).

Streaming: :class:`JointLevelAccumulator` keeps only the ``M x M`` soft joint counts (float64)
and consumes hidden states chunk by chunk, so nothing of size ``tokens x hidden`` is kept between
batches. The entropy itself is :func:`conditional_entropy` of the accumulated joint.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

__all__ = [
    "LevelGrid",
    "level_grid",
    "level_probabilities",
    "JointLevelAccumulator",
    "conditional_entropy",
    "spread_token_mask",
]

LevelGrid = Literal["token", "tensor"]
Estimator = Literal["soft", "hard"]

# elements per chunk in the soft assignment: the chunk's probability matrix is chunk x M floats
_CHUNK_ELEMENTS = 1 << 16


def level_grid(x: torch.Tensor, num_levels: int, grid: LevelGrid = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """Lowest level ``q_0`` and step ``Delta`` of the uniform M-level quantizer of ``x``.

    ``x`` is ``[..., hidden]``. Returns ``(low, step)`` broadcastable to ``x``: per token row
    (``grid="token"``) or one pair for the whole tensor (``"tensor"``). Levels are
    ``q_m = low + m * step``, ``m = 0..M-1``, spanning ``[min, max]`` (asymmetric quantizer).
    A constant row gets a tiny positive step so that it maps to level 0.
    """
    if num_levels < 2:
        raise ValueError(f"num_levels must be >= 2, got {num_levels}")
    x = x.float()
    if grid == "token":
        low = x.amin(dim=-1, keepdim=True)
        high = x.amax(dim=-1, keepdim=True)
    elif grid == "tensor":
        low = x.amin().reshape([1] * x.ndim)
        high = x.amax().reshape([1] * x.ndim)
    else:
        raise ValueError(f"level_grid must be 'token' or 'tensor', got {grid!r}")
    step = (high - low) / (num_levels - 1)
    step = torch.where(step > 0, step, torch.full_like(step, torch.finfo(torch.float32).tiny))
    return low, step


def level_probabilities(
    x: torch.Tensor,
    low: torch.Tensor,
    step: torch.Tensor,
    num_levels: int,
    estimator: Estimator = "soft",
    temperature: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Per-element level distribution ``p(x_q = q_m)``: shape ``[numel(x), M]``.

    ``estimator="soft"`` is Eq. 5: ``softmax_m(-(x - q_m)^2 / T)`` with temperature
    ``T = Delta`` (the quantization step) unless ``temperature`` is given (a tensor
    broadcastable to ``x`` or a float). ``"hard"`` is the one-hot of round-to-nearest
    (clamped) -- the limit of the soft assignment as ``T -> 0``.
    """
    x = x.float()
    low = torch.broadcast_to(low.float(), x.shape).reshape(-1, 1)
    step = torch.broadcast_to(step.float(), x.shape).reshape(-1, 1)
    flat = x.reshape(-1, 1)
    if estimator == "hard":
        index = torch.round((flat - low) / step).clamp_(0, num_levels - 1).long()
        probs = torch.zeros(flat.shape[0], num_levels, dtype=torch.float32, device=x.device)
        return probs.scatter_(1, index, 1.0)
    if estimator != "soft":
        raise ValueError(f"entropy_estimator must be 'soft' or 'hard', got {estimator!r}")
    if temperature is None:
        temp = step
    elif isinstance(temperature, torch.Tensor):
        temp = torch.broadcast_to(temperature.float(), x.shape).reshape(-1, 1)
    else:
        temp = torch.full_like(step, float(temperature))
    levels = torch.arange(num_levels, dtype=torch.float32, device=x.device).reshape(1, -1)
    q = low + levels * step  # [N, M], Eq. 5's q_m
    logits = -((flat - q) ** 2) / temp
    return torch.softmax(logits, dim=-1)


class JointLevelAccumulator:
    """Streaming ``M x M`` soft joint of the level assignments of paired elements (Eq. 4/5).

    ``update(h_k, h_k1)`` adds ``sum_e p_e^(k)(a) * p_e^(k+1)(b)`` over all element pairs ``e``
    (``h_k`` and ``h_k1`` have the same shape); ``entropy()`` returns ``D(k, k+1)`` in nats.
    Memory: the float64 ``M x M`` counts plus one chunk of ``_CHUNK_ELEMENTS x M`` floats.

    :param num_levels: M, the number of quantization levels (``2**bits``)
    :param estimator: ``"soft"`` (Eq. 5) or ``"hard"`` (round-to-nearest one-hot)
    :param grid: per-``"token"`` or per-``"tensor"`` level ranges (see :func:`level_grid`)
    :param temperature_scale: multiplies Eq. 5's temperature ``Delta`` (1.0 = paper)
    """

    def __init__(
        self,
        num_levels: int,
        estimator: Estimator = "soft",
        grid: LevelGrid = "token",
        temperature_scale: float = 1.0,
    ):
        self.num_levels = int(num_levels)
        self.estimator = estimator
        self.grid = grid
        self.temperature_scale = float(temperature_scale)
        self.joint = torch.zeros(self.num_levels, self.num_levels, dtype=torch.float64)
        self.count = 0

    @torch.no_grad()
    def update(self, h_k: torch.Tensor, h_k1: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        """Accumulate the pairs ``(h_k[..., i], h_k1[..., i])``; optional ``token_mask``
        (``h.shape[:-1]``, nonzero = keep) drops padding tokens."""
        if h_k.shape != h_k1.shape:
            raise ValueError(f"paired hidden states must have the same shape, got {tuple(h_k.shape)} and {tuple(h_k1.shape)}")
        if token_mask is not None and self.grid == "token":
            # per-token levels depend on the token's own row only: drop the other rows first (same
            # values, same order; the "tensor" grid needs every row for its range)
            keep = token_mask.reshape(h_k.shape[:-1]).bool()
            h_k, h_k1, token_mask = h_k[keep], h_k1[keep], None
        low_a, step_a = level_grid(h_k, self.num_levels, self.grid)
        low_b, step_b = level_grid(h_k1, self.num_levels, self.grid)
        x_a = h_k.float()
        x_b = h_k1.float()
        shape = x_a.shape
        low_a, step_a = torch.broadcast_to(low_a, shape), torch.broadcast_to(step_a, shape)
        low_b, step_b = torch.broadcast_to(low_b, shape), torch.broadcast_to(step_b, shape)
        tensors = [x_a, low_a, step_a, x_b, low_b, step_b]
        if token_mask is not None:
            keep = token_mask.reshape(shape[:-1]).bool()
            tensors = [t[keep] for t in tensors]
        tensors = [t.reshape(-1) for t in tensors]
        total = tensors[0].numel()
        joint = torch.zeros(self.num_levels, self.num_levels, dtype=torch.float64, device=x_a.device)
        chunk = max(1, _CHUNK_ELEMENTS)
        for start in range(0, total, chunk):
            xa, la, sa, xb, lb, sb = (t[start : start + chunk] for t in tensors)
            pa = level_probabilities(xa, la, sa, self.num_levels, self.estimator, self._temperature(sa))
            pb = level_probabilities(xb, lb, sb, self.num_levels, self.estimator, self._temperature(sb))
            joint += (pa.t().double() @ pb.double())
        self.joint += joint.cpu()
        self.count += total

    def _temperature(self, step: torch.Tensor) -> torch.Tensor | None:
        return None if self.temperature_scale == 1.0 else step * self.temperature_scale

    def entropy(self) -> float:
        """``D(k, k+1)`` of everything accumulated so far (Eq. 4), in nats."""
        if self.count == 0:
            raise ValueError("no activations were accumulated: cannot compute the dependency D(k, k+1)")
        return conditional_entropy(self.joint)


def conditional_entropy(joint: torch.Tensor) -> float:
    """Eq. 4: ``-sum_{a,b} p(a,b) log p(b|a)`` for an (unnormalized) joint count matrix
    ``joint[a, b]`` (a = level of layer k, b = level of layer k+1). Zero cells contribute 0."""
    p = joint.double() / joint.double().sum()
    p_a = p.sum(dim=1, keepdim=True)
    cond = torch.where(p > 0, p / p_a.clamp_min(1e-300), torch.ones_like(p))
    value = -(p * torch.log(cond)).sum().item()
    return max(value, 0.0) if math.isfinite(value) else value


def spread_token_mask(
    token_shape: torch.Size | tuple[int, ...], max_tokens: int | None, device: torch.device | str | None = None
) -> torch.Tensor | None:
    """A ``token_shape`` boolean mask keeping at most ``max_tokens`` tokens, evenly spaced over the
    flattened tokens (first and last kept); ``None`` when all are kept. Thins the pairs one
    calibration batch adds to :class:`JointLevelAccumulator` (the soft assignment of Eq. 5 costs
    ``M`` exponentials per element): the joint distribution is estimated from a regular sample of
    the tokens instead of all of them."""
    total = math.prod(token_shape)
    if max_tokens is None or total <= max_tokens:
        return None
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    keep = torch.zeros(total, dtype=torch.bool, device=device)
    keep[torch.linspace(0, total - 1, max_tokens, device=device).round().long()] = True
    return keep.reshape(token_shape)
