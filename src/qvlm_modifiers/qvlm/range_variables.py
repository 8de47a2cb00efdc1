"""Q-VLM range variables of one quantized Linear (Sec. 3.3), and writing the chosen ranges back.

A :class:`~qvlm_modifiers.qvlm.block_search.RangeVariable` is one quantity whose clipping range the
block search (Eq. 2-3) chooses among candidates. On a quantized Linear there are at most two:

* its weight, one range per ``weight_scale`` entry (tensor/channel/group), observed on the weight;
* its static input activation (``dynamic: false``, per tensor), observed on samples of the Linear's
  inputs taken during the block's FP pass (:func:`register_act_sampling`). Dynamic per-token
  activations have no static range: nothing to search.

Candidates (:func:`qparam_variable`): index 0 = min/max, i.e. plain round-to-nearest (issue #24:
every search starts from RTN); then, for static activations, the lp-norm range
(:func:`~qvlm_modifiers.qvlm.ranges.lp_norm_range`, p = ``ACTIVATION_INIT_NORM``) and one per
percentile of the grid; for weights, by :func:`weight_candidate_mode`: AWQ's activation-aware
per-group clip ranges (:mod:`.clip_search`, below 6 bits), the paper's percentiles (recipe key
``weight_candidates: percentile``) or nothing (>= 6 bits). Duplicates dropped.
A candidate is the standard compressed-tensors ``*_scale`` / ``*_zero_point`` of its range, so
choosing it writes exactly what the checkpoint will hold.

After the search, :func:`commit_qparams` persists the chosen qparams (through the offloading
helpers) and replaces the weight by its fake-quantized value, as GPTQ does, so that the sequential
pipeline's error propagation and the next block see the quantized weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy
from compressed_tensors.quantization.lifecycle import fake_quantize
from compressed_tensors.utils import update_offload_parameter

from qvlm_modifiers.errors import RecipeError
from qvlm_modifiers.qvlm.block_search import RangeVariable
from qvlm_modifiers.qvlm.cached_forward import WEIGHT_KEY_ATTR
from qvlm_modifiers.qvlm.clip_search import auto_clip_ranges, blend_ratios, clip_input_tokens
from qvlm_modifiers.qvlm.ranges import (
    ACTIVATION_INIT_NORM,
    WEIGHT_INIT_NORM,
    flatten_for_ranges,
    lp_norm_range,
    minmax_range,
    percentile_range,
    range_qparams,
)

__all__ = [
    "ACT_SAMPLE_TOKENS",
    "register_act_sampling",
    "register_clip_sampling",
    "qparam_variable",
    "WeightCandidates",
    "weight_candidate_mode",
    "clip_candidate_ranges",
    "linear_range_variables",
    "commit_qparams",
    "init_ranges_outside_decoder",
]

# tokens per batch kept as samples of a Linear's input for static activation ranges
ACT_SAMPLE_TOKENS = 512


def register_act_sampling(linears: Iterable[torch.nn.Module], store: dict[int, list[torch.Tensor]]) -> list:
    """Forward pre-hooks on the Linears with *static* input activations: each call appends up to
    ``ACT_SAMPLE_TOKENS`` evenly spaced input tokens (float32, CPU) to ``store[id(module)]``.
    Returns the hook handles (the caller removes them)."""
    handles = []
    for m in linears:
        a = m.quantization_scheme.input_activations
        if not (a is not None and a.dynamic is False):
            continue

        def hook(module, args, _store=store):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            if x.shape[0] > ACT_SAMPLE_TOKENS:
                idx = torch.linspace(0, x.shape[0] - 1, ACT_SAMPLE_TOKENS, device=x.device).long()
                x = x[idx]
            _store.setdefault(id(module), []).append(x.float().cpu())

        handles.append(m.register_forward_pre_hook(hook))
    return handles


def register_clip_sampling(
    linears: Iterable[torch.nn.Module], store: dict[int, list[torch.Tensor]], tokens_per_batch: int,
    exclude_first: bool = True,
) -> list:
    """Forward pre-hooks on the weight-quantized Linears for the clip search (:mod:`.clip_search`):
    each call appends up to ``tokens_per_batch`` evenly spaced input tokens (float32, CPU) to
    ``store[id(module)]``, token position 0 (the attention sink) left out with ``exclude_first``.
    Returns the hook handles (the caller removes them)."""
    handles = []
    for m in linears:
        if m.quantization_scheme.weights is None:
            continue

        def hook(module, args, _store=store):
            x = clip_input_tokens([args[0]], exclude_first, max(1, tokens_per_batch))
            _store.setdefault(id(module), []).append(x.cpu())

        handles.append(m.register_forward_pre_hook(hook))
    return handles


def qparam_variable(
    module: torch.nn.Module,
    base_name: str,
    observed: torch.Tensor,
    args: QuantizationArgs,
    name: str,
    percentiles: Sequence[float],
    shrink_factors: Sequence[float],
    extra_ranges: Sequence[tuple[torch.Tensor, torch.Tensor, str]] = (),
    rtn_first: bool = True,
) -> RangeVariable:
    """The range variable of ``module``'s ``{base_name}_scale`` / ``_zero_point`` (``base_name``:
    ``"weight"`` or ``"input"``), ``observed`` as :func:`~qvlm_modifiers.qvlm.ranges.flatten_for_ranges`
    gives it. Candidates, duplicates dropped: ``rtn_first``: 0 = min/max (``"rtn"``, plain
    round-to-nearest, issue #24: the start of every search and the guard's reference); then the
    lp-norm range (``"init"``; candidate 0 when not ``rtn_first``), one per percentile, then
    ``extra_ranges`` ``(low, high, label)`` (e.g. AWQ clip ranges, :mod:`.clip_search`). Candidate
    0 is applied on return. Applying a weight candidate also stamps the module with the candidate's
    key for :func:`~qvlm_modifiers.qvlm.cached_forward.cached_weight_forward`."""
    scale_param = getattr(module, f"{base_name}_scale")
    zp_param = getattr(module, f"{base_name}_zero_point", None)
    candidates, labels = [], []

    def add(low, high, label):
        scale, zp = range_qparams(low, high, args)
        scale = scale.reshape(scale_param.shape).to(scale_param.dtype)
        setting = {"scale": scale}
        if zp_param is not None:
            setting["zero_point"] = zp.reshape(zp_param.shape).to(zp_param.dtype)
        for existing in candidates:
            if all(torch.equal(existing[key], setting[key]) for key in setting):
                return
        candidates.append(setting)
        labels.append(label)

    norm = WEIGHT_INIT_NORM if base_name == "weight" else ACTIVATION_INIT_NORM
    if rtn_first:
        add(*minmax_range(observed), "rtn")
    if list(shrink_factors) != [1.0] or not rtn_first:
        add(*lp_norm_range(observed, args, shrink_factors, norm), "init")
    for p in percentiles:
        add(*percentile_range(observed, p, bool(args.symmetric)), f"p={p}")
    for low, high, label in extra_ranges:
        add(low, high, label)

    def apply(setting, _m=module, _b=base_name):
        getattr(_m, f"{_b}_scale").data.copy_(setting["scale"])
        if "zero_point" in setting:
            getattr(_m, f"{_b}_zero_point").data.copy_(setting["zero_point"])
        if _b == "weight":  # the key of cached_weight_forward's fake-quantized weight
            _m.__dict__[WEIGHT_KEY_ATTR] = id(setting)

    var = RangeVariable(name=f"{name}.{base_name}", candidates=candidates, labels=labels, apply=apply, module=module)
    var.set(0)
    return var


WeightCandidates = Literal["clip", "percentile", "minmax"]


def weight_candidate_mode(args: QuantizationArgs, requested: str) -> WeightCandidates:
    """The weight candidates a scheme gets (``QVLMModifier.weight_candidates``): ``"auto"`` = no
    weight clipping at >= 6 bits (min/max only: clipping int6/int8 weights only adds error, issue
    #24), AWQ's per-group clip ranges below (group/channel strategies; per-tensor weights fall back
    to the percentiles)."""
    if requested != "auto":
        return requested  # type: ignore[return-value]
    if args.num_bits >= 6:
        return "minmax"
    if args.strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.CHANNEL):
        return "clip"
    return "percentile"


def clip_candidate_ranges(
    observed: torch.Tensor, inputs: torch.Tensor, args: QuantizationArgs, ratios: Sequence[float],
    strengths: Sequence[float],
) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    """AWQ's per-group clip ranges (:func:`~qvlm_modifiers.qvlm.clip_search.auto_clip_ranges`),
    one candidate per ``strength`` (the per-group ratio moved toward 1.0,
    :func:`~qvlm_modifiers.qvlm.clip_search.blend_ratios`), as ``(low, high, label)``."""
    ratio, _, _ = auto_clip_ranges(observed, inputs, args, ratios)
    low, high = minmax_range(observed)
    out = []
    for strength in strengths:
        r = blend_ratios(ratio, strength)
        out.append((low * r, high * r, f"clip x{strength:g} (mean r={r.mean().item():.3f})"))
    return out


def linear_range_variables(
    module: torch.nn.Module,
    act_samples: list[torch.Tensor] | None,
    name: str,
    percentiles: Sequence[float],
    shrink_factors: Sequence[float],
    weight_mode: WeightCandidates = "percentile",
    clip_inputs: torch.Tensor | None = None,
    clip_ratios: Sequence[float] = (),
    clip_strengths: Sequence[float] = (1.0,),
) -> list[RangeVariable]:
    """The searched ranges of one quantized Linear: its weight's, then its static input
    activation's when the scheme has one and inputs were sampled. Candidate 0 of each is min/max.

    :param weight_mode: the weight's other candidates: ``"clip"`` AWQ's per-group clip ranges on
        ``clip_inputs`` (:func:`clip_candidate_ranges`), ``"percentile"`` the paper's percentiles
        (and the lp-norm range), ``"minmax"`` none (the weight stays at round-to-nearest)
    """
    scheme = module.quantization_scheme
    out = []
    if scheme.weights is not None:
        observed = flatten_for_ranges(module.weight.detach(), "weight", scheme.weights)
        if weight_mode == "clip" and clip_inputs is not None and clip_inputs.shape[0] > 0:
            extra = clip_candidate_ranges(observed, clip_inputs, scheme.weights, clip_ratios, clip_strengths)
            out.append(qparam_variable(module, "weight", observed, scheme.weights, name, (), [1.0], extra))
        elif weight_mode == "percentile":
            out.append(qparam_variable(module, "weight", observed, scheme.weights, name, percentiles, shrink_factors))
        else:
            out.append(qparam_variable(module, "weight", observed, scheme.weights, name, (), [1.0]))
    a = scheme.input_activations
    if a is not None and a.dynamic is False and act_samples:
        observed = flatten_for_ranges(torch.cat(act_samples, dim=0), "input", a)
        out.append(qparam_variable(module, "input", observed, a, name, percentiles, shrink_factors))
    return out


def commit_qparams(module: torch.nn.Module) -> None:
    """Persist the chosen scale/zero-point (onloaded copies were edited during the search)
    and replace the weight by its fake-quantized value (like GPTQ)."""
    scheme = module.quantization_scheme
    for base_name, args in (("weight", scheme.weights), ("input", scheme.input_activations)):
        if args is None or (base_name == "input" and args.dynamic is not False):
            continue
        for suffix in ("scale", "zero_point"):
            param = getattr(module, f"{base_name}_{suffix}", None)
            if param is not None:
                update_offload_parameter(module, f"{base_name}_{suffix}", param.data.clone())
    if scheme.weights is not None:
        zp = getattr(module, "weight_zero_point", None)
        wq = fake_quantize(module.weight.data, module.weight_scale.data, zp.data if zp is not None else None, scheme.weights)
        update_offload_parameter(module, "weight", wq.to(module.weight.dtype))


@torch.no_grad()
def init_ranges_outside_decoder(
    modules: Iterable[torch.nn.Module],
    done: set[int],
    names: dict[int, str],
    percentiles: Sequence[float],
    shrink_factors: Sequence[float],
) -> None:
    """lp-norm weight ranges, committed, for quantized Linears outside the block search (the vision
    tower when quantized without VEO, a non-ignored ``lm_head``). Modules whose id is in ``done``
    are skipped; the ids of those quantized here are added to it."""
    for m in modules:
        if id(m) in done:
            continue
        scheme = getattr(m, "quantization_scheme", None)
        if scheme is None or scheme.weights is None or not hasattr(m, "weight_scale"):
            continue
        if scheme.input_activations is not None and scheme.input_activations.dynamic is False:
            raise RecipeError(
                f"QVLMModifier: static activation quantization outside the decoder layers "
                f"({names.get(id(m))}) is not supported; use dynamic per-token "
                "activations for the vision tower."
            )
        observed = flatten_for_ranges(m.weight.detach(), "weight", scheme.weights)
        # applies candidate 0, the lp-norm range
        qparam_variable(m, "weight", observed, scheme.weights, names.get(id(m), "?"), percentiles, shrink_factors,
                        rtn_first=False)
        m.__dict__.pop(WEIGHT_KEY_ATTR, None)
        commit_qparams(m)
        done.add(id(m))
