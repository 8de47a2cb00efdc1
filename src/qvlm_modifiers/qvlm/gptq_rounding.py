"""GPTQ inside Q-VLM's ranges (``QVLMModifier.gptq_rounding``; not in the paper).

Q-VLM (Eq. 2-3) chooses each Linear's quantization *range* (scale / zero-point) and rounds to
nearest inside it. GPTQ (Frantar et al., 2022, Alg. 1) instead chooses the *integers* column by
column, compensating each column's rounding error on the columns not yet quantized with the inverse
Hessian ``H = 2 X X^T / n`` of the layer's inputs (GPTQ Eq. 2-3). :func:`gptq_quantize_layers` runs
llm-compressor's GPTQ (``quantize_weight``, through :func:`qvlm_modifiers.upstream.gptq_internals`)
with the scale / zero-point fixed to the Linears' current qparams, in llm-compressor
``GPTQModifier``'s order and on its inputs, so that with min/max qparams it gives GPTQModifier's
weights (``tests/test_qvlm_gptq_rounding.py``):

* decoder layer by decoder layer; layer ``j``'s Hessians from its Linears' inputs when the layer
  runs in full precision (GPTQModifier calibrates under ``DisableQuantization``) on the block input
  of the quantized path through the block's layers ``< j``, already GPTQ-quantized;
* act-order ``"static"`` (= ``"weight"``, GPTQModifier's default): columns processed by decreasing
  Hessian diagonal, groups (qparams) kept in the original column order;
* GPTQModifier's ``block_size`` 128 and ``dampening_frac`` 0.01.

The Modifier runs it once with the searched ranges and once with min/max and keeps the better on
held-out calibration rows (:mod:`.guard`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from compressed_tensors.quantization import ActivationOrdering

from qvlm_modifiers.qvlm.objective import LayerFn
from qvlm_modifiers.upstream import gptq_internals

__all__ = ["GPTQ_BLOCKSIZE", "GPTQ_PERCDAMP", "gptq_quantize_layers"]

# llm-compressor's GPTQModifier defaults (block_size, dampening_frac)
GPTQ_BLOCKSIZE = 128
GPTQ_PERCDAMP = 0.01


@torch.no_grad()
def gptq_quantize_layers(
    layer_linears: Sequence[Sequence[torch.nn.Module]],
    layers: Sequence[LayerFn],
    quantized: Callable[[int, bool], contextlib.AbstractContextManager],
    q_inputs: Sequence[torch.Tensor],
    actorder: bool = True,
    keep: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    blocksize: int = GPTQ_BLOCKSIZE,
    percdamp: float = GPTQ_PERCDAMP,
) -> list[torch.Tensor]:
    """GPTQ's integers inside the current qparams of every weight-quantized Linear of the block,
    layer by layer (module docstring). Each Linear's ``weight`` is overwritten in place with the
    dequantized GPTQ result (on the grid of its unchanged ``weight_scale`` / ``weight_zero_point``).

    :param layer_linears: per layer of the block, its quantized Linears (full-precision weights)
    :param layers: the block's layers ``(hidden, batch_index) -> hidden``
    :param quantized: ``quantized(j, enabled)``: a context in which layer ``j`` runs fake-quantized
        (``True``) or in full precision (``False``)
    :param q_inputs: per calibration batch, the block input on the quantized path
    :param actorder: act-order ``"static"`` (GPTQModifier's default); ``False``: natural order
    :returns: per batch, the block output on the quantized path after GPTQ
    """
    if len(layer_linears) != len(layers):
        raise ValueError("one list of Linears per layer is required")
    quantize_weight, accumulate_hessian, make_empty_hessian = gptq_internals()
    x = list(q_inputs)
    for j, (layer, linears) in enumerate(zip(layers, layer_linears)):
        linears = [m for m in linears if m.quantization_scheme.weights is not None]
        hessians = {id(m): make_empty_hessian(m) for m in linears}
        counts = {id(m): torch.zeros(()) for m in linears}

        def hook(module, args, _h=hessians, _n=counts):
            _h[id(module)], _n[id(module)] = accumulate_hessian(args[0].detach(), module, _h[id(module)], _n[id(module)])

        handles = [m.register_forward_pre_hook(hook) for m in linears]
        try:
            with quantized(j, False):
                for b, h in enumerate(x):
                    layer(h, b)
        finally:
            for handle in handles:
                handle.remove()
        for m in linears:
            order = ActivationOrdering.WEIGHT if actorder else None
            args = m.quantization_scheme.weights.model_copy(update={"actorder": order})
            zp = getattr(m, "weight_zero_point", None)
            zp = zp.data if zp is not None else torch.zeros_like(m.weight_scale.data)
            hessian = hessians[id(m)] / counts[id(m)].to(hessians[id(m)].device).clamp_min(1)
            quantized_weight, _, _ = quantize_weight(
                weights=m.weight.data[None].float().clone(),
                hessians=hessian[None],
                scale=m.weight_scale.data[None],
                zero_point=zp[None],
                global_scale=None,
                quant_args=args,
                blocksize=blocksize,
                percdamp=percdamp,
            )
            m.weight.data.copy_(quantized_weight[0].to(m.weight.dtype))
        del hessians
        with quantized(j, True):
            x = [keep(layer(h, b)) for b, h in enumerate(x)]
    return x
