"""``MBQModifier``: modality-balanced quantization (MBQ, CVPR'25) as an llm-compressor Modifier.

MBQ is AWQ's per-channel scale search with one change: the reconstruction loss weighs vision-token
error by the vision/text gradient ratio of each layer (:mod:`qvlm_modifiers.mbq.sensitivity`,
:mod:`qvlm_modifiers.mbq.loss`). This class therefore *is* llm-compressor's ``AWQModifier`` with

- the loss replaced (modality-weighted MAE by default, Eq. 16-17),
- MBQ's alpha grid ``k/20`` (k=0..19) and no weight term (``duo_scaling=False``; ``duo_scaling:
  true`` switches to llm-compressor AWQ's duo form and grid, for a matched comparison),
- optionally AWQ's activation-aware weight clip search after the scales (``clip_search``,
  :mod:`qvlm_modifiers.mbq.clip_search`), token-weighted by the modality weights,
- per-mapping diagnostics in the log and the run record (:mod:`qvlm_modifiers.mbq.diagnostics`),
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
      text_tokens: answer        # loss_mask == 1: the labelled assistant turn (reference)
      duo_scaling: false         # true: AWQModifier's x^a / w^(1-a) grid (20 points incl. identity)
      clip_search: false         # true: AWQ auto_clip-style clip search after the scales
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
- "text" = the labelled tokens, ``loss_mask == 1``: with :func:`~qvlm_modifiers.data.build_calibration_dataset`'s
  default the whole assistant turn (header, answer, end-of-turn: the reference's ``labels != -100``),
  with its ``text_mask="answer"`` the answer only (a departure); ``text_tokens="all_text"`` for the
  paper's "language tokens" (every non-vision token);
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
- ``clip_search`` is not in the MBQ reference (which has no clipping); it is AWQ's ``auto_clip``,
  offered so that MBQ and its AWQ baseline (MBQ with uniform weights: ``vision_weight: 1``,
  ``text_tokens: all_text``) can be compared with the same clipping.
"""

from __future__ import annotations

import math
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
from qvlm_modifiers.mbq import diagnostics as mbq_diagnostics
from qvlm_modifiers.mbq.clip_search import (
    apply_clip,
    clip_ratios,
    modality_token_weights,
    search_clip,
    strided_sample,
)
from qvlm_modifiers.mbq.scale_search import AlphaGrid, alpha_grid, candidate_scales, duo_grid, wa_candidate_input
from qvlm_modifiers.mbq.sensitivity import ModalitySensitivity, compute_modality_sensitivity

__all__ = ["MBQModifier"]

_MLP_PARTS = ("mlp", "feed_forward", "gate_proj", "up_proj", "down_proj")


class _GridCandidates:
    """The ``(alpha, duo)`` grid for AWQ's loop (sized, so its progress bar has a total).

    AWQ's loop turns each yielded candidate into scales; in W-A mode the input hook needs the same
    scales, so they are computed here (same formula) right before the loop uses the candidate.
    """

    def __init__(self, modifier: "MBQModifier", grid: list[tuple[float, bool]]):
        self.modifier, self.grid = modifier, grid

    def __len__(self) -> int:
        return len(self.grid)

    def __iter__(self) -> Iterator[tuple[float, bool]]:
        mod = self.modifier
        for alpha, duo in self.grid:
            if mod._resolved_act_bits is not None:
                mod._wa_scales = candidate_scales(mod._x_mean_for_wa, alpha, duo, mod._w_mean_for_wa)
            yield alpha, duo


