"""Never worse than round-to-nearest: Q-VLM's per-block guard on held-out calibration rows (issue #24).

Not in the paper. The block search (Eq. 2-3, :mod:`.block_search`) starts from min/max ranges
(plain round-to-nearest, candidate 0 of every range variable) and only moves on strict improvement
of its objective *on the rows it searches*. With few rows and many candidates it can still overfit
them. So the calibration batches are split (:func:`holdout_batch_indices`): the search never sees the
held-out ones, and after the search the block keeps its searched ranges only if the block objective
(Eq. 3, or the variant the recipe selects) does not rise against RTN's on the held-out rows
(:func:`guard_decision`; on all rows when none are held out); otherwise every range of the block
reverts to min/max. On the rows it searched, the search is never above RTN already (it starts there
and moves only on strict improvement), so with round-to-nearest the Modifier runs min/max on the
held-out rows only, and on every row only where it wins. With GPTQ inside (``gptq_rounding``) both
sides run GPTQ (Hessians from every row), so the reference is GPTQ with min/max ranges, i.e.
llm-compressor's GPTQModifier; their block outputs are compared on the held-out rows, and only the
kept side's last layer runs on the other rows.

Pure functions on the per-batch error terms of
:func:`~qvlm_modifiers.qvlm.objective.batch_squared_errors`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from qvlm_modifiers.qvlm.objective import subset_loss

__all__ = ["holdout_batch_indices", "GuardDecision", "guard_decision"]


def holdout_batch_indices(num_batches: int, fraction: float) -> list[int]:
    """The held-out calibration batches: ``round(fraction * num_batches)`` of them (at least one
    when ``fraction > 0``, at most ``num_batches - 1``), spread evenly and never batch 0; none with
    fewer than 2 batches or ``fraction == 0`` (the guard then compares on all rows)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    if num_batches < 2 or fraction == 0.0:
        return []
    count = min(max(1, round(fraction * num_batches)), num_batches - 1)
    # evenly spaced from the last batch down; count <= num_batches - 1 keeps batch 0 a search batch
    return sorted({num_batches - 1 - i * num_batches // count for i in range(count)})


@dataclass
class GuardDecision:
    """Which state a block keeps (``winner``) and the objective of both on the held-out rows and
    on all rows (``None`` where a state was not run on every row: JSON null in the saved config);
    ``holdout_batches``: how many batches were held out (0: compared on all rows)."""

    winner: Literal["searched", "rtn"]
    holdout_batches: int
    holdout_loss_searched: float
    holdout_loss_rtn: float
    loss_searched: float | None
    loss_rtn: float | None

    def record(self) -> dict[str, Any]:
        return asdict(self)


Terms = Sequence[tuple[float, int] | None]


def _loss(errors: Terms, batches: Sequence[int] | None = None) -> float | None:
    chosen = [errors[b] for b in batches] if batches is not None else list(errors)
    if any(term is None for term in chosen):
        return None
    return subset_loss(chosen)


def guard_decision(searched: Terms, rtn: Terms, holdout: Sequence[int]) -> GuardDecision:
    """Keep the searched ranges iff the objective does not rise against RTN's on the ``holdout``
    batches (on all batches when there are none). ``searched`` / ``rtn``: per calibration batch
    ``(error sum, count)`` of the block output in each state, ``None`` for a batch that state did
    not run (each must have run the batches compared)."""
    if len(searched) != len(rtn):
        raise ValueError("both states need one entry per calibration batch")
    held = list(holdout) if holdout else None
    h_s, h_r = _loss(searched, held), _loss(rtn, held)
    if h_s is None or h_r is None:
        raise ValueError("both states must have run the batches the guard compares")
    winner = "searched" if h_s <= h_r else "rtn"
    return GuardDecision(winner, len(holdout), h_s, h_r, _loss(searched), _loss(rtn))
