"""``QVLMModifier``: Q-VLM (NeurIPS 2024) as an llm-compressor Modifier.

Q-VLM = entropy-based block partition of the decoder layers (Eq. 4-7,
:mod:`~qvlm_modifiers.qvlm.entropy`, :mod:`~qvlm_modifiers.qvlm.partition`) + joint search of
the quantization ranges inside each block (Eq. 2-3, :mod:`~qvlm_modifiers.qvlm.block_search`).
The released reference code does neither (see the design note); this follows the paper.

Sample recipe (``recipes/qvlm_w4.yaml``)::

    quant_stage:
      quant_modifiers:
        QVLMModifier:
          scheme: W4A16         # or config_groups, like QuantizationModifier
          targets: [Linear]
          max_block_layers: 3

Lifecycle (llm-compressor's sequential pipeline; one decoder layer per subgraph by default):

- ``on_initialize``: resolve the VLM family, add ``lm_head`` + vision tower/projector (unless
  ``quantize_vision_tower``) to ``ignore``, attach the quantization scheme.
- ``on_calibration_start``: with ``optimize_vision_encoder``, first the visual-encoder
  optimization (Eq. 8-10, :mod:`~qvlm_modifiers.qvlm.visual`) over the calibration set, which
  writes the vision tower's learned ranges; then hooks on every decoder layer: a pre-hook keeps each batch's call
  arguments (masks, position embeddings; the hidden states only for the first layer), a forward
  hook streams ``(h_k, h_{k+1})`` into the layer's ``M x M`` joint level accumulator (Eq. 4-5).
- ``on_sequential_epoch_end`` (after decoder layer k's calibration pass): ``D(k, k+1)`` decides
  whether layer k+1 joins layer k's block (Eq. 7, online greedy). When a block closes, its ranges
  are searched (Eq. 2 then Eq. 3) on the cached block input, the chosen ``weight_scale`` /
  ``weight_zero_point`` (and static ``input_scale`` / ``input_zero_point``) are written, and the
  weights are replaced by their fake-quantized values so that the pipeline's error propagation
  sees them (as GPTQ does); with ``gptq_rounding`` GPTQ then picks the integers inside the
  chosen ranges. Quantized Linears outside the decoder (vision tower when quantized, without VEO)
  get their lp-norm ranges when their subgraph ends.
- ``on_calibration_end``: freeze quantization, remove hooks, store the partition in
  ``model.config.qvlm_blocks`` (saved in ``config.json`` *outside* ``quantization_config``).

Where the partition is stored: ``model.config.qvlm_blocks`` in memory, and in the checkpoint's
``config.json`` as the top-level key ``"qvlm_blocks"`` (outside ``quantization_config``):
``{"blocks": [[0, 1], [2], ...], "dependencies": [D(0,1), ...], "thresholds": [h0 used per link],
"num_levels": M, "estimator": "soft", "block_losses": [{"layers", "loss", "search_loss",
"layerwise_loss", "search_samples", "search_objective", "kept_layerwise", "search_s",
"search_cpu_s", "evaluations", "choices": {"<module>.weight": "p=0.99" | "init", ...}}, ...]}`` (plus
``"visual_encoder_optimization"`` when VEO ran); also logged at INFO level. It is written by
:func:`qvlm_modifiers.save.save_pretrained` / ``qvlm_modifiers.oneshot(output_dir=...)`` (plain
llm-compressor saves rewrite ``config.json`` from the original file and drop it) and reloads as
``AutoConfig.from_pretrained(path).qvlm_blocks``.

The Modifier keeps two hidden-state streams of the calibration set on the offload device (CPU):
the quantized path ``X_q`` (input of the open block) and the FP path ``X_r`` (Eq. 3's target
path), plus the per-layer call arguments of the open block (at most ``max_block_layers``), so
accelerator memory stays about one block of weights + one batch of activations.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
from compressed_tensors.quantization import DynamicType, QuantizationArgs, QuantizationStrategy, QuantizationType
from compressed_tensors.quantization.lifecycle import fake_quantize
from compressed_tensors.utils import get_execution_device, match_named_modules, update_offload_parameter
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator
from torch.utils._pytree import tree_map

from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.quantization.quantization import QuantizationMixin
from llmcompressor.modifiers.utils.hooks import HooksMixin
from llmcompressor.utils.dev import get_main_device

from qvlm_modifiers.errors import CalibrationDataError, RecipeError
from qvlm_modifiers.families import decoder_layers, get_family
from qvlm_modifiers.modality import VISION, DerivedLossMasks
from qvlm_modifiers.qvlm.block_search import (
    DEFAULT_PERCENTILES,
    DEFAULT_SHRINK_FACTORS,
    BlockObjectiveKind,
    RangeVariable,
    block_mse_objective,
    flatten_for_ranges,
    modality_token_weights,
    lp_norm_range,
    percentile_range,
    range_qparams,
    search_block,
)
from qvlm_modifiers.qvlm.entropy import JointLevelAccumulator
from qvlm_modifiers.qvlm.partition import OnlinePartitioner

__all__ = ["QVLMModifier", "METADATA_ATTRIBUTE"]

METADATA_ATTRIBUTE = "qvlm_blocks"

# tokens per batch kept as samples of a Linear's input for static activation ranges
_ACT_SAMPLE_TOKENS = 512


class QVLMModifier(Modifier, QuantizationMixin):
    """Q-VLM: entropy-guided block partition + joint block-wise range search.

    Quantization fields (``scheme``, ``config_groups``, ``targets``, ``ignore``, observers) are
    those of llm-compressor's ``QuantizationModifier``. Weight ranges end up as standard
    ``weight_scale`` / ``weight_zero_point``; dynamic per-token activations have no static range
    (nothing to search); static activations (``dynamic: false``, per-tensor) get searched
    ``input_scale`` / ``input_zero_point``.

    :param max_block_layers: most decoder layers per block (paper: 3; Fig. 3a)
    :param entropy_threshold: h0 of Eq. 7. ``None`` = the running mean of the dependencies
        observed so far (see :mod:`qvlm_modifiers.qvlm.partition`)
    :param entropy_estimator: ``"soft"`` (Eq. 5, temperature = quantization step) or ``"hard"``
        (round-to-nearest level counts)
    :param entropy_levels: M, the number of levels of Eq. 5. ``None`` = ``2**num_bits`` of the
        input-activation quantizer when activations are quantized with <= 8 bits, else 16
        (weight-only schemes have no activation quantizer; 16 = 4-bit levels)
    :param entropy_level_grid: range of the M levels: per ``"token"`` row of the hidden state
        (like the dynamic per-token activation quantizer, default) or per ``"tensor"``
    :param entropy_temperature_scale: multiplies Eq. 5's softmax temperature ``Delta`` (1.0 =
        paper). Note: Eq. 5 divides by ``Delta``, not ``Delta**2``, so when the quantization step is
        much smaller than 1 the soft assignment is nearly uniform over the M levels and
        ``D -> log M``; smaller values sharpen it towards the hard estimator
    :param percentile_grid: candidate clipping percentiles of the block search (paper)
    :param init_shrink_factors: shrink factors of the min/max range tried by the lp-norm range
        initialisation (reference code's grid)
    :param init_norm: p of the lp-norm initialisation of *activation* ranges (reference code: 0.5,
        ``lp_loss(p=0.5)`` on each layer's input)
    :param init_weight_norm: p of the lp-norm initialisation of *weight* ranges (design note: 2).
        Not 0.5: with p < 1 the bulk of small weights dominates the error and the search picks the
        strongest shrink of the grid; on SmolLM2-135M that clipped int8 weights to 70% of their range
        (8.6% weight error instead of 1.0% for min/max) and the W8A8 model answered nothing
    :param search_epochs: coordinate-descent passes per block (paper: 10 epochs); stops earlier
        once a pass changes nothing
    :param search_samples: evaluate the search objective (Eq. 2 and Eq. 3) on this many
        calibration samples only, spread evenly over the calibration set (``null`` = all samples,
        the exact search). An approximation that makes the search proportionally cheaper: the
        block-output MSE stored in ``qvlm_blocks.block_losses`` is still measured on all samples,
        and where the joint solution is worse there than the layer-wise one, the layer-wise one is
        kept (``"kept_layerwise"``), so a block is never worse than layer-wise on the full
        calibration objective. Measured by ``eval/bench_qvlm_search.py`` (default model, 3 layers,
        128 samples, CPU, measured before the weight-range initialisation fix of b043845): 32 samples
        cost 3.8x less with a block MSE 2.2% above the exact search, 16 samples 7.5x less at +8.8%,
        8 samples 19x less at +14.6%. The default stays exact
    :param block_objective: ``"mse"`` (default, Eq. 2-3: mean squared error of the block output)
        or ``"token_relative_mse"`` (not in the paper: each token's squared error divided by its FP
        output's squared norm, so every token counts alike). On SmolLM2-135M the plain MSE is
        decided by one attention-sink token whose hidden state holds >99% of the squared norm in the
        later layers; see ``eval/README.md``
    :param vision_token_weight: weight of image-token errors in every block objective, text tokens
        (prompt and answer) weighing 1 (``1.0``, default = Eq. 3: every token alike). Not in the
        paper: MBQ's finding (vision-token errors matter far less to the answer) applied to Q-VLM's
        search. Needs the calibration rows' ``loss_mask`` (:mod:`qvlm_modifiers.data`;
        ``qvlm_modifiers.oneshot`` passes ``use_loss_mask=True``). Combines with
        ``block_objective`` (the weights multiply). Measured in ``eval/README.md``
    :param search_implementation: ``"fast"`` (default): the search with exact shortcuts -- the
        block input of the layer being searched is cached (layers before it are not re-run per
        candidate), each Linear's fake-quantized weight is computed once per candidate instead of
        once per forward, candidates stop being evaluated as soon as their partial error already
        exceeds the best, and states already evaluated are not evaluated again. Same choices and
        losses as ``"reference"``: the plain search in which every candidate re-runs the whole
        block on every sample (kept for tests and as the benchmark baseline)
    :param block_target: ``"fp"`` (Eq. 3: the FP path from the FP block input) or
        ``"quant_input"`` (FP block applied to the quantized-path input, GPTQ-style)
    :param block_init: ``"layerwise"``: Eq. 2 per layer, then Eq. 3 over the block starting from
        the layer-wise solution (the block objective is never worse than layer-wise);
        ``"lp_norm"``: Eq. 3 from the lp-norm ranges only
    :param search_activations: also search static activation ranges (no effect on dynamic
        per-token activations, which have no static range)
    :param quantize_vision_tower: quantize the vision tower's Linears too (same scheme; with the
        per-token dynamic activations of our A-schemes, as the paper does for the vision side).
        The projector always stays in full precision
    :param gptq_rounding: after the range search, let GPTQ choose the integer values inside the
        chosen ranges (scale/zero-point unchanged; Hessians from the block's quantized-path
        inputs); kept only where it lowers the block-output error, else round-to-nearest stays.
        Off by default. Measured on the default model by the matrix cell ``qvlm_w4_s32_gptq``
        (``eval/README.md``); on random tiny models by ``python -m qvlm_modifiers.qvlm.measure_gptq``
    :param research_static_channel_activation_bits: RESEARCH / FAKE-QUANT ONLY. The paper's
        activation quantizer for the language model: static asymmetric ranges per *input channel*
        with this many bits, searched like the weight ranges. A per-input-channel activation scale
        cannot be factored out of a GEMM's reduction, so no integer kernel (and no
        compressed-tensors config) can express it: the ranges live only on the in-memory model
        (a forward pre-hook fake-quantizes each decoder Linear's input) and are NOT saved in the
        checkpoint. Use with a weight-only scheme (no ``input_activations``). ``None`` = off
    :param optimize_vision_encoder: visual-encoder optimization (Eq. 8-10,
        :mod:`qvlm_modifiers.qvlm.visual`): before the sequential pass, learn the quantized vision
        tower's weight ranges by gradient descent (STE) on next-token loss + ``vision_lambda_ent``
        x Jacobian-weighted entropy + ``vision_lambda_err`` x (vision-output MSE + ``vision_eta``
        x LLM-output MSE). Needs ``quantize_vision_tower: true``. Experimental
    :param vision_lambda_ent: lambda1 of Eq. 10 (the paper gives none). Defaults (0.1, 1, 0.5) for
        (lambda1, lambda2, eta): the sweep on the default model
        (``eval/results/smolvlm-tiny/veo_sweep.md``, 3 epochs) found VEO lowering the answer KL by
        27-43% in every configuration, significantly at these defaults; it could not rank the
        configurations against each other, so the defaults were kept
    :param vision_lambda_err: lambda2 of Eq. 10 (see ``vision_lambda_ent``)
    :param vision_eta: eta of Eq. 9 (the paper: a "medium" value is best; see ``vision_lambda_ent``)
    :param vision_lr: Adam learning rate of the range log-multipliers (not swept; the sweep used it)
    :param vision_epochs: passes over the calibration set (paper: 10 epochs; the sweep ran 3)
    """

    requires_calibration_data: bool = True
    # the paper's W4A4 / W6A6 run as fake-quant simulation (no integer A4/A6 GEMM in vLLM);
    # qvlm_modifiers.recipe_check accepts these dynamic activation widths for this Modifier
    simulated_activation_bits: ClassVar[tuple[int, ...]] = (4, 6)

    max_block_layers: int = Field(default=3, ge=1)
    entropy_threshold: float | None = None
    entropy_estimator: Literal["soft", "hard"] = "soft"
    entropy_levels: int | None = Field(default=None, ge=2, le=1024)
    entropy_level_grid: Literal["token", "tensor"] = "token"
    entropy_temperature_scale: float = Field(default=1.0, gt=0)
    percentile_grid: list[float] = Field(default_factory=lambda: list(DEFAULT_PERCENTILES))
    init_shrink_factors: list[float] = Field(default_factory=lambda: list(DEFAULT_SHRINK_FACTORS))
    init_norm: float = Field(default=0.5, gt=0)
    init_weight_norm: float = Field(default=2.0, gt=0)
    search_epochs: int = Field(default=10, ge=0)
    search_samples: int | None = Field(default=None, ge=1)
    block_objective: BlockObjectiveKind = "mse"
    vision_token_weight: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    search_implementation: Literal["fast", "reference"] = "fast"
    block_target: Literal["fp", "quant_input"] = "fp"
    block_init: Literal["layerwise", "lp_norm"] = "layerwise"
    search_activations: bool = True
    quantize_vision_tower: bool = False
    gptq_rounding: bool = False
    research_static_channel_activation_bits: int | None = Field(default=None, ge=2, le=8)
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
    _done: set[int] = PrivateAttr(default_factory=set)
    _accumulators: dict[int, JointLevelAccumulator] = PrivateAttr(default_factory=dict)
    _templates: dict[int, list[tuple[str, tuple, dict]]] = PrivateAttr(default_factory=dict)
    _q_hidden: list[torch.Tensor] | None = PrivateAttr(default=None)
    _fp_hidden: list[torch.Tensor] | None = PrivateAttr(default=None)
    _partitioner: OnlinePartitioner | None = PrivateAttr(default=None)
    _block_losses: list[dict[str, Any]] = PrivateAttr(default_factory=list)
    _num_levels: int = PrivateAttr(default=16)
    _offload_device: torch.device = PrivateAttr(default=torch.device("cpu"))
    _veo_history: list[dict[str, float]] | None = PrivateAttr(default=None)
    _derived_masks: DerivedLossMasks | None = PrivateAttr(default=None)

    @field_validator("percentile_grid")
    @classmethod
    def _check_percentiles(cls, value: list[float]) -> list[float]:
        if not value or any(not 0.5 < p <= 1.0 for p in value):
            raise ValueError(f"percentile_grid must be a non-empty list of values in (0.5, 1.0], got {value}")
        return value

    @field_validator("init_shrink_factors")
    @classmethod
    def _check_shrink(cls, value: list[float]) -> list[float]:
        if not value or any(not 0.0 < f <= 1.0 for f in value):
            raise ValueError(f"init_shrink_factors must be a non-empty list of values in (0, 1], got {value}")
        return value

    # ------------------------------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------------------------------

    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        if self.optimize_vision_encoder and not self.quantize_vision_tower:
            raise RecipeError(
                "QVLMModifier: optimize_vision_encoder=true needs a quantized vision tower, but "
                "quantize_vision_tower is false. Set quantize_vision_tower: true in the recipe, or "
                "drop optimize_vision_encoder."
            )
        if not QuantizationMixin.has_config(self):
            raise RecipeError(
                "QVLMModifier needs a quantization scheme: set `scheme` (e.g. W4A16) or "
                "`config_groups` in the recipe, as for QuantizationModifier."
            )
        family = get_family(model)
        ignore = list(self.ignore)
        extra = ["lm_head"]
        if self.quantize_vision_tower:
            extra.append(family.vision_regexes[1])  # projector stays FP
        else:
            extra.extend(family.vision_regexes)
        for item in extra:
            if item not in ignore:
                ignore.append(item)
        self.ignore = ignore
        self._resolved_config = None  # re-resolve with the family's ignore list
        self._check_scheme()
        QuantizationMixin.initialize_quantization(self, model)

        self._layers = list(decoder_layers(model))
        self._layer_index = {id(layer): i for i, layer in enumerate(self._layers)}
        self._module_names = {id(m): name for name, m in model.named_modules()}
        for i, layer in enumerate(self._layers):
            self._layer_linears[i] = [
                (name, m) for name, m in layer.named_modules() if getattr(m, "quantization_scheme", None) is not None
            ]
        self._num_levels = self._resolve_num_levels()
        if self._research_mode:
            self._install_research_activation_quant()
        calib = state.data.calib if state.data is not None else None
        if self.vision_token_weight != 1.0 and calib is not None:
            # modality labels for rows without a loss_mask (qvlm_modifiers.modality)
            self._derived_masks = DerivedLossMasks(model, type(self).__name__)
            self._derived_masks.index_dataset(getattr(calib, "dataset", calib))
        return True

    def _install_research_activation_quant(self) -> None:
        if any(s.input_activations is not None for s in self._schemes()):
            raise RecipeError(
                "QVLMModifier: research_static_channel_activation_bits replaces the activation "
                "quantizer of the scheme; use a weight-only scheme (e.g. W4A16) with it, or drop it."
            )
        args = self._research_args()
        logger.warning(
            "Q-VLM RESEARCH MODE: static per-input-channel activation quantization "
            f"({args.num_bits}-bit) is fake-quant only on the in-memory model and is NOT saved in "
            "the checkpoint (no integer GEMM can use per-input-channel activation scales)."
        )

        def research_quant_hook(module, inputs):
            qparams = getattr(module, "qvlm_research_act_qparams", None)
            if qparams is None or not getattr(module, "quantization_enabled", True):
                return None
            scale, zero_point = qparams
            x = inputs[0]
            xq = fake_quantize(x, scale.to(x.device, x.dtype), zero_point.to(x.device), args)
            return (xq, *inputs[1:])

        for linears in self._layer_linears.values():
            for _, m in linears:
                # a plain torch hook, not a HooksMixin one: it must outlive calibration
                m.register_forward_pre_hook(research_quant_hook)

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        QuantizationMixin.start_calibration(self, state.model)
        if self.optimize_vision_encoder:
            self._optimize_vision_encoder(state)
        self._partitioner = OnlinePartitioner(max_block_layers=self.max_block_layers, threshold=self.entropy_threshold)
        for i, layer in enumerate(self._layers):
            self._accumulators[i] = JointLevelAccumulator(
                self._num_levels, estimator=self.entropy_estimator, grid=self.entropy_level_grid,
                temperature_scale=self.entropy_temperature_scale,
            )
            self._templates[i] = []
            self.register_hook(layer, self._capture_call_hook, "forward_pre", with_kwargs=True)
            self.register_hook(layer, self._dependency_hook, "forward", with_kwargs=True)
        self._q_hidden, self._fp_hidden = [], None
        if self._derived_masks is not None:
            self._derived_masks.attach(state.model, state)

    def on_sequential_epoch_end(self, state: State, event: Event, modules: list[torch.nn.Module], **kwargs):
        layer_ids = sorted({self._layer_index[id(m)] for m in modules if id(m) in self._layer_index})
        self._quantize_outside_decoder(modules)
        for k in layer_ids:
            self._finish_layer(k)

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        if self._partitioner is not None and self._partitioner.current and self._templates.get(self._partitioner.current[0]):
            self._close_block(self._partitioner.finish()[-1])
        # anything quantized that no subgraph handed us (e.g. a non-ignored lm_head)
        leftovers = [
            m
            for _, m in match_named_modules(state.model, self.resolved_targets, self.ignore)
            if id(m) not in self._done
        ]
        self._quantize_outside_decoder(leftovers)
        QuantizationMixin.end_calibration(self, state.model)
        self.remove_hooks()
        if self._derived_masks is not None:
            self._derived_masks.detach()
        self._write_metadata(state.model)
        self._templates.clear()
        self._q_hidden = self._fp_hidden = None

    def on_finalize(self, state: State, **kwargs) -> bool:
        if not self.ended_:
            self.on_end(state, None)
        return True

    # ------------------------------------------------------------------------------------------
    # scheme helpers
    # ------------------------------------------------------------------------------------------

    def resolve_quantization_config(self):
        """The scheme, with ``lm_head`` and the vision tower + projector of every supported family
        (or only the projectors with ``quantize_vision_tower``) added to ``ignore`` -- so the
        resolved config is right even before the model is known (e.g. for recipe checks)."""
        from qvlm_modifiers.families import FAMILIES

        config = super().resolve_quantization_config()
        extra = ["lm_head"]
        for fam in FAMILIES.values():
            extra.extend(fam.vision_regexes[1:] if self.quantize_vision_tower else fam.vision_regexes)
        config.ignore = list(config.ignore or []) + [i for i in dict.fromkeys(extra) if i not in (config.ignore or [])]
        return config

    def _schemes(self):
        return list(self.resolved_config.config_groups.values())

    def _check_scheme(self) -> None:
        for scheme in self._schemes():
            w = scheme.weights
            if w is not None and (w.type != QuantizationType.INT or w.strategy not in (
                QuantizationStrategy.TENSOR, QuantizationStrategy.CHANNEL, QuantizationStrategy.GROUP
            )):
                raise RecipeError(
                    f"QVLMModifier searches uniform integer weight ranges per tensor/channel/group; "
                    f"got weights {w.type}/{w.strategy}. Use an int scheme such as W4A16, W4A4, W8A8 "
                    "or int config_groups with strategy tensor/channel/group."
                )
            a = scheme.input_activations
            if a is not None and a.dynamic is False and a.strategy != QuantizationStrategy.TENSOR:
                raise RecipeError(
                    f"QVLMModifier: static input activations must be per-tensor (got {a.strategy}). "
                    "Use dynamic per-token activations (strategy: token, dynamic: true) or static "
                    "per-tensor ones."
                )
            if scheme.output_activations is not None:
                raise RecipeError("QVLMModifier does not quantize output activations; remove output_activations.")

    def _resolve_num_levels(self) -> int:
        if self.entropy_levels is not None:
            return int(self.entropy_levels)
        bits = [s.input_activations.num_bits for s in self._schemes() if s.input_activations is not None]
        if bits and min(bits) <= 8:
            return 2 ** min(bits)
        return 16

    # ------------------------------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, str, tuple, dict]:
        if args:
            return args[0], "arg", tuple(args[1:]), dict(kwargs)
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return kwargs["hidden_states"], "kw", tuple(args), rest

    def _to_offload(self, value, reuse=None):
        """``value``'s tensors on the offload device; tensors equal to the same leaf of ``reuse``
        (the previous layer's arguments of this batch: masks and rotary embeddings are usually
        shared by all layers) are not copied again."""
        from torch.utils._pytree import tree_flatten, tree_unflatten

        leaves, spec = tree_flatten(value)
        old_leaves, old_spec = tree_flatten(reuse) if reuse is not None else ([], None)
        same_layout = old_spec == spec
        out = []
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.Tensor):
                out.append(leaf)
                continue
            old = old_leaves[i] if same_layout else None
            if (
                isinstance(old, torch.Tensor) and old.shape == leaf.shape and old.dtype == leaf.dtype
                and torch.equal(old, leaf.detach().to(old.device))
            ):
                out.append(old)
            else:
                out.append(leaf.detach().to(self._offload_device))
        return tree_unflatten(out, spec)

    def _capture_call_hook(self, module, args, kwargs):
        k = self._layer_index[id(module)]
        hidden, mode, rest_args, rest_kwargs = self._split_hidden(args, kwargs)
        batch_index = len(self._templates[k])
        previous = self._templates.get(k - 1)
        shared = previous[batch_index] if previous and batch_index < len(previous) else None
        self._templates[k].append(
            (mode, self._to_offload(rest_args, shared and shared[1]), self._to_offload(rest_kwargs, shared and shared[2]))
        )
        if k == 0:  # later blocks' inputs are the Modifier's own quantized / FP streams
            self._q_hidden.append(hidden.detach().to(self._offload_device))

    def _dependency_hook(self, module, args, kwargs, output):
        k = self._layer_index[id(module)]
        if k + 1 >= len(self._layers):
            return
        hidden, *_ = self._split_hidden(args, kwargs)
        out = output[0] if isinstance(output, (tuple, list)) else output
        self._accumulators[k].update(hidden.detach(), out.detach())

    # ------------------------------------------------------------------------------------------
    # partition + search
    # ------------------------------------------------------------------------------------------

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

    def _layer_fn(self, k: int):
        layer = self._layers[k]
        templates = self._templates[k]

        def run(hidden: torch.Tensor, batch_index: int) -> torch.Tensor:
            device = get_execution_device(layer)
            mode, rest_args, rest_kwargs = templates[batch_index]
            to_dev = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
            rest_args, rest_kwargs = tree_map(to_dev, rest_args), tree_map(to_dev, rest_kwargs)
            hidden = hidden.to(device)
            out = layer(hidden, *rest_args, **rest_kwargs) if mode == "arg" else layer(*rest_args, hidden_states=hidden, **rest_kwargs)
            return out[0] if isinstance(out, (tuple, list)) else out

        return run

    @contextlib.contextmanager
    def _quantized(self, layer_ids: Iterable[int], enabled: bool):
        modules = [m for k in layer_ids for _, m in self._layer_linears[k]]
        previous = [getattr(m, "quantization_enabled", True) for m in modules]
        try:
            for m in modules:
                m.quantization_enabled = enabled
            yield
        finally:
            for m, value in zip(modules, previous):
                m.quantization_enabled = value

    @contextlib.contextmanager
    def _cached_weight_forward(self, layer_ids: Iterable[int]):
        """During the search, each quantized Linear of the block fake-quantizes its weight once per
        candidate range instead of once per forward call (compressed-tensors' quantized forward
        re-quantizes the weight on every call). Inside, a Linear's forward is compressed-tensors'
        ``quantized_forward`` with the weight QDQ taken from a one-entry cache keyed by the weight
        range variable's current candidate (set by its ``apply``); the input QDQ (dynamic or
        static) is computed per call as before, so outputs are identical. Restored on exit."""
        from compressed_tensors.quantization import QuantizationStatus
        from compressed_tensors.quantization.lifecycle.forward import forward_quantize
        from compressed_tensors.utils import patch_attr

        modules = [m for k in layer_ids for _, m in self._layer_linears[k] if isinstance(m, torch.nn.Linear)]
        saved = {}

        def make(module, original):
            def forward(input: torch.Tensor) -> torch.Tensor:
                scheme = getattr(module, "quantization_scheme", None)
                status = getattr(module, "quantization_status", None)
                key = getattr(module, "_qvlm_weight_key", None)
                if (
                    not getattr(module, "quantization_enabled", True) or scheme is None or scheme.weights is None
                    or status is None or status >= QuantizationStatus.COMPRESSED or key is None
                    or scheme.output_activations is not None
                ):
                    return original(input)
                weight = module.weight
                if scheme.input_activations:
                    input = forward_quantize(module, input, "input", scheme.input_activations)
                cached = module.__dict__.get("_qvlm_fq_weight")
                if cached is None or cached[0] != key or cached[1].device != weight.device:
                    cached = (key, forward_quantize(module, weight.data, "weight", scheme.weights))
                    module.__dict__["_qvlm_fq_weight"] = cached
                with patch_attr(weight, "data", cached[1]):
                    return module.__class__.forward(module, input)

            return forward

        try:
            for m in modules:
                # compressed-tensors' offloading wraps ``forward`` (moves the inputs to the onload
                # device) around ``_original_forward_func``: patch inside that wrapper if present
                slot = "_original_forward_func" if "_original_forward_func" in m.__dict__ else "forward"
                previous = m.__dict__.get(slot)
                saved[id(m)] = (m, slot, previous)
                if slot == "forward":
                    m.forward = make(m, m.forward)
                else:
                    inner = make(m, lambda x, _f=previous, _m=m: _f(_m, x))
                    m.__dict__[slot] = lambda _self, x, _inner=inner: _inner(x)
            yield
        finally:
            for m, slot, previous in saved.values():
                if previous is None:
                    m.__dict__.pop(slot, None)
                else:
                    m.__dict__[slot] = previous
                m.__dict__.pop("_qvlm_fq_weight", None)
                m.__dict__.pop("_qvlm_weight_key", None)

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(self._offload_device)

    @torch.no_grad()
    def _close_block(self, block: list[int]) -> None:
        if block[0] == 0:
            self._fp_hidden = list(self._q_hidden)
        if not self._q_hidden or not self._templates.get(block[0]):
            raise RuntimeError(f"QVLMModifier: no calibration inputs were captured for decoder layers {block}")
        layer_fns = [self._layer_fn(k) for k in block]
        with HooksMixin.disable_hooks():
            # FP-path targets of each layer (Eq. 3's W_r X_r), and Linear input samples for
            # static activation ranges, before any weight of the block is replaced
            fp_targets = None
            act_samples: dict[int, list[torch.Tensor]] = {}
            sample_hooks = self._register_act_sampling(block, act_samples)
            try:
                with self._quantized(block, False):
                    x = self._fp_hidden if self.block_target == "fp" else self._q_hidden
                    per_layer = []
                    for fn in layer_fns:
                        x = [self._keep(fn(h, b)) for b, h in enumerate(x)]
                        per_layer.append(x)
                    fp_targets = per_layer if self.block_target == "fp" else None
                    fp_out = per_layer[-1]
            finally:
                for handle in sample_hooks:
                    handle.remove()
            variables = [
                [v for name, m in self._layer_linears[k] for v in self._range_variables(m, act_samples.get(id(m)))]
                for k in block
            ]
            started, started_cpu = time.perf_counter(), time.process_time()
            fast = self.search_implementation == "fast"
            with self._cached_weight_forward(block) if fast else contextlib.nullcontext():
                result = search_block(
                    layer_fns,
                    variables,
                    lambda enabled: self._quantized(block, enabled),
                    self._q_hidden,
                    fp_targets,
                    self.search_epochs,
                    init=self.block_init,
                    keep=self._keep,
                    search_batches=self.search_samples,
                    reference=not fast,
                    objective_kind=self.block_objective,
                    token_weights=self._token_weights(),
                )
            search_seconds, search_cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
            gptq_loss, final_loss = None, result.loss
            if self.gptq_rounding:
                originals = {id(m): m.weight.data.clone() for k in block for _, m in self._layer_linears[k]}
                gptq_loss = self._gptq_round(block, layer_fns, fp_out)
                if gptq_loss < result.loss:
                    final_loss = gptq_loss
                else:  # keep round-to-nearest inside the searched ranges
                    for k in block:
                        for _, m in self._layer_linears[k]:
                            m.weight.data.copy_(originals[id(m)])
            for k in block:
                for _, m in self._layer_linears[k]:
                    self._commit_qparams(m)
            with self._quantized(block, True):
                q_out = self._q_hidden
                for fn in layer_fns:
                    q_out = [self._keep(fn(h, b)) for b, h in enumerate(q_out)]
        self._q_hidden = q_out
        self._fp_hidden = fp_out if self.block_target == "fp" else q_out
        choices = {v.name: v.label for layer_vars in variables for v in layer_vars}
        record = {
            "layers": list(block),
            "loss": final_loss,
            "search_loss": result.loss,
            "layerwise_loss": result.layerwise_loss,
            "search_samples": result.search_batches,
            "search_objective": result.search_loss,
            "kept_layerwise": result.kept_layerwise,
            "search_s": round(search_seconds, 3),  # wall / process CPU time of the range search
            "search_cpu_s": round(search_cpu_seconds, 3),
            "evaluations": sum(r.evaluations for r in result.layerwise) + (result.block.evaluations if result.block else 0),
            "choices": choices,
        }
        if gptq_loss is not None:
            record["gptq_loss"] = gptq_loss
            record["gptq_kept"] = gptq_loss < result.loss
        self._block_losses.append(record)
        logger.info(
            f"Q-VLM block {block}: block objective {result.loss:.6g} (layer-wise solution "
            f"{result.layerwise_loss:.6g}); ranges {choices}"
        )
        for k in block:
            self._templates[k] = []
            for _, m in self._layer_linears[k]:
                self._done.add(id(m))

    def _gptq_round(self, block: list[int], layer_fns, target: list[torch.Tensor]) -> float:
        """GPTQ rounding inside the searched ranges: scale/zero-point stay as chosen, GPTQ
        (llm-compressor's ``quantize_weight``) picks the integer values, with Hessians of each
        Linear's inputs on the quantized path of this block. Returns the block-output MSE after."""
        from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
        from llmcompressor.modifiers.gptq.helpers import accumulate_hessian, make_empty_hessian

        linears = [m for k in block for _, m in self._layer_linears[k] if m.quantization_scheme.weights is not None]
        hessians = {id(m): make_empty_hessian(m) for m in linears}
        counts = {id(m): torch.zeros(()) for m in linears}

        def hook(module, args):
            hessians[id(module)], counts[id(module)] = accumulate_hessian(
                args[0].detach(), module, hessians[id(module)], counts[id(module)]
            )

        handles = [m.register_forward_pre_hook(hook) for m in linears]
        try:
            with self._quantized(block, True):
                x = self._q_hidden
                for fn in layer_fns:
                    x = [fn(h, b) for b, h in enumerate(x)]
        finally:
            for h in handles:
                h.remove()
        for m in linears:
            args = m.quantization_scheme.weights.model_copy(update={"actorder": None})
            zp = getattr(m, "weight_zero_point", None)
            zp = zp.data if zp is not None else torch.zeros_like(m.weight_scale.data)
            quantized, _, _ = quantize_weight(
                weights=m.weight.data[None].float().clone(),
                hessians=(hessians[id(m)] / counts[id(m)].clamp_min(1))[None],
                scale=m.weight_scale.data[None],
                zero_point=zp[None],
                global_scale=None,
                quant_args=args,
                blocksize=128,
                percdamp=0.01,
            )
            m.weight.data.copy_(quantized[0].to(m.weight.dtype))
        with self._quantized(block, True):
            return block_mse_objective(
                layer_fns, self._q_hidden, target, kind=self.block_objective, token_weights=self._token_weights()
            )()

    def _token_weights(self) -> list[torch.Tensor] | None:
        """Per calibration batch, the modality weights of the block objective (``None``: Eq. 3).
        Read when a block closes: llm-compressor fills ``state.loss_masks`` after calibration start."""
        if self.vision_token_weight == 1.0:
            return None
        masks = list(active_session().state.loss_masks or [])
        if len(masks) != len(self._q_hidden) or any(m is None for m in masks):
            raise CalibrationDataError(
                f"QVLMModifier: vision_token_weight={self.vision_token_weight} needs a per-token modality "
                f"label (loss_mask) for each of the {len(self._q_hidden)} calibration batches; got "
                f"{sum(m is not None for m in masks)}. Build the rows with qvlm_modifiers.data."
                "build_calibration_dataset and run qvlm_modifiers.oneshot (or pass use_loss_mask=True to "
                "llmcompressor.oneshot), or set vision_token_weight: 1.0."
            )
        if not any(bool((torch.as_tensor(m) == VISION).any()) for m in masks):
            raise CalibrationDataError(
                f"QVLMModifier: vision_token_weight={self.vision_token_weight} weighs image tokens, but no "
                "calibration loss_mask marks any (value 2): the masks are not modality labels (e.g. "
                "llm-compressor's answer-only 0/1 masks) or the rows have no image. Build the rows with "
                "qvlm_modifiers.data.build_calibration_dataset, or set vision_token_weight: 1.0."
            )
        weights = []
        for index, (mask, hidden) in enumerate(zip(masks, self._q_hidden)):
            if torch.as_tensor(mask).numel() != hidden.shape[:-1].numel():
                raise CalibrationDataError(
                    f"QVLMModifier: calibration batch {index} has a loss_mask of {torch.as_tensor(mask).numel()} "
                    f"tokens for a hidden state of {hidden.shape[:-1].numel()}; every row's loss_mask must "
                    "label each token of that row (qvlm_modifiers.data.build_calibration_dataset does)."
                )
            weights.append(modality_token_weights(mask, hidden.shape, self.vision_token_weight))
        return weights

    # ------------------------------------------------------------------------------------------
    # range variables of one Linear
    # ------------------------------------------------------------------------------------------

    def _register_act_sampling(self, block: list[int], store: dict[int, list[torch.Tensor]]):
        handles = []
        for k in block:
            for _, m in self._layer_linears[k]:
                a = m.quantization_scheme.input_activations
                static_standard = a is not None and a.dynamic is False
                if not (static_standard or self._research_mode):
                    continue

                def hook(module, args, _store=store):
                    x = args[0].detach()
                    x = x.reshape(-1, x.shape[-1])
                    if x.shape[0] > _ACT_SAMPLE_TOKENS:
                        idx = torch.linspace(0, x.shape[0] - 1, _ACT_SAMPLE_TOKENS, device=x.device).long()
                        x = x[idx]
                    _store.setdefault(id(module), []).append(x.float().cpu())

                handles.append(m.register_forward_pre_hook(hook))
        return handles

    def _range_variables(self, module: torch.nn.Module, act_samples: list[torch.Tensor] | None) -> list[RangeVariable]:
        scheme = module.quantization_scheme
        out = []
        if scheme.weights is not None:
            observed = flatten_for_ranges(module.weight.detach(), "weight", scheme.weights)
            out.append(self._variable(module, "weight", observed, scheme.weights))
        a = scheme.input_activations
        if a is not None and a.dynamic is False and act_samples:
            observed = flatten_for_ranges(torch.cat(act_samples, dim=0), "input", a)
            var = self._variable(module, "input", observed, a)
            if self.search_activations:
                out.append(var)
        if self._research_mode and act_samples:
            # RESEARCH: static per-input-channel ranges (paper / reference code), fake-quant only
            observed = torch.cat(act_samples, dim=0).unsqueeze(-1)  # (tokens, C, 1)
            var = self._research_variable(module, observed)
            if self.search_activations:
                out.append(var)
        return out

    @property
    def _research_mode(self) -> bool:
        return self.research_static_channel_activation_bits is not None

    def _research_args(self) -> QuantizationArgs:
        return QuantizationArgs(
            num_bits=self.research_static_channel_activation_bits, type="int", symmetric=False, strategy="tensor"
        )

    def _research_variable(self, module, observed: torch.Tensor) -> RangeVariable:
        args = self._research_args()
        candidates, labels = [], []
        for (low, high), label in [
            (lp_norm_range(observed, args, self.init_shrink_factors, self.init_norm), "init"),
            *[(percentile_range(observed, p, False), f"p={p}") for p in self.percentile_grid],
        ]:
            scale, zp = range_qparams(low, high, args)
            setting = {"scale": scale.reshape(-1), "zero_point": zp.reshape(-1)}
            if any(torch.equal(c["scale"], setting["scale"]) and torch.equal(c["zero_point"], setting["zero_point"]) for c in candidates):
                continue
            candidates.append(setting)
            labels.append(label)

        def apply(setting, _m=module):
            _m.qvlm_research_act_qparams = (setting["scale"], setting["zero_point"])

        name = f"{self._module_names.get(id(module), '?')}.input_per_channel_research"
        var = RangeVariable(name=name, candidates=candidates, labels=labels, apply=apply)
        var.set(0)
        return var

    def _variable(self, module, base_name: str, observed: torch.Tensor, args: QuantizationArgs) -> RangeVariable:
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

        norm = self.init_weight_norm if base_name == "weight" else self.init_norm
        add(*lp_norm_range(observed, args, self.init_shrink_factors, norm), "init")
        for p in self.percentile_grid:
            add(*percentile_range(observed, p, bool(args.symmetric)), f"p={p}")

        def apply(setting, _m=module, _b=base_name):
            getattr(_m, f"{_b}_scale").data.copy_(setting["scale"])
            if "zero_point" in setting:
                getattr(_m, f"{_b}_zero_point").data.copy_(setting["zero_point"])
            if _b == "weight":  # the key of _cached_weight_forward's fake-quantized weight
                _m.__dict__["_qvlm_weight_key"] = id(setting)

        name = f"{self._module_names.get(id(module), '?')}.{base_name}"
        var = RangeVariable(name=name, candidates=candidates, labels=labels, apply=apply)
        var.set(0)
        return var

    def _commit_qparams(self, module: torch.nn.Module) -> None:
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
    def _quantize_outside_decoder(self, modules: Iterable[torch.nn.Module]) -> None:
        """lp-norm ranges for quantized Linears outside the decoder layers (vision tower)."""
        in_layers = {id(m) for ms in self._layer_linears.values() for _, m in ms}
        for m in modules:
            if id(m) in in_layers or id(m) in self._done:
                continue
            scheme = getattr(m, "quantization_scheme", None)
            if scheme is None or scheme.weights is None or not hasattr(m, "weight_scale"):
                continue
            if scheme.input_activations is not None and scheme.input_activations.dynamic is False:
                raise RecipeError(
                    f"QVLMModifier: static activation quantization outside the decoder layers "
                    f"({self._module_names.get(id(m))}) is not supported; use dynamic per-token "
                    "activations for the vision tower."
                )
            observed = flatten_for_ranges(m.weight.detach(), "weight", scheme.weights)
            self._variable(m, "weight", observed, scheme.weights)  # applies the lp-norm range
            m.__dict__.pop("_qvlm_weight_key", None)
            self._commit_qparams(m)
            self._done.add(id(m))

    # ------------------------------------------------------------------------------------------
    # visual-encoder optimization (Eq. 8-10)
    # ------------------------------------------------------------------------------------------

    def _optimize_vision_encoder(self, state: State) -> None:
        from qvlm_modifiers.families import image_token_id
        from qvlm_modifiers.qvlm.visual import dynamic_token_fake_quant_ste, fake_quant_range_ste, veo_objective

        model = state.model
        family = get_family(model)
        loader = getattr(getattr(state, "data", None), "calib", None)
        if loader is None:
            raise CalibrationDataError(
                "QVLMModifier: optimize_vision_encoder needs calibration data; pass a dataset to oneshot."
            )
        vision = model.get_submodule(family.vision_tower)
        learn = []
        for name, m in vision.named_modules():
            scheme = getattr(m, "quantization_scheme", None)
            if scheme is None or scheme.weights is None or id(m) in self._done:
                continue
            args = scheme.weights
            observed = flatten_for_ranges(m.weight.detach(), "weight", args)
            low0, high0 = lp_norm_range(observed, args, self.init_shrink_factors, self.init_weight_norm)
            log_low = torch.zeros_like(low0, requires_grad=True)
            log_high = torch.zeros_like(high0, requires_grad=True)
            learn.append((m, args, observed, low0, high0, log_low, log_high))
        if not learn:
            raise RecipeError(
                "QVLMModifier: optimize_vision_encoder found no quantized Linear in the vision tower "
                f"({family.vision_tower}); set quantize_vision_tower: true and keep the vision tower "
                "out of `ignore`."
            )

        def ste_forward(m, args, observed, low0, high0, log_low, log_high):
            act = m.quantization_scheme.input_activations

            def forward(x):
                w = fake_quant_range_ste(
                    observed.to(x.device), (low0 * log_low.exp()).to(x.device), (high0 * log_high.exp()).to(x.device),
                    args.num_bits, bool(args.symmetric),
                ).reshape(m.weight.shape)
                if act is not None:
                    x = dynamic_token_fake_quant_ste(x, act.num_bits, bool(act.symmetric))
                return torch.nn.functional.linear(x, w.to(x.dtype), m.bias)

            return forward

        projector = model.get_submodule(family.projector)
        captured: list[torch.Tensor] = []
        handle = projector.register_forward_hook(lambda _m, _a, out: captured.append(out[0] if isinstance(out, tuple) else out))
        image_id = image_token_id(model)
        batches = []
        for batch in loader:
            batch = dict(batch)
            loss_mask = batch.pop("loss_mask", None)
            labels = batch["input_ids"].clone()
            if loss_mask is not None:
                labels[torch.as_tensor(loss_mask).reshape(labels.shape) != 1] = -100
            else:
                labels[labels == image_id] = -100
            batches.append((batch, labels))
        requires_grad = {id(p): p.requires_grad for p in model.parameters()}
        saved_forward = {id(m): m.__dict__.get("forward") for m, *_ in learn}
        history = []
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            device = get_main_device()  # the sequential pipeline's onload device
            references = []
            with torch.no_grad():
                for batch, _ in batches:  # FP vision tower (quantization is disabled here)
                    captured.clear()
                    out = model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()},
                                output_hidden_states=True)
                    references.append((captured[-1].detach(), out.hidden_states[-1].detach()))
            for item in learn:
                item[0].forward = ste_forward(*item)
            params = [t for item in learn for t in item[5:]]
            optimizer = torch.optim.Adam(params, lr=self.vision_lr)
            weights: dict[int, torch.Tensor | None] = {}  # Eq. 8 Jacobian weights per batch, fixed
            with torch.enable_grad():
                for epoch in range(self.vision_epochs + 1):
                    sums = {"total": 0.0, "reg": 0.0, "ent": 0.0, "err": 0.0}
                    for index, ((batch, labels), (vision_r, final_r)) in enumerate(zip(batches, references)):
                        captured.clear()
                        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                        has_labels = bool((labels != -100).any())
                        out = model(**inputs, labels=labels.to(device) if has_labels else None, output_hidden_states=True)
                        reg = out.loss if has_labels else out.logits.new_zeros(())
                        terms = veo_objective(
                            reg, list(out.hidden_states), final_r, captured[-1], vision_r, self._num_levels,
                            self.vision_lambda_ent, self.vision_lambda_err, self.vision_eta,
                            weights=weights.get(index),
                        )
                        weights[index] = terms["weights"]
                        if epoch < self.vision_epochs:  # the last pass only measures
                            optimizer.zero_grad()
                            terms["total"].backward()
                            optimizer.step()
                        for key in sums:
                            sums[key] += float(terms[key].detach()) / len(batches)
                    history.append(sums)
                    logger.info(f"Q-VLM VEO epoch {epoch}: " + ", ".join(f"{k} {v:.5g}" for k, v in sums.items()))
        finally:
            handle.remove()
            for m, *_ in learn:
                if saved_forward[id(m)] is None:
                    m.__dict__.pop("forward", None)
                else:
                    m.forward = saved_forward[id(m)]
            for p in model.parameters():
                p.requires_grad_(requires_grad.get(id(p), False))
        with torch.no_grad():
            for m, args, _, low0, high0, log_low, log_high in learn:
                scale, zero_point = range_qparams(low0 * log_low.exp(), high0 * log_high.exp(), args)
                m.weight_scale.data.copy_(scale.reshape(m.weight_scale.shape))
                if getattr(m, "weight_zero_point", None) is not None:
                    m.weight_zero_point.data.copy_(zero_point.reshape(m.weight_zero_point.shape))
                self._commit_qparams(m)
                self._done.add(id(m))
        # history[0]: mean loss over the first pass (each batch before its own update: ~initial);
        # history[-1]: a measurement-only pass after training
        self._veo_history = history

    # ------------------------------------------------------------------------------------------
    # metadata
    # ------------------------------------------------------------------------------------------

    def _write_metadata(self, model: torch.nn.Module) -> None:
        part = self._partitioner
        if part is None:
            return
        metadata = {
            "method": "Q-VLM (entropy-based block partition, Eq. 4-7)",
            "blocks": [list(b) for b in part.blocks],
            "dependencies": [round(float(d), 6) for d in part.dependencies],
            "thresholds": [round(float(h), 6) for h in part.thresholds],
            "entropy_threshold": self.entropy_threshold,
            "num_levels": self._num_levels,
            "max_dependency": round(math.log(self._num_levels), 6),  # D <= log M (uniform levels)
            "estimator": self.entropy_estimator,
            "level_grid": self.entropy_level_grid,
            "temperature_scale": self.entropy_temperature_scale,
            "max_block_layers": self.max_block_layers,
            # what block_losses measure: Eq. 3's MSE, or a weighted variant of it
            "block_objective": self.block_objective,
            "vision_token_weight": self.vision_token_weight,
            "block_losses": [
                {k: (round(float(v), 8) if isinstance(v, float) else v) for k, v in r.items()} for r in self._block_losses
            ],
        }
        if self._research_mode:
            metadata["research_static_channel_activation_bits"] = self.research_static_channel_activation_bits
            metadata["research_note"] = (
                "static per-input-channel activation ranges were searched and applied as in-memory "
                "fake-quant only; they are not part of this checkpoint"
            )
        if self._veo_history is not None:
            metadata["visual_encoder_optimization"] = {
                "lambda_ent": self.vision_lambda_ent, "lambda_err": self.vision_lambda_err,
                "eta": self.vision_eta, "lr": self.vision_lr, "epochs": self.vision_epochs,
                "history": [{k: round(v, 8) for k, v in h.items()} for h in self._veo_history],
            }
        json.dumps(metadata)  # must be serialisable into config.json
        setattr(model.config, METADATA_ATTRIBUTE, metadata)
        logger.info(f"Q-VLM partition: {metadata['blocks']} (dependencies {metadata['dependencies']})")
