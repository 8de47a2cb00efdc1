"""The Q-VLM partition record stored in the model config (``model.config.qvlm_blocks``).

What the Modifier decided and measured, for the checkpoint's reader: the blocks of the entropy-based
partition (Eq. 4-7) with the dependencies ``D(k, k+1)`` and thresholds ``h0`` behind them, and per
block the objective of the range search (Eq. 2-3) and the ranges it chose; plus the
visual-encoder optimization's loss history (Eq. 8-10) when it ran.

Where it is stored: ``model.config.qvlm_blocks`` in memory, and in the checkpoint's ``config.json``
as the top-level key ``"qvlm_blocks"`` (outside ``quantization_config``)::

    {"blocks": [[0, 1], [2], ...], "dependencies": [D(0,1), ...], "thresholds": [h0 used per link],
     "num_levels": M, "estimator": "soft", "block_losses": [{"layers", "loss", "search_loss",
     "layerwise_loss", "search_samples", "search_objective", "kept_layerwise", "guard": {"winner":
     "searched" | "rtn", "holdout_batches", "holdout_loss_searched", "holdout_loss_rtn",
     "loss_searched", "loss_rtn"}, "gptq", "search_s", "search_cpu_s", "evaluations",
     "choices": {"<module>.weight": "rtn" | "clip x1 (...)" | "p=0.99" | "init", ...}}, ...]}

(plus ``"visual_encoder_optimization"`` when VEO ran). It is written by
:func:`qvlm_modifiers.save.save_pretrained` / ``qvlm_modifiers.oneshot(output_dir=...)`` and by
llm-compressor's own save, and reloads as ``AutoConfig.from_pretrained(path).qvlm_blocks``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from loguru import logger

from qvlm_modifiers.qvlm.block_search import BlockSearchResult
from qvlm_modifiers.qvlm.guard import GuardDecision
from qvlm_modifiers.qvlm.partition import OnlinePartitioner

__all__ = ["METADATA_ATTRIBUTE", "block_record", "guard_fields", "partition_metadata", "write_metadata"]

METADATA_ATTRIBUTE = "qvlm_blocks"

# Eq. 5's level grid and temperature scale, recorded beside the dependencies they produced: the
# defaults of entropy.JointLevelAccumulator, which the Modifier uses (per-token level ranges like
# the dynamic per-token activation quantizer; temperature = the quantization step, as the paper)
_LEVEL_GRID = "token"
_TEMPERATURE_SCALE = 1.0


def guard_fields(guard: GuardDecision) -> dict[str, Any]:
    """The entries of a block record that come from its guard decision: ``loss`` (the winner's
    objective on every calibration sample) and ``guard`` (the verdict, :class:`GuardDecision`)."""
    return {"loss": guard.loss_searched if guard.winner == "searched" else guard.loss_rtn, "guard": guard.record()}


def block_record(
    block: list[int],
    result: BlockSearchResult,
    choices: dict[str, str],
    guard: GuardDecision,
    gptq: bool,
    search_s: float,
    search_cpu_s: float,
) -> dict[str, Any]:
    """One entry of ``block_losses``: the block's objective (Eq. 3 or the selected variant) on every
    calibration sample at the end (``loss``: the guard's winner, GPTQ-rounded with ``gptq``), the
    searched solution (round-to-nearest) and the layer-wise one (Eq. 2) on the search's rows, the
    searched objective on the search samples, the guard's verdict against min/max (``guard``: which
    won, objectives on the held-out rows and on all rows), timings, evaluations and the chosen range
    label per variable (``"rtn"`` = min/max)."""
    fields = guard_fields(guard)
    return {
        "layers": list(block),
        "loss": fields["loss"],
        "search_loss": result.loss,
        "layerwise_loss": result.layerwise_loss,
        "search_samples": result.search_batches,
        "search_objective": result.search_loss,
        "kept_layerwise": result.kept_layerwise,
        "guard": fields["guard"],
        "gptq": gptq,
        "search_s": round(search_s, 3),  # wall / process CPU time of the range search
        "search_cpu_s": round(search_cpu_s, 3),
        "evaluations": sum(r.evaluations for r in result.layerwise) + (result.block.evaluations if result.block else 0),
        "choices": choices,
    }


def partition_metadata(
    partitioner: OnlinePartitioner,
    *,
    entropy_threshold: float | None,
    num_levels: int,
    estimator: str,
    max_block_layers: int,
    block_objective: str,
    vision_token_weight: float,
    block_losses: list[dict[str, Any]],
    veo: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``qvlm_blocks`` record (JSON-serialisable; floats rounded for ``config.json``).

    :param veo: the visual-encoder optimization's settings and ``history`` (one dict of mean loss
        terms per pass), when it ran
    """
    metadata = {
        "method": "Q-VLM (entropy-based block partition, Eq. 4-7)",
        "blocks": [list(b) for b in partitioner.blocks],
        "dependencies": [round(float(d), 6) for d in partitioner.dependencies],
        "thresholds": [round(float(h), 6) for h in partitioner.thresholds],
        "entropy_threshold": entropy_threshold,
        "num_levels": num_levels,
        "max_dependency": round(math.log(num_levels), 6),  # D <= log M (uniform levels)
        "estimator": estimator,
        "level_grid": _LEVEL_GRID,
        "temperature_scale": _TEMPERATURE_SCALE,
        "max_block_layers": max_block_layers,
        # what block_losses measure: Eq. 3's MSE, or a weighted variant of it
        "block_objective": block_objective,
        "vision_token_weight": vision_token_weight,
        "block_losses": [_rounded(r) for r in block_losses],
    }
    if veo is not None:
        metadata["visual_encoder_optimization"] = {
            **{k: v for k, v in veo.items() if k != "history"},
            "history": [{k: round(v, 8) for k, v in h.items()} for h in veo["history"]],
        }
    json.dumps(metadata)  # must be serialisable into config.json
    return metadata


def _rounded(value):
    """Floats to 8 significant digits for ``config.json`` (block losses can be ~1e-6: 8 decimal
    places would keep 2 digits), inside dicts too; NaN (a loss no search computed, e.g. with GPTQ
    choosing the weight ranges) becomes ``None`` (JSON null, equal to itself after a reload)."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return float(f"{value:.8g}") if isinstance(value, float) else value


def write_metadata(model: torch.nn.Module, metadata: dict[str, Any]) -> None:
    """``model.config.qvlm_blocks = metadata`` (saved into ``config.json`` outside
    ``quantization_config``), logged at INFO level."""
    setattr(model.config, METADATA_ATTRIBUTE, metadata)
    logger.info(f"Q-VLM partition: {metadata['blocks']} (dependencies {metadata['dependencies']})")
