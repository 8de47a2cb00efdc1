"""What MBQ chose and why, per mapping: for the log and the run record (``qvlm_run.json``).

Per mapping (one smooth layer -> its balance layers) :class:`~qvlm_modifiers.mbq.modifier.MBQModifier`
records the vision weight ``r`` it used, the chosen grid candidate (exponent ``alpha`` and whether it
is a duo-scaling candidate), and the reconstruction loss of the identity candidate (``s = 1``, the
first of every grid) against the chosen one: the total (Eq. 16-17, as minimised) and each modality's
mean error (:func:`modality_errors`; the same error kind, MAE or MSE, per token and channel). With
``clip_search`` it adds, per clipped layer, the mean chosen clip ratio and the fraction of groups
clipped. The sensitivities (per-layer ``G_v``, ``G_t``, ratios, rows with zero text gradient) are
recorded beside them.

The run record: :func:`last_run_diagnostics` returns the diagnostics of the last MBQModifier that
finished (``on_finalize``) in this process, JSON-ready (``NaN`` as ``None``);
:func:`take_run_diagnostics` returns them and forgets them, so a later run without MBQ in the same
process does not pick up stale ones. The run-record writer (``qvlm quantize``,
:mod:`qvlm_modifiers.cli.commands`) is meant to store them under the record's ``"mbq"`` key right
after ``oneshot``::

    from qvlm_modifiers.mbq.diagnostics import take_run_diagnostics
    if (mbq := take_run_diagnostics()) is not None:
        record["mbq"] = mbq
"""

from __future__ import annotations

import math
from typing import Any

from qvlm_modifiers.mbq.loss import ModalityErrorSums

__all__ = [
    "modality_errors",
    "chosen_index",
    "json_ready",
    "last_run_diagnostics",
    "take_run_diagnostics",
    "publish",
]

_LAST: dict[str, Any] | None = None


def modality_errors(sums: ModalityErrorSums) -> dict[str, float | None]:
    """Mean error per token and channel of each modality (``None`` without tokens of it)."""
    out: dict[str, float | None] = {}
    for name, total, count in (("text", sums.text_sum, sums.text_tokens), ("vision", sums.vision_sum,
                                                                          sums.vision_tokens)):
        n = int(count)
        out[name] = float(total) / (n * sums.channels) if n else None
    return out


def chosen_index(losses: list[float]) -> int:
    """Index of the candidate AWQ's loop keeps: the first strict minimum (``loss < best``; NaN never wins)."""
    best, best_i = float("inf"), -1
    for i, loss in enumerate(losses):
        if loss < best:
            best, best_i = loss, i
    return best_i


def json_ready(value: Any) -> Any:
    """Floats, lists and dicts with ``NaN``/``inf`` as ``None`` and keys as strings."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def publish(diagnostics: dict[str, Any]) -> None:
    global _LAST
    _LAST = json_ready(diagnostics)


def last_run_diagnostics() -> dict[str, Any] | None:
    """The diagnostics of the last MBQModifier run that finished in this process (or ``None``)."""
    return _LAST


def take_run_diagnostics() -> dict[str, Any] | None:
    """:func:`last_run_diagnostics`, then forget them (call once per run, after ``oneshot``)."""
    global _LAST
    diagnostics, _LAST = _LAST, None
    return diagnostics