class _ClipCapture:
    """Inputs of a mapping's balance layers, captured during the first grid candidate's forward and
    sampled per batch and modality (the balance layers' inputs do not depend on their weights)."""

    def __init__(self, masks: list[tuple[torch.Tensor, torch.Tensor]], tokens_per_modality: int):
        self.masks = masks
        self.per_batch = max(1, math.ceil(tokens_per_modality / max(1, len(masks))))
        self.open = True
        self.failed = False
        self.batches = 0
        self.text: list[torch.Tensor] = []
        self.vision: list[torch.Tensor] = []
        self.text_count = 0
        self.vision_count = 0

    def __call__(self, _module, args, kwargs):
        if not self.open:
            return None
        x = args[0] if args else kwargs.get("input")
        if x is None or self.batches >= len(self.masks):
            self.failed = True
            return None
        text, vision = self.masks[self.batches]
        self.batches += 1
        flat = x.detach().reshape(-1, x.shape[-1])
        for mask, store in ((text, self.text), (vision, self.vision)):
            idx = mask.reshape(-1).to(flat.device).nonzero().view(-1)
            if idx.numel():
                store.append(flat[idx[strided_sample(idx.numel(), self.per_batch).to(idx.device)]].float())
        self.text_count += int(text.sum())
        self.vision_count += int(vision.sum())
        return None


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
        ``"answer"`` (reference: ``loss_mask == 1`` only, i.e. the labelled assistant turn with
        :func:`~qvlm_modifiers.data.build_calibration_dataset`'s default ``text_mask``, or the answer
        alone with ``text_mask="answer"``; prompt/template get weight 0) or
        ``"all_text"`` (every non-vision token, the paper's "language tokens")
    :param activation_stats_tokens: tokens averaged into ``mean|x|`` for the scales: ``"all"``
        (reference, includes prompt tokens) or ``"masked"`` (AWQModifier's ``loss_mask != 0``)
    :param alpha_grid: ``"mbq"``: ``alpha = k/n_grid``, k=0..n_grid-1 (0..0.95 for 20; reference);
        ``"awq"``: ``k/(n_grid-1)`` (includes 1.0; AWQModifier)
    :param n_grid: number of alpha grid points (20 in MBQ)
    :param duo_scaling: MBQ uses activation-only scales (``False``, reference). ``True``: llm-compressor
        AWQModifier's duo scaling, ``s = x_mean^a / (w_mean^(1-a) + 1e-4)`` (``w_mean``: per input
        channel mean of ``|W|`` normalised per quantization group), clamped and normalised as AWQ,
        on AWQ's grid: the identity plus ``a = k/(n_grid-2)``, k=0..n_grid-2 (``n_grid`` candidates
        in all; ``alpha_grid`` does not apply). ``"both"``: AWQ's half-and-half grid. With
        ``vision_weight: 1, text_tokens: all_text, loss_mode: mse, loss_normalization: pooled`` the
        choice is AWQModifier's (a departure from MBQ, for matched comparisons). Works in W-A mode
    :param clip_search: after the scales, search a clipping threshold per weight quantization group
        (AWQ's ``auto_clip``: ratios 1.0 down to ``1 - clip_max_shrink``, minimising the group's
        squared output error on the layer's calibration inputs, token-weighted by the modality
        weights; :mod:`qvlm_modifiers.mbq.clip_search`). Needs group or channel int weights. Not in
        the MBQ reference; ``False`` (default) keeps it out
    :param clip_grid: AWQ's ``n_grid`` of the clip search (ratios ``1 - i/clip_grid``)
    :param clip_max_shrink: smallest ratio is above ``1 - clip_max_shrink`` (AWQ: 0.5)
    :param clip_tokens: calibration tokens sampled per modality for the clip search (AWQ: 512 in all)
    :param clip_skip: balance layers whose name contains one of these are not clipped (AWQ skips
        the query/key projections: their error matters through the attention scores)
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
    clip_search: bool = False
    clip_grid: int = Field(default=20, ge=2)
    clip_max_shrink: float = Field(default=0.5, gt=0, lt=1)
    clip_tokens: int = Field(default=512, ge=1)
    clip_skip: list[str] = Field(default_factory=lambda: ["q_", "k_", "query", "key", "Wqkv"])

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
    _w_mean_for_wa: torch.Tensor | None = PrivateAttr(default=None)
    _grid: list[tuple[float, bool]] = PrivateAttr(default_factory=list)
    _candidate_results: list[tuple[float, ModalityErrorSums]] = PrivateAttr(default_factory=list)
    _clip_capture: _ClipCapture | None = PrivateAttr(default=None)
    _mapping_diagnostics: list[dict[str, Any]] = PrivateAttr(default_factory=list)

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

    def _check_clip_search(self) -> None:
        """clip_search needs per-group / per-channel int weights on every layer it clips."""
        if not self.clip_search:
            return
        if is_distributed():
            raise RecipeError(
                "MBQModifier's clip_search runs on one process's calibration tokens only; with distributed "
                "calibration the ranks would clip differently. Set clip_search: false or run on one process."
            )
        for mapping in self._resolved_mappings:
            for name, layer in zip(mapping.balance_names, mapping.balance_layers):
                args = getattr(getattr(layer, "quantization_scheme", None), "weights", None)
                if args is None or any(skip in name for skip in self.clip_skip):
                    continue
                per_group = args.strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.CHANNEL)
                if not per_group or args.type != "int":
                    raise RecipeError(
                        f"MBQModifier's clip_search clips per quantization group, but {name} is quantized with "
                        f"{args.type} weights, strategy {args.strategy}. Use int weights with strategy 'group' or "
                        "'channel', or set clip_search: false."
                    )

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        super().on_calibration_start(state, event, **kwargs)
        self._resolved_act_bits = self._resolve_act_bits()
        self._check_clip_search()
        self._mapping_diagnostics = []
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
                "Every calibration loss_mask is 0: no text (1) or image (2) token to weigh. Check the "
                "dataset's text/answer column and the image placeholder tokens."
            )

    def on_finalize(self, state: State, **kwargs) -> bool:
        mbq_diagnostics.publish(self.diagnostics())
        result = super().on_finalize(state, **kwargs)
        if self._derived_masks is not None:
            self._derived_masks.detach()
        self._all_token_stats.clear()
        self._active_mapping = None
        self._wa_scales = None
        self._w_mean_for_wa = None
        return result

    def diagnostics(self) -> dict[str, Any]:
        """What this run chose (settings, sensitivities, per mapping; :mod:`qvlm_modifiers.mbq.diagnostics`)."""
        return {
            "settings": {
                "duo_scaling": self.duo_scaling,
                "n_grid": self.n_grid,
                "alpha_grid": self.alpha_grid,
                "loss_mode": self.loss_mode,
                "loss_normalization": self.loss_normalization,
                "text_tokens": self.text_tokens,
                "vision_weight": self.vision_weight,
                "text_weight": self.text_weight,
                "act_bits": self._resolved_act_bits,
                "clip_search": self.clip_search,
                "clip_ratios": clip_ratios(self.clip_grid, self.clip_max_shrink) if self.clip_search else None,
            },
            "sensitivity": self._sensitivity.to_dict() if self._sensitivity is not None else None,
            "mappings": list(self._mapping_diagnostics),
        }

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
        self._candidate_results = []
        self._clip_capture = None
        if self.clip_search:
            # registered first, so in W-A mode it sees the inputs before the activation fake-quant
            self._clip_capture = _ClipCapture(self._active_masks, self.clip_tokens)
            handles.append(
                mapping.balance_layers[0].register_forward_pre_hook(self._clip_capture, with_kwargs=True)
            )
        if self._resolved_act_bits is not None:
            x_sum, count = self._smooth_activation_stats[name]
            if is_distributed():
                x_sum, count = allreduce_data_sum([x_sum, count])
            device = get_execution_device(mapping.parent)
            self._x_mean_for_wa = x_sum.to(device) / count.to(device)
            self._w_mean_for_wa = None
            if self.duo_scaling:  # AWQ's w_mean, from the balance layers before any candidate
                self._w_mean_for_wa = self._compute_layer_means(mapping.balance_layers).to(device)
            bits = self._resolved_act_bits

            def wa_input_hook(_module, args, kwargs):
                # the parent may be the linear itself, replayed as module(input=x) from the cache
                if args:
                    return (wa_candidate_input(args[0], self._wa_scales, bits), *args[1:]), kwargs
                kwargs = dict(kwargs)
                kwargs["input"] = wa_candidate_input(kwargs["input"], self._wa_scales, bits)
                return args, kwargs

            # raw torch hooks: AWQ runs the grid search inside HooksMixin.disable_hooks()
            handles += [
                layer.register_forward_pre_hook(wa_input_hook, with_kwargs=True)
                for layer in mapping.balance_layers
            ]
        try:
            best = super()._compute_best_scale(mapping, fp16_outputs, orig_layer_weights)
            record = self._mapping_record(mapping)
            if self._clip_capture is not None:
                record["clip"] = self._clip_balance_layers(mapping, best, orig_layer_weights)
        finally:
            for handle in handles:
                handle.remove()
            self._active_mapping = None
            self._active_masks = None
            self._wa_scales = None
            self._clip_capture = None
            self._candidate_results = []
        self._mapping_diagnostics.append(record)
        self._log_mapping(record)
        if self._error_metrics:
            self._error_metrics[-1]["vision_weight"] = self._active_vision_weight
            self._error_metrics[-1]["alpha"] = record["alpha"]
        return best

    # ------------------------------------------------------------------ diagnostics and clipping
    def _mapping_record(self, mapping: ResolvedMapping) -> dict[str, Any]:
        """Chosen candidate and identity-vs-chosen losses of the grid just searched."""
        losses = [loss for loss, _ in self._candidate_results]
        chosen = mbq_diagnostics.chosen_index(losses)
        alpha, duo = self._grid[chosen]
        identity_loss, identity_sums = self._candidate_results[0]  # every grid starts with s = 1
        chosen_loss, chosen_sums = self._candidate_results[chosen]
        ident, best = mbq_diagnostics.modality_errors(identity_sums), mbq_diagnostics.modality_errors(chosen_sums)
        return {
            "mapping": mapping.smooth_name,
            "balance_layers": list(mapping.balance_names),
            "vision_weight": self._active_vision_weight,
            "alpha": alpha,
            "duo_scaling": duo,
            "grid_index": chosen,
            "loss": {"identity": identity_loss, "chosen": chosen_loss},
            "text_error": {"identity": ident["text"], "chosen": best["text"]},
            "vision_error": {"identity": ident["vision"], "chosen": best["vision"]},
        }

    @staticmethod
    def _log_mapping(record: dict[str, Any]) -> None:
        def pair(d):
            a, b = d["identity"], d["chosen"]
            return "n/a" if a is None or b is None else f"{a:.3e} -> {b:.3e}"

        line = (
            f"MBQ {record['mapping']}: alpha={record['alpha']:.3f}{' (duo)' if record['duo_scaling'] else ''} "
            f"r={record['vision_weight']:.4g}; loss identity -> chosen {pair(record['loss'])}; text "
            f"{pair(record['text_error'])}; vision {pair(record['vision_error'])}"
        )
        if record.get("clip"):
            line += "; clip " + ", ".join(
                f"{name.rsplit('.', 1)[-1]} mean ratio {c['mean_ratio']:.3f} ({c['clipped_fraction']:.0%} clipped)"
                for name, c in record["clip"].items()
            )
        logger.info(line)

    def _clip_balance_layers(
        self, mapping: ResolvedMapping, scales: torch.Tensor, orig_layer_weights: dict[Module, torch.Tensor]
    ) -> dict[str, dict[str, float]]:
        """AWQ ``auto_clip`` on the scaled balance layers. The clipped weights replace the entries of
        ``orig_layer_weights`` (unscaled, clipped at ``m / s``), which AWQ's ``_apply_smoothing``
        multiplies by ``s`` right after this returns: the deployed weight is ``clamp(W*s, -m, m)``."""
        capture = self._clip_capture
        if capture.failed or capture.batches != len(capture.masks):
            logger.warning(
                f"MBQ clip search skipped for {mapping.smooth_name}: its balance layers were not called once "
                f"per calibration batch ({capture.batches} calls for {len(capture.masks)} batches)."
            )
            return {}
        parts = [torch.cat(capture.text)] if capture.text else []
        parts += [torch.cat(capture.vision)] if capture.vision else []
        if not parts:
            return {}
        inputs = torch.cat([p.to(parts[0].device) for p in parts])
        n_text = parts[0].shape[0] if capture.text else 0
        is_vision = torch.arange(inputs.shape[0]) >= n_text
        normalization = self.loss_normalization
        if normalization == "reference":
            normalization = "pooled" if self.loss_mode == "mae" else "per_modality"
        weights = modality_token_weights(
            is_vision, capture.text_count, capture.vision_count,
            vision_weight=self._active_vision_weight, text_weight=self.text_weight, normalization=normalization,
        )
        s = scales.to(inputs.device, torch.float32)
        scaled_inputs = inputs / s.view(1, -1)
        ratios = clip_ratios(self.clip_grid, self.clip_max_shrink)
        out: dict[str, dict[str, float]] = {}
        for name, layer in zip(mapping.balance_names, mapping.balance_layers):
            args = getattr(getattr(layer, "quantization_scheme", None), "weights", None)
            if args is None or any(skip in name for skip in self.clip_skip):
                continue
            weight = orig_layer_weights[layer]
            group_size = args.group_size if args.strategy == QuantizationStrategy.GROUP else weight.shape[1]
            scaled = weight.to(inputs.device, torch.float32) * s.view(1, -1)
            max_val, idx = search_clip(scaled, scaled_inputs, weights, group_size, _row_fake_quant(args), ratios)
            orig_layer_weights[layer] = apply_clip(weight, max_val.to(weight.device), group_size, scales=scales)
            chosen = torch.tensor(ratios)[idx.cpu()]
            out[name] = {"mean_ratio": float(chosen.mean()), "clipped_fraction": float((idx > 0).float().mean())}
        return out

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
        if self.duo_scaling is False:
            self._grid = [(alpha, False) for alpha in alpha_grid(self.n_grid, self.alpha_grid)]
        else:  # AWQModifier's duo grid, the identity (0, False) first
            self._grid = duo_grid(self.n_grid, self.duo_scaling)
        return _GridCandidates(self, self._grid)

    @torch.no_grad()
    def _compute_loss(self, fp16_outputs: list[torch.Tensor], int_w_outputs: list[torch.Tensor]) -> float:
        """Modality-weighted reconstruction error of the parent's output (Eq. 16-17)."""
        if self._clip_capture is not None:
            self._clip_capture.open = False  # the first candidate's forward has delivered the inputs
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
        self._candidate_results.append((loss.item(), sums))
        return loss.item()


def _row_fake_quant(args):
    """The follow-up scheme's weight quantizer applied to each row of a ``(rows, group)`` tensor, with
    qparams from the row's own min/max (compressed-tensors' ``calculate_qparams`` + ``fake_quantize``)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    per_row = args.model_copy(update={"strategy": QuantizationStrategy.CHANNEL, "group_size": None})

    def fake_quant(rows: torch.Tensor) -> torch.Tensor:
        scale, zero_point = calculate_qparams(rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True), args)
        return fake_quantize(rows, scale, zero_point, per_row)

    return fake_quant
