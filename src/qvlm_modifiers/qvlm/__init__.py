"""Q-VLM (NeurIPS 2024, arXiv 2410.08119) for llm-compressor: ``QVLMModifier`` and its math.

Q-VLM = entropy-based block partition of the decoder layers + joint search of the quantization
ranges inside each block, optionally preceded by the visual-encoder optimization. One module per
idea, with the paper's equation numbers (design note: ``/work/shared/design/qvlm.md``):

* :mod:`.base` -- ``QVLMModifier``: recipe fields and lifecycle hooks;
* :mod:`.entropy` -- dependency ``D(k, k+1)`` of consecutive layers (Eq. 4-5);
* :mod:`.partition` -- greedy block partition (Eq. 6-7);
* :mod:`.ranges` -- candidate ranges of one quantity: percentiles, lp-norm initialisation (Sec. 3.3);
* :mod:`.objective` -- the block error of Eq. 2-3 (and its opt-in per-token weightings);
* :mod:`.clip_search` -- AWQ's activation-aware per-group weight clip ratios (weight candidates, not in the paper);
* :mod:`.block_search` -- coordinate descent over the ranges, layer-wise (Eq. 2) then joint (Eq. 3);
* :mod:`.guard` -- never worse than min/max (RTN): a block's searched ranges kept only if they do not
  raise the objective on held-out calibration rows (issue #24);
* :mod:`.visual` -- visual-encoder optimization (Eq. 8-10): its objective and training loop;
* :mod:`.scheme` -- which quantization schemes can be searched, M of Eq. 5, what stays FP;
* :mod:`.capture` -- the decoder layers' recorded calls, replayed on the cached block inputs;
* :mod:`.range_variables` -- the searched ranges of one Linear, written back as qparams;
* :mod:`.cached_forward` -- the search's forwards (quantization on/off, cached weight QDQ);
* :mod:`.gptq_rounding` -- optional GPTQ inside the ranges, GPTQModifier's order and act-order (not in the paper);
* :mod:`.stream` -- ``realign_stream``: each closed block's quantized-path output handed to the
  sequential pipeline (Eq. 1's ``X_q`` for the later layers; not in the paper);
* :mod:`.metadata` -- the partition record written to ``config.json`` (``qvlm_blocks``);

``from qvlm_modifiers.qvlm import QVLMModifier`` (the Modifier, :mod:`.base`) and
``METADATA_ATTRIBUTE`` (:mod:`.metadata`) load on first access, so that importing one of the pure
math modules (e.g. :mod:`.entropy`) does not import llm-compressor.
"""

from __future__ import annotations

__all__ = ["QVLMModifier", "METADATA_ATTRIBUTE"]


def __getattr__(name: str):
    if name == "QVLMModifier":
        from qvlm_modifiers.qvlm.base import QVLMModifier

        return QVLMModifier
    if name == "METADATA_ATTRIBUTE":
        from qvlm_modifiers.qvlm.metadata import METADATA_ATTRIBUTE

        return METADATA_ATTRIBUTE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
