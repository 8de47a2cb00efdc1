"""``MBQModifier``: modality-balanced quantization (MBQ, CVPR'25) as an llm-compressor Modifier.

MBQ is AWQ's per-channel scale search with one change: the reconstruction loss weighs vision-token
error by the vision/text gradient ratio of each layer (:mod:`qvlm_modifiers.mbq.sensitivity`,
:mod:`qvlm_modifiers.mbq.loss`). This class therefore *is* llm-compressor's ``AWQModifier`` with

- the loss replaced (modality-weighted MAE by default, Eq. 16-17),
- MBQ's alpha grid ``k/20`` (k=0..19) and no weight term (``duo_scaling=False``),
- activation statistics over all tokens (the reference's ``x_mean``),
- a weight-activation mode (W4A8/W8A8) whose candidates also fake-quantize the balance layers'
  inputs per token (:mod:`qvlm_modifiers.mbq.scale_search`),
- mappings restricted to the language model's decoder layers (vision tower and projector untouched),
- a CPU-only fix for the activation cache (AWQ 0.14 pins memory unconditionally):
  :class:`~qvlm_modifiers.upstream.CPUSafeAWQMixin`, per instance, no global patch.

Like ``AWQModifier`` it is a transform: follow it with ``QuantizationModifier`` (or ``GPTQModifier``)
whose scheme it searches against. Recipe example::

    MBQModifier:
      vision_weight: null        # null: gradient-based sensitivities (computed on the calibration set)
      loss_mode: mae
      text_tokens: answer
    QuantizationModifier:
      config_groups: {group_0: {targets: [Linear], weights: {num_bits: 3, type: int,
                                symmetric: false, strategy: group, group_size: 128}}}
      ignore: [lm_head, 're:.*vision_tower.*', 're:.*multi_modal_projector.*']

Per-token modality labels: rows from :func:`qvlm_modifiers.data.build_calibration_dataset` carry a
``loss_mask`` (0 ignored, 1 text, 2 vision). Any other VLM calibration data works too (the
processor's output per row, as llm-compressor's VLM examples build it, with or without ``labels``):
the labels are then derived per row by :mod:`qvlm_modifiers.modality` (vision = image tokens, text =
``labels != -100`` when the rows have labels, else every non-image token), and the rule used is logged.

Where this follows the reference code (thu-nics/MBQ) rather than the paper, and the options that
switch to the other reading (each a field below). Two points have no switch, on purpose: the
gradient location (the reference's; the paper does not say where it takes the gradients) and the
candidates' weight quantizer (scoring a candidate with the quantizer that will be deployed is the
point of the search; the reference's differs from its own deployment format too):

- gradient taken only at ``o_proj``/``down_proj`` outputs, shared by the layer's two attention /
  two MLP mappings; ratio floored at the cross-layer median (``median_floor``);
- "text" = answer tokens only (``text_tokens="all_text"`` for the paper's "language tokens");
- MAE pooled over counted tokens, MSE averaged per modality (``loss_mode``, ``loss_normalization``);
- alpha grid 0..0.95 (``alpha_grid="awq"`` adds 1.0), ``mean|x|`` over all tokens
  (``activation_stats_tokens="masked"`` for AWQModifier's masked statistics);
- W-A candidates: per-token activation fake-quant as the reference; the *weights* of every
  candidate are quantized by the follow-up scheme's own quantizer (compressed-tensors: symmetric
  step ``absmax/((2^b-1)/2)`` on [-2^(b-1), 2^(b-1)-1], asymmetric ranges include 0) -- what gets
  deployed -- where the reference uses ``absmax/(2^(b-1)-1)`` and plain min/max.
- Error propagation: the reference searches every layer on full-precision inputs (``distort=False``),
  i.e. ``oneshot(..., propagate_error=False)``; llm-compressor's default (``True``) feeds each layer
  the outputs of the already-quantized previous ones (closer to the reference's ``distort=True``).
- The reference searches on all 128 samples as one padded batch; llm-compressor runs one sample at a
  time (batch size 1, no padding). The loss sums are the same.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Literal

import torch
from compressed_tensors.offload.dist_utils import is_distributed
from compressed_tensors.quantization import QuantizationStrategy
from compressed_tensors.utils import get_execution_device
from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers.transform.awq import AWQModifier
from llmcompressor.modifiers.transform.awq.dynamic_mappings import get_layer_mappings_from_model
from llmcompressor.modifiers.transform.awq.mappings import ResolvedMapping
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator
from torch.nn import Module

from qvlm_modifiers.errors import CalibrationDataError, RecipeError
from qvlm_modifiers.families import get_family
from qvlm_modifiers.lm_scoped import scope_awq_mappings
from qvlm_modifiers.modality import DerivedLossMasks
from qvlm_modifiers.upstream import CPUSafeAWQMixin, allreduce_data_sum
from qvlm_modifiers.mbq.loss import (
    LossMode,
    ModalityErrorSums,
    Normalization,
    TextTokens,
    masked_error_sums,
    modality_token_masks,
    modality_weighted_loss,
)
from qvlm_modifiers.mbq.scale_search import AlphaGrid, activation_scales, alpha_grid, wa_candidate_input
from qvlm_modifiers.mbq.sensitivity import ModalitySensitivity, compute_modality_sensitivity

__all__ = ["MBQModifier"]

_MLP_PARTS = ("mlp", "feed_forward", "gate_proj", "up_proj", "down_proj")


class _AlphaCandidates:
    """The ``(alpha, duo_scaling=False)`` grid for AWQ's loop (sized, so its progress bar has a total).

    AWQ's loop turns each yielded alpha into scales; in W-A mode the input hook needs the same
    scales, so they are computed here (same formula) right before the loop uses the alpha.
    """

    def __init__(self, modifier: "MBQModifier", alphas: list[float]):
        self.modifier, self.alphas = modifier, alphas

    def __len__(self) -> int:
        return len(self.alphas)

    def __iter__(self) -> Iterator[tuple[float, bool]]:
        mod = self.modifier
        for alpha in self.alphas:
            if mod._resolved_act_bits is not None:
                mod._wa_scales = activation_scales(mod._x_mean_for_wa, alpha)
            yield alpha, False


class MBQModifier(CPUSafeAWQMixin, AWQModifier):
    """Modality-balanced AWQ-style scale search (MBQ). See the module docstring for the recipe.

    Lifecycle (in addition to AWQModifier's):

    - on_initialize: LM-scoped default mappings; load or compute the modality sensitivities (a
      gradient pass over the calibration set on the still-unquantized model) unless
      ``vision_weight`` is fixed
    - on_calibration_start: check the loss masks, resolve W-A mode, set up all-token activation
      statistics and the CPU-safe argument cache
    - per mapping: AWQ's grid loop with MBQ's grid, W-A candidate hooks and the modality-weighted loss

    :param vision_weight: fixed weight of vision-token error (text weight ``text_weight``); overrides
        the gradient sensitivities. ``None`` (default, MBQ): per-layer ratios ``|g_v|/|g_t|``.
        ``1.0`` with ``text_tokens="all_text"`` is modality-blind (AWQ on VLM data)
    :param text_weight: weight of text-token error. Only ``vision_weight / text_weight`` affects the
        chosen scales
    :param sensitivity: precomputed sensitivities: ``{layer_idx: {"attn": r, "mlp": r}}`` or the path
        of a JSON file written by :func:`~qvlm_modifiers.mbq.sensitivity.compute_modality_sensitivity`
        (for large / offloaded models: compute once, reuse). ``None``: computed in ``on_initialize``
    :param median_floor: floor each layer's ratio at the cross-layer median (reference code; not in
        the paper). Applies to sensitivities computed here
    :param sensitivity_samples: calibration samples used by the gradient pass (default: all)
    :param loss_mode: ``"mae"`` (reference default, Eq. 17) or ``"mse"``
    :param loss_normalization: ``"reference"`` (MAE pooled over counted tokens; MSE averaged per
        modality, as the reference code), ``"pooled"`` or ``"per_modality"``
        (:mod:`qvlm_modifiers.mbq.loss`)
    :param text_tokens: which tokens count as text in the loss and the gradient statistics:
        ``"answer"`` (reference: ``loss_mask == 1`` only; prompt/template get weight 0) or
        ``"all_text"`` (every non-vision token, the paper's "language tokens")
    :param activation_stats_tokens: tokens averaged into ``mean|x|`` for the scales: ``"all"``
        (reference, includes prompt tokens) or ``"masked"`` (AWQModifier's ``loss_mask != 0``)
    :param alpha_grid: ``"mbq"``: ``alpha = k/n_grid``, k=0..n_grid-1 (0..0.95 for 20; reference);
        ``"awq"``: ``k/(n_grid-1)`` (includes 1.0; AWQModifier)
    :param n_grid: number of alpha grid points (20 in MBQ)
    :param duo_scaling: MBQ uses activation-only scales (``False``). ``True``/``"both"`` fall back to
        AWQModifier's duo grid (a departure, for experiments)
    :param act_bits: weight-activation mode: candidates quantize the balance layers' inputs
        dynamically per token, symmetric, to this many bits (8 for W4A8/W8A8). ``None``: taken from
        the follow-up scheme's ``input_activations`` when those are dynamic per-token ints, otherwise
        weight-only
    """

    # MBQ parity defaults (AWQModifier's are duo_scaling=True)
    duo_scaling: bool | Literal["both"] = False
    n_grid: int = 20

    vision_weight: float | None = Field(default=None, ge=0)
    text_weight: float = Field(default=1.0, gt=0)
    sensitivity: dict[int, dict[str, float]] | str | None = None
    median_floor: bool = True
    sensitivity_samples: int | None = Field(default=None, ge=1)
    loss_mode: LossMode = "mae"
    loss_normalization: Normalization = "reference"
    text_tokens: TextTokens = "answer"
    activation_stats_tokens: Literal["all", "masked"] = "all"
    alpha_grid: AlphaGrid = "mbq"
    act_bits: int | None = Field(default=None, ge=2, le=16)

    _sensitivity: ModalitySensitivity | None = PrivateAttr(default=None)
    _layer_prefix: str | None = PrivateAttr(default=None)
    _active_mapping: ResolvedMapping | None = PrivateAttr(default=None)
    _resolved_act_bits: int | None = PrivateAttr(default=None)
    _wa_scales: torch.Tensor | None = PrivateAttr(default=None)
    _x_mean_for_wa: torch.Tensor | None = PrivateAttr(default=None)
    _all_token_stats: dict[str, list[torch.Tensor]] = PrivateAttr(default_factory=dict)
    _active_vision_weight: float | None = PrivateAttr(default=None)
    _active_masks: list[tuple[torch.Tensor, torch.Tensor]] | None = PrivateAttr(default=None)
    _derived_masks: DerivedLossMasks | None = PrivateAttr(default=None)

    @field_validator("sensitivity", mode="before")
    @classmethod
    def _sensitivity_keys_to_int(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {int(k): {str(kk): float(vv) for kk, vv in v.items()} for k, v in value.items()}
        return value

    # ------------------------------------------------------------------ lifecycle
    def on_initialize(self, state: State, **kwargs) -> bool:
        self._layer_prefix = get_family(state.model).layers
        if self.mappings is None:
            # AWQ's mappings for the architecture, anchored to the LM decoder layers (MBQ never
            # smooths the vision tower or projector; AWQ's bare regexes also match CLIP q/k/v)
            self.mappings = scope_awq_mappings(get_layer_mappings_from_model(state.model), self._layer_prefix)
        super().on_initialize(state, **kwargs)
        calib = state.data.calib if state.data is not None else None
        if calib is not None:
            # modality labels for rows without a loss_mask; refuses unusable rows before any work
            self._derived_masks = DerivedLossMasks(state.model, type(self).__name__)
            self._derived_masks.index_dataset(getattr(calib, "dataset", calib))

        if self.vision_weight is not None:
            return True
        if isinstance(self.sensitivity, str):
            self._sensitivity = ModalitySensitivity.load(self.sensitivity)
        elif isinstance(self.sensitivity, dict):
            self._sensitivity = ModalitySensitivity(ratios=self.sensitivity)
        else:
            if calib is None:
                raise CalibrationDataError(
                    "MBQModifier needs calibration data for its gradient sensitivity pass. Pass a "
                    "dataset to oneshot, or set vision_weight (fixed) or sensitivity (precomputed)."
                )
            logger.info("MBQ: computing modality sensitivities (one forward+backward per sample)")
            self._sensitivity = compute_modality_sensitivity(
                state.model,
                calib,
                num_samples=self.sensitivity_samples,
                text_tokens=self.text_tokens,
                median_floor=self.median_floor,
            )
            logger.info(f"MBQ sensitivities (vision/text, median-floored): {self._sensitivity.ratios}")
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        super().on_calibration_start(state, event, **kwargs)
        self._resolved_act_bits = self._resolve_act_bits()
        if self._derived_masks is not None:
            self._derived_masks.attach(state.model, state)

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs):
        # llm-compressor fills state.loss_masks after calibration_start, so check them here
        self._check_loss_masks(state)
        super().on_sequential_epoch_end(state, event, **kwargs)

    def _check_loss_masks(self, state: State) -> None:
        if not state.loss_masks or any(m is None for m in state.loss_masks):
            raise CalibrationDataError(
                "MBQModifier found no per-token modality labels for some calibration batches: they are "
                "derived from each batch's input_ids when the model embeds them, and this model's input "
                "embeddings were not called with them. Pass the processor's output (input_ids, ...) per "
                "row, or rows with a 'loss_mask' column (0 ignore, 1 text, 2 vision) and "
                "oneshot(..., use_loss_mask=True)."
            )
        if self.text_tokens == "answer" and all(int((m != 0).sum()) == 0 for m in state.loss_masks):
            raise CalibrationDataError(
                "Every calibration loss_mask is 0: no answer (1) or image (2) token to weigh. Check the "
                "dataset's text/answer column and the image placeholder tokens."
            )

    def on_finalize(self, state: State, **kwargs) -> bool:
        result = super().on_finalize(state, **kwargs)
        if self._derived_masks is not None:
            self._derived_masks.detach()
        self._all_token_stats.clear()
        self._active_mapping = None
        self._wa_scales = None
        return result

    # ------------------------------------------------------------------ hooks and caches
    def _setup_activation_cache_hooks(self) -> None:
        super()._setup_activation_cache_hooks()  # CPUSafeAWQMixin: caches never pin on CPU-only torch
        if self.activation_stats_tokens != "all":
            return

        # Reference x_mean: |x| averaged over every token, whatever the loss mask says.
        def make_hook(smooth_name):
            def all_token_stats_hook(_module, args, _output):
                x = args[0].detach().abs().flatten(0, -2)
                new_sum, new_count = x.float().sum(dim=0).cpu(), torch.tensor(x.size(0))
                if smooth_name not in self._all_token_stats:
                    self._all_token_stats[smooth_name] = [torch.zeros_like(new_sum), torch.zeros_like(new_count)]
                self._all_token_stats[smooth_name][0] += new_sum
                self._all_token_stats[smooth_name][1] += new_count

            return all_token_stats_hook

        for mapping in self._resolved_mappings:
            layer = mapping.activation_hook_target or mapping.balance_layers[0]
            self.register_hook(layer, make_hook(mapping.smooth_name), "forward")

    def _resolve_act_bits(self) -> int | None:
        if self.act_bits is not None:
            return self.act_bits
        for mapping in self._resolved_mappings:
            for layer in mapping.balance_layers:
                acts = getattr(getattr(layer, "quantization_scheme", None), "input_activations", None)
                if acts is None:
                    continue
                if acts.dynamic is True and acts.strategy == QuantizationStrategy.TOKEN and acts.type == "int":
                    logger.info(f"MBQ: weight-activation search with dynamic per-token int{acts.num_bits} inputs")
                    return acts.num_bits
                raise RecipeError(
                    f"MBQModifier's weight-activation search models dynamic per-token int activations, "
                    f"but {mapping.balance_names[0]} is quantized with input_activations {acts}. Use "
                    "{num_bits: 8, type: int, symmetric: true, strategy: token, dynamic: true} "
                    "(vLLM's W8A8/W4A8 int path), or set act_bits explicitly."
                )
        return None

    # ------------------------------------------------------------------ the search
    def _vision_weight_for(self, mapping: ResolvedMapping) -> float:
        """``r`` for a mapping: fixed, or the sensitivity of its layer and kind (attn / mlp)."""
        if self.vision_weight is not None:
            return float(self.vision_weight)
        if self._sensitivity is None:
            raise RecipeError("MBQModifier: no sensitivities; set vision_weight or sensitivity.")
        match = re.match(rf"{re.escape(self._layer_prefix)}\.(\d+)\.(.*)$", mapping.balance_names[0])
        if match is None:
            raise RecipeError(
                f"MBQ mapping {mapping.smooth_name} -> {mapping.balance_names} is outside the language "
                f"model's decoder layers ({self._layer_prefix}); restrict the mappings to them."
            )
        layer_idx, rest = int(match.group(1)), match.group(2)
        kind = "mlp" if any(part in rest for part in _MLP_PARTS) else "attn"
        try:
            return float(self._sensitivity.ratios[layer_idx][kind])
        except KeyError as err:
            raise RecipeError(
                f"MBQ sensitivities have no entry for layer {layer_idx} kind {kind!r}; they were computed "
                "for another model. Recompute them for this model or set vision_weight."
            ) from err

    def _compute_best_scale(
        self,
        mapping: ResolvedMapping,
        fp16_outputs: list[torch.Tensor],
        orig_layer_weights: dict[Module, torch.Tensor],
    ) -> torch.Tensor:
        self._active_mapping = mapping
        self._active_vision_weight = self._vision_weight_for(mapping)
        self._active_masks = self._token_masks(fp16_outputs)
        name = mapping.smooth_name
        if self.activation_stats_tokens == "all":
            # AWQ's loop reads x_mean from _smooth_activation_stats; give it the all-token statistics.
            self._smooth_activation_stats[name] = self._all_token_stats.pop(name)
        handles = []
        if self._resolved_act_bits is not None:
            x_sum, count = self._smooth_activation_stats[name]
            if is_distributed():
                x_sum, count = allreduce_data_sum([x_sum, count])
            device = get_execution_device(mapping.parent)
            self._x_mean_for_wa = x_sum.to(device) / count.to(device)
            bits = self._resolved_act_bits

            def wa_input_hook(_module, args, kwargs):
                # the parent may be the linear itself, replayed as module(input=x) from the cache
                if args:
                    return (wa_candidate_input(args[0], self._wa_scales, bits), *args[1:]), kwargs
                kwargs = dict(kwargs)
                kwargs["input"] = wa_candidate_input(kwargs["input"], self._wa_scales, bits)
                return args, kwargs

            # raw torch hooks: AWQ runs the grid search inside HooksMixin.disable_hooks()
            handles = [
                layer.register_forward_pre_hook(wa_input_hook, with_kwargs=True)
                for layer in mapping.balance_layers
            ]
        try:
            best = super()._compute_best_scale(mapping, fp16_outputs, orig_layer_weights)
        finally:
            for handle in handles:
                handle.remove()
            self._active_mapping = None
            self._active_masks = None
            self._wa_scales = None
        if self._error_metrics:
            self._error_metrics[-1]["vision_weight"] = self._active_vision_weight
        return best

    def _token_masks(self, fp16_outputs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per batch ``(text, vision)`` boolean masks, on the outputs' device (fixed per mapping)."""
        loss_masks = active_session().state.loss_masks
        masks = []
        for batch_idx, reference in enumerate(fp16_outputs):
            mask = loss_masks[batch_idx]
            if mask is None:
                raise CalibrationDataError(
                    f"Calibration batch {batch_idx} has no loss_mask; every row needs one for MBQ."
                )
            mask = mask.to(reference.device).view(reference.shape[:-1])
            masks.append(modality_token_masks(mask, self.text_tokens))
        return masks

    def _get_grid_search_params(self):
        if self.duo_scaling is not False:
            if self._resolved_act_bits is not None:
                raise RecipeError("MBQModifier's weight-activation mode needs duo_scaling: false.")
            return super()._get_grid_search_params()
        return self._alpha_candidates(alpha_grid(self.n_grid, self.alpha_grid))

    def _alpha_candidates(self, alphas: list[float]) -> "_AlphaCandidates":
        return _AlphaCandidates(self, alphas)

    @torch.no_grad()
    def _compute_loss(self, fp16_outputs: list[torch.Tensor], int_w_outputs: list[torch.Tensor]) -> float:
        """Modality-weighted reconstruction error of the parent's output (Eq. 16-17)."""
        sums: ModalityErrorSums | None = None
        for (reference, candidate), (text, vision) in zip(zip(fp16_outputs, int_w_outputs), self._active_masks):
            batch_sums = masked_error_sums(reference, candidate, text, vision, self.loss_mode)
            sums = batch_sums if sums is None else sums + batch_sums
        if is_distributed():
            sums = ModalityErrorSums.from_tensors(allreduce_data_sum(sums.as_tensors()), sums.channels)
        loss = modality_weighted_loss(
            sums,
            vision_weight=self._active_vision_weight,
            text_weight=self.text_weight,
            loss_mode=self.loss_mode,
            normalization=self.loss_normalization,
        )
        return loss.item()
