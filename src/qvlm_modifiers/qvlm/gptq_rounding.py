"""Optional GPTQ rounding inside Q-VLM's searched ranges (``QVLMModifier.gptq_rounding``; not in the paper).

Q-VLM (Eq. 2-3) chooses each Linear's quantization *range* (scale / zero-point) and rounds to
nearest inside it. GPTQ (Frantar et al., 2022) instead chooses the *integers* column by column,
compensating each column's rounding error on the columns not yet quantized with the inverse Hessian
``H = 2 X X^T`` of the layer's inputs. :func:`gptq_round_block` runs GPTQ with the scale / zero-point
fixed to Q-VLM's choice, Hessians accumulated from each Linear's inputs on the block's *quantized*
path (``X_q``, the inputs the quantized model will see), and returns the block objective (Eq. 3)
afterwards, so that the Modifier keeps the GPTQ integers only where they lower it.

Measured on the default model by the matrix cell ``qvlm_w4_s32_gptq`` (``eval/README.md``: it helps
Q-VLM, but the searched ranges are what costs the answers), and on random tiny models by
``python eval/measure_qvlm_gptq.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from qvlm_modifiers.qvlm.objective import BlockObjectiveKind, LayerFn, block_mse_objective
from qvlm_modifiers.upstream import gptq_internals

__all__ = ["gptq_round_block"]

# llm-compressor's GPTQModifier defaults (block_size, dampening_frac)
GPTQ_BLOCKSIZE = 128
GPTQ_PERCDAMP = 0.01


def gptq_round_block(
    linears: Sequence[torch.nn.Module],
    layers: Sequence[LayerFn],
    quantized: Callable[[bool], contextlib.AbstractContextManager],
    q_inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    search_loss: float,
    kind: BlockObjectiveKind = "mse",
    token_weights: Sequence[torch.Tensor | None] | None = None,
) -> float:
    """GPTQ's integers inside the current ranges of the block's quantized ``linears`` (their
    ``weight`` is overwritten in place with the dequantized GPTQ result; scale / zero-point
    unchanged), Hessians from one quantized forward of ``layers`` on ``q_inputs``; kept only if the
    block objective (:func:`~qvlm_modifiers.qvlm.objective.block_mse_objective` against
    ``targets``) is then below ``search_loss`` (the range search's, round-to-nearest), else every
    weight of ``linears`` is restored. Returns GPTQ's block objective either way.

    :param quantized: ``quantized(True)``: a context in which the layers run fake-quantized
    """
    originals = {id(m): m.weight.data.clone() for m in linears}
    linears = [m for m in linears if m.quantization_scheme.weights is not None]
    gptq_loss = _gptq_in_ranges(linears, layers, quantized, q_inputs, targets, kind, token_weights)
    if not gptq_loss < search_loss:  # keep round-to-nearest inside the searched ranges
        for m in linears:
            m.weight.data.copy_(originals[id(m)])
    return gptq_loss


def _gptq_in_ranges(linears, layers, quantized, q_inputs, targets, kind, token_weights) -> float:
    quantize_weight, accumulate_hessian, make_empty_hessian = gptq_internals()
    hessians = {id(m): make_empty_hessian(m) for m in linears}
    counts = {id(m): torch.zeros(()) for m in linears}

    def hook(module, args):
        hessians[id(module)], counts[id(module)] = accumulate_hessian(
            args[0].detach(), module, hessians[id(module)], counts[id(module)]
        )

    handles = [m.register_forward_pre_hook(hook) for m in linears]
    try:
        with quantized(True):
            x = q_inputs
            for fn in layers:
                x = [fn(h, b) for b, h in enumerate(x)]
    finally:
        for h in handles:
            h.remove()
    for m in linears:
        args = m.quantization_scheme.weights.model_copy(update={"actorder": None})
        zp = getattr(m, "weight_zero_point", None)
        zp = zp.data if zp is not None else torch.zeros_like(m.weight_scale.data)
        quantized_weight, _, _ = quantize_weight(
            weights=m.weight.data[None].float().clone(),
            hessians=(hessians[id(m)] / counts[id(m)].clamp_min(1))[None],
            scale=m.weight_scale.data[None],
            zero_point=zp[None],
            global_scale=None,
            quant_args=args,
            blocksize=GPTQ_BLOCKSIZE,
            percdamp=GPTQ_PERCDAMP,
        )
        m.weight.data.copy_(quantized_weight[0].to(m.weight.dtype))
    with quantized(True):
        return block_mse_objective(layers, q_inputs, targets, kind=kind, token_weights=token_weights)()
