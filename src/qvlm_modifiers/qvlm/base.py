"""``QVLMModifier``: Q-VLM (NeurIPS 2024, arXiv 2410.08119) as an llm-compressor Modifier.

The recipe fields and the lifecycle; the math and the plumbing are in the modules beside it (see
:mod:`qvlm_modifiers.qvlm` for the map). This follows the paper, not the released reference code.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
from compressed_tensors.utils import match_named_modules
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator

from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.quantization.quantization import QuantizationMixin
from llmcompressor.modifiers.utils.hooks import HooksMixin

from qvlm_modifiers.errors import RecipeError
from qvlm_modifiers.families import decoder_layers, get_family
from qvlm_modifiers.modality import DerivedLossMasks
from qvlm_modifiers.qvlm.block_search import BlockSearchResult, search_block
from qvlm_modifiers.qvlm.cached_forward import (
    WEIGHT_KEY_ATTR,
    cached_weight_forward,
    quantization_enabled,
    replay_linear_outputs,
)
from qvlm_modifiers.qvlm.capture import LayerCall, layer_runner, record_layer_call, split_hidden
from qvlm_modifiers.qvlm.entropy import JointLevelAccumulator, spread_token_mask
from qvlm_modifiers.qvlm.clip_search import CLIP_MAX_TOKENS, clip_ratio_grid, clip_input_tokens
from qvlm_modifiers.qvlm.gptq_rounding import PipelineHessians, gptq_quantize_states
from qvlm_modifiers.qvlm.guard import GuardDecision, guard_decision, holdout_batch_indices
from qvlm_modifiers.qvlm.metadata import (
    METADATA_ATTRIBUTE,
    block_record,
    guard_fields,
    partition_metadata,
    write_metadata,
)
from qvlm_modifiers.qvlm.objective import (
    BlockObjectiveKind,
    LinearOutputReplay,
    batch_squared_errors,
    calibration_token_weights,
)
from qvlm_modifiers.qvlm.partition import OnlinePartitioner
from qvlm_modifiers.qvlm.range_variables import (
    commit_qparams,
    init_ranges_outside_decoder,
    linear_range_variables,
    register_act_sampling,
    register_clip_sampling,
    weight_candidate_mode,
)
from qvlm_modifiers.qvlm.ranges import DEFAULT_PERCENTILES, DEFAULT_SHRINK_FACTORS
from qvlm_modifiers.qvlm.scheme import check_scheme, entropy_levels, ignored_outside_lm
from qvlm_modifiers.qvlm.stream import BlockHandover
from qvlm_modifiers.qvlm.visual import optimize_vision_encoder as run_veo

__all__ = ["QVLMModifier", "METADATA_ATTRIBUTE"]


class QVLMModifier(Modifier, QuantizationMixin):
    """Q-VLM: entropy-guided block partition + joint block-wise range search.

    Sample recipe (``recipes/qvlm_w4.yaml``)::

        quant_stage:
          quant_modifiers:
            QVLMModifier:
              scheme: W4A16         # or config_groups, like QuantizationModifier
              targets: [Linear]
              max_block_layers: 3

    Lifecycle (one decoder layer per pipeline subgraph by default; blocks are the Modifier's own):

    - on_initialize: add ``lm_head`` + vision tower/projector (unless ``quantize_vision_tower``)
      to ``ignore``, check and attach the scheme (:mod:`.scheme`)
    - on_calibration_start: with ``optimize_vision_encoder``, VEO first (Eq. 8-10); then hooks on
      every decoder layer: a pre-hook records each batch's call (:mod:`.capture`), a forward hook
      streams ``(h_k, h_{k+1})`` into the layer's Eq. 4-5 accumulator
    - on_sequential_epoch_end (decoder layer k calibrated): ``D(k, k+1)`` decides whether layer k+1
      joins k's block (Eq. 7, online greedy). A closed block gets its ranges searched (Eq. 2 then
      Eq. 3, from min/max; with ``gptq_weight_ranges: gptq`` the weight ranges are GPTQ's choice
      instead) on the cached inputs of the rows not held out, kept only if they do not
      raise the objective against min/max on the held-out rows (:mod:`.guard`; with GPTQ inside on
      both sides), written as qparams, its weights fake-quantized so that the next blocks see them
      (as GPTQ does). Quantized Linears outside the decoder get lp-norm ranges
    - with ``realign_stream``, the pipeline's propagation pass of a closed block's last layer
      carries the block's quantized-path output on (:mod:`.stream`)
    - on_calibration_end: freeze quantization, remove hooks, write ``model.config.qvlm_blocks``
      (:mod:`.metadata`)

    Quantization fields (``scheme``, ``config_groups``, ``targets``, ``ignore``) are those of
    ``QuantizationModifier``; ranges end up as standard ``weight_scale`` / ``weight_zero_point``
    (``input_*`` for static activations). The streams ``X_q`` / ``X_r`` stay on the offload device.

    :param max_block_layers: most decoder layers per block (paper: 3; Fig. 3a)
    :param entropy_threshold: h0 of Eq. 7. ``None`` = the running mean of the dependencies
        observed so far (see :mod:`qvlm_modifiers.qvlm.partition`)
    :param entropy_estimator: ``"soft"`` (Eq. 5, temperature = quantization step) or ``"hard"``
        (round-to-nearest level counts). M, the number of levels, is ``2**num_bits`` of the
        input-activation quantizer when activations are quantized with <= 8 bits, else 16
    :param entropy_max_tokens: tokens per calibration batch whose pairs ``(h_k, h_{k+1})`` enter
        D(k, k+1), evenly spaced (``null`` = every token). Eq. 5's soft assignment costs M
        exponentials per element; a regular sample estimates the same joint distribution
    :param weight_candidates: the weight ranges the search may choose besides min/max (candidate 0,
        plain round-to-nearest, the start of every search; issue #24): ``"auto"`` = ``"minmax"`` at
        >= 6 weight bits (no weight clipping), else ``"clip"`` for group/channel weights (else
        ``"percentile"``); ``"clip"``: AWQ's activation-aware per-group clip ratios
        (:mod:`qvlm_modifiers.qvlm.clip_search`), chosen per Linear on its inputs and refined
        jointly in the block (one candidate per ``clip_strengths``); ``"percentile"``: the paper's
        one percentile per Linear (``percentile_grid``) and the lp-norm range; ``"minmax"``: none.
        Static input activations always get the paper's candidates (activation range search)
    :param clip_grid: steps of the clip-ratio grid ``1 - i / clip_grid`` (AWQ: 20)
    :param clip_max_shrink: smallest clip ratio is ``1 - clip_max_shrink`` (AWQ: 0.5)
    :param clip_strengths: candidates per Linear besides min/max: AWQ's per-group ratios moved
        toward 1.0, ``1 - s (1 - r)`` for each ``s`` (1 = AWQ's choice, the default; each extra
        strength adds one evaluation per Linear and pass; ``[1.0, 0.5]`` was the former default)
    :param clip_exclude_first_token: the clip search ignores token position 0 (the attention sink)
    :param search_holdout: fraction of the calibration batches the search never sees; a block keeps
        its searched ranges only if its objective on them does not rise against min/max's, else it
        reverts to min/max (:mod:`qvlm_modifiers.qvlm.guard`). 0 = compare on all rows. Needs >= 2 batches to hold any out
    :param search_replay: while one Linear's candidates are tried, the Linears before it in its
        layer replay their outputs instead of running again (exact; costs their outputs on the search
        samples in memory, on the execution device; :class:`~qvlm_modifiers.qvlm.objective.LinearOutputReplay`)
    :param percentile_grid: candidate clipping percentiles of the block search (paper), for static
        activations and ``weight_candidates: percentile``
    :param init_shrink_factors: shrink factors of the min/max range tried by the lp-norm range
        initialisation (reference code's grid; ``[1.0]`` = min/max, as the RTN matrix cells use); an
        extra candidate after min/max, and the ranges of quantized Linears outside the decoder
    :param search_epochs: coordinate-descent passes per block, layer-wise and joint (paper: 10);
        stops earlier once a pass changes nothing. Default 1: one greedy pass, part of the cost
        budget of issue #24 (calibration within 2x GPTQ's; ``eval/results/smolvlm-tiny-v2/
        bench_recipe_cost_qvlm.txt``); more passes refine the same candidates
    :param search_samples: evaluate the search objective on this many of the calibration samples
        not held out only, spread evenly (``null`` = all of them, the exact search; default 16, the
        cost budget above). For a block of several layers the reported losses are on all samples
        not held out, and a joint solution worse there than the layer-wise one is not kept
        (``"kept_layerwise"``)
    :param block_objective: ``"token_relative_mse"`` (default; not in the paper: each token's squared
        error divided by its FP output's squared norm), ``"mse"`` (Eq. 2-3 as written) or
        ``"mse_skip_first"`` (Eq. 3 without token position 0, the attention sink). The objective of
        the search, of the guard and of every reported block loss. The default is the objective that
        ranked clip-range candidates closest to the assistant-turn KL on the default model (Spearman
        0.82 vs Eq. 3's 0.77, tied with skip-first and the next layer's normalized input;
        ``eval/results/smolvlm-tiny-v2/qvlm_objectives.md``, issue #24)
    :param vision_token_weight: weight of image-token errors in every block objective, text tokens
        weighing 1 (``1.0`` = Eq. 3). Not in the paper (MBQ's finding); needs per-token modality
        labels (the rows' ``loss_mask``, or derived by :mod:`qvlm_modifiers.modality`)
    :param block_target: ``"fp"`` (Eq. 3: the FP path from the FP block input) or
        ``"quant_input"`` (FP block applied to the quantized-path input, GPTQ-style)
    :param block_init: ``"layerwise"``: Eq. 2 per layer (from min/max), then Eq. 3 over the block
        from the layer-wise solution; ``"rtn"`` (former name ``"lp_norm"``): Eq. 3 from min/max only
    :param quantize_vision_tower: quantize the vision tower's Linears too (same scheme, dynamic
        per-token activations as the paper's vision side). The projector always stays in FP
    :param gptq_rounding: GPTQ chooses the integers inside the ranges
        (:mod:`qvlm_modifiers.qvlm.gptq_rounding`, GPTQModifier's order and inputs), run with the
        block's chosen ranges and with min/max in one pass; the guard keeps the better (so the
        reference is GPTQModifier's result). Off by default; on in the shipped ``qvlm_w4``
    :param gptq_weight_ranges: with ``gptq_rounding``, who chooses each weight's range among its
        candidates: ``"search"`` the block search (Eq. 2-3, round-to-nearest inside; GPTQ then runs
        in the ranges it chose), ``"gptq"`` GPTQ itself, in the loop: each Linear keeps the candidate
        with the lowest GPTQ error on its inputs (:func:`~qvlm_modifiers.qvlm.gptq_rounding.gptq_quantize_states`),
        and the block search is left to the static activation ranges (skipped when there are none).
        Ranges tuned for round-to-nearest clip what GPTQ would compensate: on the default model the
        guard rejected the searched ranges in 19-20 of 22 blocks (``qvlm_w4_gptq``)
    :param gptq_actorder: GPTQ's act-order ``"static"`` (GPTQModifier's default); false = natural
        column order
    :param realign_stream: hand each closed block's quantized-path output to llm-compressor's
        pipeline (:mod:`.stream`). The pipeline propagates each decoder layer as it is when the
        layer's epoch ends, which inside a multi-layer block is full precision; so without this,
        from the first multi-layer block on, the activations the later layers are calibrated on
        (the entropy of Eq. 4, GPTQ's Hessians) are not the quantized model's (Eq. 1's ``X_q``).
        With it they are, GPTQ's Hessians of every block's first layer come from the pipeline's
        pass, and one-layer blocks take their output rows from the pipeline's propagation (checked
        bit for bit) instead of a pass of their own. On in the shipped ``qvlm_w4``; off by default
        (the eval recipes' runs were made without it)
    :param optimize_vision_encoder: visual-encoder optimization (Eq. 8-10,
        :mod:`qvlm_modifiers.qvlm.visual`): before the sequential pass, learn the quantized vision
        tower's weight ranges by gradient descent. Needs ``quantize_vision_tower: true``
    :param vision_lambda_ent: lambda1 of Eq. 10 (the paper gives none; defaults (0.1, 1, 0.5) for
        (lambda1, lambda2, eta) from ``eval/results/smolvlm-tiny/veo_sweep.md``, where VEO lowered
        the answer KL in every configuration but could not rank them)
    :param vision_lambda_err: lambda2 of Eq. 10
    :param vision_eta: eta of Eq. 9 (paper: a "medium" value is best)
    :param vision_lr: Adam learning rate of the range log-multipliers
    :param vision_epochs: passes over the calibration set (paper: 10)
    """

    requires_calibration_data: bool = True
    # the paper's W4A4 / W6A6 run as fake-quant simulation (no integer A4/A6 GEMM in vLLM);
    # qvlm_modifiers.recipe_check accepts these input-activation widths for this Modifier
    simulated_activation_bits: ClassVar[tuple[int, ...]] = (4, 6)

    max_block_layers: int = Field(default=3, ge=1)
    entropy_threshold: float | None = None
    entropy_estimator: Literal["soft", "hard"] = "soft"
    entropy_max_tokens: int | None = Field(default=32, ge=1)
    percentile_grid: list[float] = Field(default_factory=lambda: list(DEFAULT_PERCENTILES))
    init_shrink_factors: list[float] = Field(default_factory=lambda: list(DEFAULT_SHRINK_FACTORS))
    search_epochs: int = Field(default=1, ge=0)
    search_samples: int | None = Field(default=16, ge=1)
    block_objective: BlockObjectiveKind = "token_relative_mse"
    vision_token_weight: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    block_target: Literal["fp", "quant_input"] = "fp"
    block_init: Literal["layerwise", "rtn", "lp_norm"] = "layerwise"
    quantize_vision_tower: bool = False
    gptq_rounding: bool = False
    gptq_actorder: bool = True
    gptq_weight_ranges: Literal["search", "gptq"] = "search"
    realign_stream: bool = False
    weight_candidates: Literal["auto", "clip", "percentile", "minmax"] = "auto"
    clip_grid: int = Field(default=20, ge=1)
    clip_max_shrink: float = Field(default=0.5, ge=0.0, lt=1.0)
    clip_strengths: list[float] = Field(default_factory=lambda: [1.0])
    clip_exclude_first_token: bool = True
    search_holdout: float = Field(default=0.25, ge=0.0, lt=1.0)
    search_replay: bool = True
    optimize_vision_encoder: bool = False
    vision_lambda_ent: float = Field(default=0.1, ge=0)
    vision_lambda_err: float = Field(default=1.0, ge=0)
    vision_eta: float = Field(default=0.5, ge=0)
    vision_lr: float = Field(default=1e-3, gt=0)
    vision_epochs: int = Field(default=10, ge=0)

    _layers: list[torch.nn.Module] = PrivateAttr(default_factory=list)
    _layer_index: dict[int, int] = PrivateAttr(default_factory=dict)
    _layer_linears: dict[int, list[tuple[str, torch.nn.Module]]] = PrivateAttr(default_factory=dict)
    _module_names: dict[int, str] = PrivateAttr(default_factory=dict)
    _done: set[int] = PrivateAttr(default_factory=set)  # ids of Linears whose ranges are final
    _accumulators: dict[int, JointLevelAccumulator] = PrivateAttr(default_factory=dict)
    _templates: dict[int, list[LayerCall]] = PrivateAttr(default_factory=dict)
    _q_hidden: list[torch.Tensor] | None = PrivateAttr(default=None)
    _fp_hidden: list[torch.Tensor] | None = PrivateAttr(default=None)
    _partitioner: OnlinePartitioner | None = PrivateAttr(default=None)
    _block_losses: list[dict[str, Any]] = PrivateAttr(default_factory=list)
    _num_levels: int = PrivateAttr(default=16)
    _offload_device: torch.device = PrivateAttr(default=torch.device("cpu"))
    _veo_history: list[dict[str, float]] | None = PrivateAttr(default=None)
    _derived_masks: DerivedLossMasks | None = PrivateAttr(default=None)
    _pipeline_hessians: PipelineHessians | None = PrivateAttr(default=None)  # with gptq_rounding
    # with realign_stream: per block-closing decoder layer, its handover
    _handovers: dict[int, BlockHandover] = PrivateAttr(default_factory=dict)
    _handover_busy: bool = PrivateAttr(default=False)  # our own runs of a handing-over layer
    _rows_from_pipeline: bool = PrivateAttr(default=True)  # off after a handover mismatch
    _stream_hooks: list = PrivateAttr(default_factory=list)

    @field_validator("percentile_grid")
    @classmethod
    def _check_percentiles(cls, value: list[float]) -> list[float]:
        if not value or any(not 0.5 < p <= 1.0 for p in value):
            raise ValueError(f"percentile_grid must be a non-empty list of values in (0.5, 1.0], got {value}")
        return value

    @field_validator("clip_strengths")
    @classmethod
    def _check_clip_strengths(cls, value: list[float]) -> list[float]:
        if not value or any(not 0.0 < s <= 1.0 for s in value):
            raise ValueError(f"clip_strengths must be a non-empty list of values in (0, 1], got {value}")
        return value

    @field_validator("init_shrink_factors")
    @classmethod
    def _check_shrink(cls, value: list[float]) -> list[float]:
        if not value or any(not 0.0 < f <= 1.0 for f in value):
            raise ValueError(f"init_shrink_factors must be a non-empty list of values in (0, 1], got {value}")
        return value

    # -- lifecycle --------------------------------------------------------------------------------

    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        if self.optimize_vision_encoder and not self.quantize_vision_tower:
            raise RecipeError(
                "QVLMModifier: optimize_vision_encoder=true needs a quantized vision tower, but "
                "quantize_vision_tower is false. Set quantize_vision_tower: true in the recipe, or "
                "drop optimize_vision_encoder."
            )
        if self.gptq_weight_ranges == "gptq" and not self.gptq_rounding:
            raise RecipeError(
                "QVLMModifier: gptq_weight_ranges=gptq lets GPTQ choose the weight ranges, but "
                "gptq_rounding is false, so no GPTQ runs. Set gptq_rounding: true in the recipe, or "
                "drop gptq_weight_ranges."
            )
        if not QuantizationMixin.has_config(self):
            raise RecipeError(
                "QVLMModifier needs a quantization scheme: set `scheme` (e.g. W4A16) or "
                "`config_groups` in the recipe, as for QuantizationModifier."
            )
        extra = ignored_outside_lm([get_family(model).vision_regexes], self.quantize_vision_tower)
        self.ignore = list(self.ignore) + [i for i in extra if i not in self.ignore]
        self._resolved_config = None  # re-resolve with the family's ignore list
        check_scheme(self.resolved_config)
        QuantizationMixin.initialize_quantization(self, model)

        self._layers = list(decoder_layers(model))
        self._layer_index = {id(layer): i for i, layer in enumerate(self._layers)}
        self._module_names = {id(m): name for name, m in model.named_modules()}
        for i, layer in enumerate(self._layers):
            self._layer_linears[i] = [
                (name, m) for name, m in layer.named_modules() if getattr(m, "quantization_scheme", None) is not None
            ]
        self._num_levels = entropy_levels(self.resolved_config)
        calib = state.data.calib if state.data is not None else None
        if self.vision_token_weight != 1.0 and calib is not None:
            # modality labels for rows without a loss_mask (qvlm_modifiers.modality)
            self._derived_masks = DerivedLossMasks(model, type(self).__name__)
            self._derived_masks.index_dataset(getattr(calib, "dataset", calib))
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        QuantizationMixin.start_calibration(self, state.model)
        if self.optimize_vision_encoder:
            self._veo_history = run_veo(
                state.model, getattr(getattr(state, "data", None), "calib", None), self._done, self._num_levels,
                shrink_factors=self.init_shrink_factors, lambda_ent=self.vision_lambda_ent,
                lambda_err=self.vision_lambda_err, eta=self.vision_eta, lr=self.vision_lr, epochs=self.vision_epochs,
            )
        self._partitioner = OnlinePartitioner(max_block_layers=self.max_block_layers, threshold=self.entropy_threshold)
        for i, layer in enumerate(self._layers):
            self._accumulators[i] = JointLevelAccumulator(self._num_levels, estimator=self.entropy_estimator)
            self._templates[i] = []
            self.register_hook(layer, self._capture_call_hook, "forward_pre", with_kwargs=True)
            self.register_hook(layer, self._dependency_hook, "forward", with_kwargs=True)
        if self.gptq_rounding:  # a block's first-layer Hessians from the pipeline's own pass
            self._pipeline_hessians = PipelineHessians()
            for k in range(len(self._layers)):
                for _, m in self._layer_linears[k]:
                    self.register_hook(m, self._pipeline_hessians.hook, "forward_pre")
        if self.realign_stream:
            # plain torch hooks: the pipeline's propagation pass runs with HooksMixin hooks disabled
            self._stream_hooks = [layer.register_forward_hook(self._handover_hook) for layer in self._layers]
        self._q_hidden, self._fp_hidden = [], None
        if self._derived_masks is not None:
            self._derived_masks.attach(state.model, state)

    def on_sequential_epoch_end(self, state: State, event: Event, modules: list[torch.nn.Module], **kwargs):
        layer_ids = sorted({self._layer_index[id(m)] for m in modules if id(m) in self._layer_index})
        self._quantize_outside_decoder(modules)
        for k in layer_ids:
            self._finish_layer(k)

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self._settle_handovers()
        if self._partitioner is not None and self._partitioner.current and self._templates.get(self._partitioner.current[0]):
            self._close_block(self._partitioner.finish()[-1])
        # anything quantized that no subgraph handed us (e.g. a non-ignored lm_head)
        matched = match_named_modules(state.model, self.resolved_targets, self.ignore)
        self._quantize_outside_decoder([m for _, m in matched if id(m) not in self._done])
        QuantizationMixin.end_calibration(self, state.model)
        self.remove_hooks()
        self._remove_stream_hooks()
        if self._derived_masks is not None:
            self._derived_masks.detach()
        if self._partitioner is not None:
            write_metadata(state.model, self._metadata())
        self._templates.clear()
        self._q_hidden = self._fp_hidden = None
        self._pipeline_hessians = None

    def on_finalize(self, state: State, **kwargs) -> bool:
        self._remove_stream_hooks()
        if not self.ended_:
            self.on_end(state, None)
        return True

    def resolve_quantization_config(self):
        """The scheme, with ``lm_head`` and the vision tower + projector of every supported family
        (or only the projectors with ``quantize_vision_tower``) added to ``ignore`` -- so the
        resolved config is right even before the model is known (e.g. for recipe checks)."""
        from qvlm_modifiers.families import FAMILIES

        config = super().resolve_quantization_config()
        extra = ignored_outside_lm([f.vision_regexes for f in FAMILIES.values()], self.quantize_vision_tower)
        config.ignore = list(config.ignore or []) + [i for i in extra if i not in (config.ignore or [])]
        return config

    # -- hooks (calibration pass of each decoder layer) -------------------------------------------

    def _capture_call_hook(self, module, args, kwargs):
        k = self._layer_index[id(module)]
        hidden = record_layer_call(self._templates, k, args, kwargs, self._offload_device)
        if k == 0:  # later blocks' inputs are the Modifier's own quantized / FP streams
            self._q_hidden.append(hidden.detach().to(self._offload_device))
        if self._pipeline_hessians is not None:
            b = len(self._templates[k]) - 1
            opens = self._partitioner.current == [k] and b < len(self._q_hidden)
            self._pipeline_hessians.observe(k, b, hidden.detach(), self._q_hidden[b] if opens else None,
                                            [m for _, m in self._layer_linears[k]])

    def _dependency_hook(self, module, args, kwargs, output):
        k = self._layer_index[id(module)]
        if k + 1 >= len(self._layers):
            return
        hidden, *_ = split_hidden(args, kwargs)
        out = output[0] if isinstance(output, (tuple, list)) else output
        mask = spread_token_mask(hidden.shape[:-1], self.entropy_max_tokens, hidden.device)
        self._accumulators[k].update(hidden.detach(), out.detach(), mask)  # Eq. 4-5: pairs (h_k, h_{k+1})

    def _handover_hook(self, module, args, output):
        """The pipeline's propagation pass of a closed block's last layer: hand it the block's
        quantized-path output, or take the rows it computes for us (:mod:`.stream`)."""
        armed = self._handovers.get(self._layer_index[id(module)])
        if armed is None or self._handover_busy or armed.done:
            return None
        self._handover_busy = True
        try:
            return armed(output)
        finally:
            self._handover_busy = False

    def _settle_handovers(self) -> None:
        """Before anything reads the last blocks' outputs: compute the rows the pipeline did not
        hand over (or all it did, after a mismatch) and write each block's all-row loss."""
        for k, handover in list(self._handovers.items()):
            if not handover.settled:
                if handover.mismatch and self._rows_from_pipeline:
                    logger.warning(
                        f"Q-VLM: the pipeline's propagation of decoder layer {k} differs from the block's "
                        "quantized-path output (e.g. activation quantization, which the pipeline's pass "
                        "disables); the Modifier computes every block output itself from here on"
                    )
                    self._rows_from_pipeline = False
                self._handover_busy = True  # our own runs of the layer, not the pipeline's
                try:
                    with HooksMixin.disable_hooks():  # nor a calibration pass
                        handover.settle(retake=handover.mismatch)
                finally:
                    self._handover_busy = False
            if handover.done:  # propagated: nothing left to hand over
                del self._handovers[k]

    def _remove_stream_hooks(self) -> None:
        for handle in self._stream_hooks:
            handle.remove()
        self._stream_hooks = []
        self._handovers.clear()

    # -- partition (Eq. 7) + block search (Eq. 2-3) -----------------------------------------------

    def _finish_layer(self, k: int) -> None:
        part = self._partitioner
        if k not in part.current:
            raise RuntimeError(f"QVLMModifier: decoder layer {k} finished out of order (open block {part.current})")
        if k + 1 < len(self._layers):
            dependency = self._accumulators[k].entropy()
            joined = part.observe_link(dependency)
            logger.info(
                f"Q-VLM: D({k},{k + 1}) = {dependency:.4f} nats, h0 = {part.thresholds[-1]:.4f} -> "
                f"{'same block' if joined else 'block boundary'}"
            )
            if not joined:
                self._close_block(part.blocks[-1])
        else:
            self._close_block(part.finish()[-1])
        self._accumulators.pop(k, None)

    def _linears(self, block: Iterable[int]) -> list[torch.nn.Module]:  # quantized modules of the layers
        return [m for k in block for _, m in self._layer_linears[k]]

    def _quantized(self, block: Iterable[int], enabled: bool) -> contextlib.AbstractContextManager:
        return quantization_enabled(self._linears(block), enabled)

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(self._offload_device)

    def _run_block(self, layer_fns, inputs: list[torch.Tensor], per_layer: bool = False,
                   batch_indices: list[int] | None = None):
        """``layer_fns`` applied to every batch of ``inputs`` (outputs kept on the offload device);
        ``batch_indices``: the calibration batch of each input (default ``0..len(inputs)-1``)."""
        outputs = []
        ids = list(range(len(inputs))) if batch_indices is None else batch_indices
        for fn in layer_fns:
            inputs = [self._keep(fn(h, b)) for b, h in zip(ids, inputs)]
            outputs.append(inputs)
        return outputs if per_layer else inputs

    @torch.no_grad()
    def _close_block(self, block: list[int]) -> None:
        """Search, guard, write and propagate the ranges of one closed block (Eq. 2 then Eq. 3,
        then :mod:`.guard` against min/max on held-out rows, GPTQ inside with ``gptq_rounding``)."""
        self._settle_handovers()
        if block[0] == 0:
            self._fp_hidden = list(self._q_hidden)
        if not self._q_hidden or not self._templates.get(block[0]):
            raise RuntimeError(f"QVLMModifier: no calibration inputs were captured for decoder layers {block}")
        layer_fns = [layer_runner(self._layers[k], self._templates[k]) for k in block]
        fp_path = self.block_target == "fp"
        num_batches = len(self._q_hidden)
        holdout = holdout_batch_indices(num_batches, self.search_holdout)
        train = [b for b in range(num_batches) if b not in set(holdout)]
        linears = self._linears(block)
        modes = {id(m): self._weight_mode(m) for m in linears}
        with HooksMixin.disable_hooks():
            # FP-path targets of each layer (Eq. 3's W_r X_r), and Linear input samples (static
            # activation ranges, clip search), before any weight of the block is replaced
            act_samples: dict[int, list[torch.Tensor]] = {}
            clip_samples: dict[int, list[torch.Tensor]] = {}
            hooks = register_act_sampling(linears, act_samples)
            hooks += register_clip_sampling(
                [m for m in linears if modes[id(m)] == "clip"], clip_samples,
                -(-CLIP_MAX_TOKENS // len(train)), self.clip_exclude_first_token,
            )
            try:
                with self._quantized(block, False):
                    per_layer = self._run_block(layer_fns, self._fp_hidden if fp_path else self._q_hidden, True)
            finally:
                for handle in hooks:
                    handle.remove()
            fp_out = per_layer[-1]
            act_samples, clip_samples = _train_rows(act_samples, train, num_batches), _train_rows(clip_samples, train, num_batches)
            ratios = clip_ratio_grid(self.clip_grid, self.clip_max_shrink)
            variables = [
                [v for name, m in self._layer_linears[k] for v in linear_range_variables(
                    m, act_samples.get(id(m)), self._module_names.get(id(m), "?"),
                    self.percentile_grid, self.init_shrink_factors, weight_mode=modes[id(m)],
                    clip_inputs=clip_input_tokens(clip_samples[id(m)], False) if clip_samples.get(id(m)) else None,
                    clip_ratios=ratios, clip_strengths=self.clip_strengths)]
                for k in block
            ]
            token_weights = self._token_weights()
            started, started_cpu = time.perf_counter(), time.process_time()
            searched = variables
            if self.gptq_rounding and self.gptq_weight_ranges == "gptq":  # GPTQ picks the weight ranges
                searched = [[v for v in layer_vars if not v.is_weight] for layer_vars in variables]
            if any(searched):
                result = self._search(block, layer_fns, searched, per_layer if fp_path else None, token_weights, train=train)
            else:
                result = BlockSearchResult(layerwise=[], block=None, loss=float("nan"), layerwise_loss=float("nan"))
            search_s, search_cpu_s = time.perf_counter() - started, time.process_time() - started_cpu
            if fp_path:
                targets = fp_out
            else:  # the FP block on the quantized-path input (GPTQ-style target)
                with self._quantized(block, False):
                    targets = self._run_block(layer_fns, self._q_hidden)
            decision, q_out, settle = self._guard(block, layer_fns, variables, targets, token_weights, holdout)
            for m in linears:
                m.__dict__.pop(WEIGHT_KEY_ATTR, None)  # stamped by the guard's candidate switches
                commit_qparams(m)
        self._q_hidden = q_out
        self._fp_hidden = fp_out if fp_path else q_out
        choices = {v.name: v.label for layer_vars in variables for v in layer_vars}
        record = block_record(block, result, choices, decision, self.gptq_rounding, search_s, search_cpu_s)
        self._block_losses.append(record)
        if self.realign_stream and block[-1] + 1 < len(self._layers):
            complete, decide = settle if settle is not None else ((lambda: None), None)
            on_settled = None if decide is None else (lambda rows: record.update(guard_fields(decide(rows))))
            self._handovers[block[-1]] = BlockHandover(q_out, complete, self._keep, on_settled)
        logger.info(
            f"Q-VLM block {block}: guard keeps {decision.winner} (held-out objective searched "
            f"{decision.holdout_loss_searched:.6g} vs min/max {decision.holdout_loss_rtn:.6g} on "
            f"{decision.holdout_batches or 'all'} batches{', GPTQ inside' if self.gptq_rounding else ''}); "
            f"ranges {choices}"
        )
        for k in block:
            self._templates[k] = []
            self._done.update(id(m) for _, m in self._layer_linears[k])

    def _weight_mode(self, module: torch.nn.Module) -> str:
        """The weight candidates of one Linear (``weight_candidates``; none without a search)."""
        args = module.quantization_scheme.weights
        if args is None or self.search_epochs == 0:
            return "minmax"
        return weight_candidate_mode(args, self.weight_candidates)

    def _guard(self, block, layer_fns, variables, targets, token_weights, holdout) -> tuple[GuardDecision, list, tuple | None]:
        """Searched ranges or min/max for the block (:func:`~qvlm_modifiers.qvlm.guard.guard_decision`),
        both rounded the same way (nearest, or GPTQ with ``gptq_rounding``); leaves the winner
        applied (qparams, and GPTQ's weights) and returns it with the block's quantized-path output
        and, where rows of that output are left to the pipeline (``None``), ``(complete, decide)``:
        compute them, and the decision with every row's loss."""
        if self.gptq_rounding:
            return self._guard_gptq(block, layer_fns, variables, targets, token_weights, holdout)
        # round-to-nearest: each state's weights fake-quantized once, not once per batch (exact)
        with cached_weight_forward(self._linears(block)):
            return (*self._guard_states(block, layer_fns, variables, targets, token_weights, holdout), None)

    def _guard_gptq(self, block, layer_fns, variables, targets, token_weights, holdout
                    ) -> tuple[GuardDecision, list, tuple | None]:
        """The guard with GPTQ inside: the block's ranges (searched, and with
        ``gptq_weight_ranges: gptq`` each weight's range chosen by GPTQ's error among its
        candidates) against min/max, both GPTQ-rounded in one lockstep pass
        (:func:`~qvlm_modifiers.qvlm.gptq_rounding.gptq_quantize_states`); the min/max state is
        GPTQModifier's result. Both are compared on the held-out rows; only the kept one runs the
        block's last layer on the other rows too (the other's all-row loss is then ``None``), and
        with ``realign_stream`` a one-layer block leaves those rows but batch 0 to the pipeline's
        propagation pass (:mod:`.stream`)."""
        choose = self.gptq_weight_ranges == "gptq"
        searched = [
            [(v, range(len(v.candidates)) if choose and v.is_weight else [v.current]) for v in layer_vars]
            for layer_vars in variables
        ]
        rtn = [[(v, [0]) for v in layer_vars] for layer_vars in variables]
        # two states always: where they agree (e.g. nothing to choose) they share every GPTQ run and output
        # the block's last layer runs both states on the held-out rows only, then the kept one on the rest
        result = gptq_quantize_states(
            [[m for _, m in self._layer_linears[k]] for k in block], layer_fns,
            lambda j, enabled: self._quantized([block[j]], enabled), self._q_hidden, [searched, rtn],
            actorder=self.gptq_actorder, keep=self._keep, last_layer_batches=list(holdout) or None,
            first_layer_hessians=(self._pipeline_hessians.take(block[0], len(self._q_hidden))
                                  if self._pipeline_hessians is not None else None),
        )

        def errors(outs: list) -> list:  # per-batch error terms, None where a state did not run
            run = [b for b, o in enumerate(outs) if o is not None]
            terms = batch_squared_errors([outs[b] for b in run], [targets[b] for b in run], self.block_objective,
                                         None if token_weights is None else [token_weights[b] for b in run])
            full = [None] * len(outs)
            for b, term in zip(run, terms):
                full[b] = term
            return full

        same = result.choices[0] == result.choices[1]  # nothing else chosen: min/max + GPTQ
        err, rtn_err = errors(result.outputs[0]), errors(result.outputs[1])
        kept = 1 if same else (0 if guard_decision(err, rtn_err, holdout).winner == "searched" else 1)
        for layer_vars in variables:
            for v in layer_vars:
                v.current = result.choices[kept].get(v.name, 0)
                v.set(v.current)
        for m in self._linears(block):
            if id(m) in result.weights[kept]:
                m.weight.data.copy_(result.weights[kept][id(m)])
        lazy = (self.realign_stream and self._rows_from_pipeline and len(block) == 1 and bool(holdout)
                and block[-1] + 1 < len(self._layers))
        out = result.complete(kept, [0] if lazy else None)  # lazy: batch 0 checks the pipeline's rows

        def decide(rows: list) -> GuardDecision:  # the kept state's loss on every row (None while rows are missing)
            kept_err = errors(rows)
            searched_err, min_max_err = (kept_err, rtn_err) if kept == 0 else (err, kept_err)
            decision = guard_decision(min_max_err if same else searched_err, min_max_err, holdout)
            if same:
                decision.winner = "rtn"
            return decision

        return decide(out), out, ((lambda: result.complete(kept)), decide) if lazy else None

    def _guard_states(self, block, layer_fns, variables, targets, token_weights, holdout) -> tuple[GuardDecision, list]:
        """The guard with round-to-nearest (weights cached by :func:`cached_weight_forward`)."""
        all_vars = [v for layer_vars in variables for v in layer_vars]
        num_batches = len(self._q_hidden)

        def evaluate(state: list[int], batches: list[int] | None = None):
            """The block in ``state`` on ``batches`` (all: None): outputs and per-batch error terms,
            ``None`` for the batches not run."""
            for var, index in zip(all_vars, state):
                var.current = index
                var.set(index)
            run = list(range(num_batches)) if batches is None else batches
            with self._quantized(block, True):
                outs = self._run_block(layer_fns, [self._q_hidden[b] for b in run], batch_indices=run)
            errs = batch_squared_errors(
                outs, [targets[b] for b in run], self.block_objective,
                None if token_weights is None else [token_weights[b] for b in run],
            )
            out, err = [None] * num_batches, [None] * num_batches
            for b, o, e in zip(run, outs, errs):
                out[b], err[b] = o, e
            return out, err

        searched_state, rtn_state = [v.current for v in all_vars], [0] * len(all_vars)
        if searched_state == rtn_state:
            rtn_out, rtn_err = evaluate(rtn_state)
            decision = guard_decision(rtn_err, rtn_err, holdout)
            decision.winner = "rtn"
            return decision, rtn_out
        # min/max on the held-out rows only (the search beat it on its rows)
        rtn_out, rtn_err = evaluate(rtn_state, list(holdout) or None)
        out, err = evaluate(searched_state)
        decision = guard_decision(err, rtn_err, holdout)
        if decision.winner == "rtn":
            if any(o is None for o in rtn_out):  # min/max's outputs on every row, for the next block
                rtn_out, rtn_err = evaluate(rtn_state)
                decision = guard_decision(err, rtn_err, holdout)
            else:
                for var in all_vars:
                    var.current = 0
                    var.set(0)
            out = rtn_out
        return decision, out

    def _search(self, block, layer_fns, variables, fp_targets, token_weights, reference: bool = False,
                train: list[int] | None = None) -> BlockSearchResult:
        """Eq. 2-3 on the block's cached inputs, each weight fake-quantized once per candidate.
        ``reference``: the plain search (same choices and losses, slower; a benchmark baseline)."""
        replay = LinearOutputReplay() if self.search_replay and not reference else None
        with contextlib.ExitStack() as stack:
            if not reference:
                stack.enter_context(cached_weight_forward(self._linears(block)))
            if replay is not None:  # outermost wrapper: a replayed Linear skips the weight cache too
                stack.enter_context(replay_linear_outputs(self._linears(block), replay))
            return search_block(
                layer_fns, variables, lambda enabled: self._quantized(block, enabled), self._q_hidden, fp_targets,
                self.search_epochs, init=self.block_init, keep=self._keep, search_batches=self.search_samples,
                reference=reference, objective_kind=self.block_objective, token_weights=token_weights,
                train_batches=train, replay=replay,
            )

    def _token_weights(self) -> list[torch.Tensor] | None:
        """Per calibration batch, the modality weights of the block objective (``None``: Eq. 3).
        Read when a block closes: llm-compressor fills ``state.loss_masks`` after calibration start."""
        if self.vision_token_weight == 1.0:
            return None
        masks = list(active_session().state.loss_masks or [])
        return calibration_token_weights(masks, self._q_hidden, self.vision_token_weight)

    def _quantize_outside_decoder(self, modules: Iterable[torch.nn.Module]) -> None:
        """lp-norm ranges for quantized Linears outside the decoder layers (vision tower)."""
        in_layers = {id(m) for ms in self._layer_linears.values() for _, m in ms}
        init_ranges_outside_decoder([m for m in modules if id(m) not in in_layers], self._done,
                                    self._module_names, self.percentile_grid, self.init_shrink_factors)

    def _metadata(self) -> dict[str, Any]:
        veo = None
        if self._veo_history is not None:
            veo = {"lambda_ent": self.vision_lambda_ent, "lambda_err": self.vision_lambda_err, "eta": self.vision_eta,
                   "lr": self.vision_lr, "epochs": self.vision_epochs, "history": self._veo_history}
        return partition_metadata(
            self._partitioner, entropy_threshold=self.entropy_threshold, num_levels=self._num_levels,
            estimator=self.entropy_estimator, max_block_layers=self.max_block_layers,
            block_objective=self.block_objective, vision_token_weight=self.vision_token_weight,
            block_losses=self._block_losses, veo=veo,
        )


def _train_rows(samples: dict[int, list[torch.Tensor]], train: list[int], num_batches: int) -> dict[int, list[torch.Tensor]]:
    """Each Linear's input samples (one entry per calibration batch, in order) of the ``train``
    batches only, so that held-out rows stay unseen; kept whole if a Linear did not run exactly once
    per batch (then the batches cannot be told apart)."""
    return {key: [rows[b] for b in train] if len(rows) == num_batches else rows for key, rows in samples.items()}
