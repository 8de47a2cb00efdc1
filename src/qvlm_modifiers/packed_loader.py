"""Load pack-quantized (W3/W4/...) compressed-tensors checkpoints with the weights kept packed.

``import qvlm_modifiers`` calls :func:`qvlm_modifiers.upstream.register`, which makes transformers' ``"compressed-tensors"``
quantization method use :class:`PackedCompressedTensorsHfQuantizer` (a subclass of transformers'
own ``CompressedTensorsHfQuantizer``) and :class:`CompressedTensorsConfig` (a subclass of
transformers' config adding one loading option). Checkpoints stay standard compressed-tensors
(``quant_method: compressed-tensors``, vLLM reads them unchanged); only the in-process loading
changes:

- Upstream (transformers 5.17 + compressed-tensors 0.19) keeps ``weight_packed`` after loading
  and decompresses the *whole model* to dense bf16 on the first forward pass (a forward pre-hook).
- With this quantizer every Linear whose scheme is integer pack-quantized (group or channel,
  symmetric or asymmetric, 2/3/4/8 bits) becomes a :class:`PackedLinear` that holds
  ``weight_packed`` / ``weight_scale`` / ``weight_zero_point`` / ``weight_shape`` (the checkpoint's
  own tensors, same names) and never materializes a dense weight:

  * on CUDA (fp16/bf16 activations) its forward calls the Triton kernels
    (``qvlm_modifiers.kernels.dispatch.packed_linear``: split-K decode for M <= 16, tiled GEMM or
    dequantize + cuBLAS for prefill);
  * otherwise (CPU, float32 activations, no Triton) it runs the reference path: unpack with
    compressed-tensors' ``unpack_from_int32``, dequantize, ``F.linear``, per call (transient
    dense weight, freed after the call).

  Linears that accelerate offloads (multi-device or disk ``device_map``) keep upstream's route.
- GPTQ act-order: ``static``/``weight`` (llm-compressor's ``GPTQModifier`` default) only changes
  the calibration order, the layout is the plain one: packed as above. ``group``/``dynamic``
  (older checkpoints; a ``weight_g_idx`` tensor maps each input column to its scale group) is
  refused by compressed-tensors 0.19 at config parsing, so transformers cannot load such a
  checkpoint at all; this loader accepts it, keeps it packed with its ``weight_g_idx`` and runs
  it through the reference dequantize + matmul (no Triton kernel takes the index), with a
  warning that names the modules' count and the reason.
- Every quantized Linear's outcome is logged in one line at load (``qvlm_modifiers.packed_loader``
  logger: INFO when all are packed, WARNING when some are left to transformers, with the reasons)
  and kept per module in :func:`linear_status`; ``qvlm inspect CKPT`` shows the same from the
  checkpoint's config alone (:func:`scheme_packing_blocker`).
- Compressed Linears keep transformers' weight initialization away (:func:`skip_init_of_compressed_linears`):
  SigLIP's ``_init_weights`` reads ``Linear.weight``, which a pack-quantized Linear does not have,
  so a checkpoint with a packed SigLIP vision tower (LLaVA-OneVision, Gemma 3) only reloads
  through this loader.
- Modules in the checkpoint's ``ignore`` list stay plain ``nn.Linear`` with their stored weights,
  whether ``ignore`` holds in-memory names (``model.vision_tower...``) or the on-disk names
  compressed-tensors 0.19 writes (``vision_tower...``): on-disk names are mapped to in-memory
  names through the model's own checkpoint conversion mapping and, failing that, by suffix
  (:func:`in_memory_ignore_entries`). This fix also applies when the kernels are switched off.

Switching the packed kernels off (the model then loads exactly as upstream does):

- environment variable ``QVLM_PACKED_KERNELS=0`` (read at load time), or
- ``from_pretrained(ckpt, quantization_config=PackedKernelsConfig(packed_kernels=False))``, or
- ``from_pretrained(ckpt, quantization_config=transformers.CompressedTensorsConfig(dequantize=True))``
  (upstream option: dense weights at load time), or
- :func:`qvlm_modifiers.upstream.unregister` (restores transformers' own classes for the process).

``QVLM_PACKED_BACKEND`` (``auto`` default, ``triton``, ``reference``) picks the forward of the
loaded :class:`PackedLinear` modules; :func:`set_backend` changes it on a loaded model.
``auto`` = Triton when the input is on CUDA in fp16/bf16, else reference. ``triton`` on CPU
tensors needs ``TRITON_INTERPRET=1`` (tests only).
"""

from __future__ import annotations

import logging
import os
from collections import Counter

import torch
from loguru import logger as loguru_logger
from torch import nn
from transformers.quantizers.quantizer_compressed_tensors import CompressedTensorsHfQuantizer
from transformers.utils.quantization_config import CompressedTensorsConfig as _HFCompressedTensorsConfig

from qvlm_modifiers.names import in_memory_ignore_entries
from qvlm_modifiers.packed_linear import ENV_BACKEND, PackedLinear, packed_modules, set_backend  # noqa: F401
from qvlm_modifiers.upstream import remove_init_placeholders, skip_init_of_compressed_linears

__all__ = [
    "CompressedTensorsConfig",
    "PackedKernelsConfig",
    "PackedCompressedTensorsHfQuantizer",
    "PackedLinear",
    "packed_kernels_enabled",
    "set_backend",
    "packed_modules",
    "in_memory_ignore_entries",
    "linear_status",
    "scheme_packing_blocker",
    "INDEX_ACT_ORDERS",
    "ENV_KERNELS",
    "ENV_BACKEND",
]

logger = logging.getLogger(__name__)

ENV_KERNELS = "QVLM_PACKED_KERNELS"


def packed_kernels_enabled(config=None) -> bool:
    """Whether loading keeps weights packed: the ``packed_kernels`` loading option when given,
    else ``QVLM_PACKED_KERNELS`` (default on; ``0``/``false``/``off`` turn it off)."""
    option = getattr(config, "packed_kernels", None)
    if option is not None:
        return bool(option)
    return os.environ.get(ENV_KERNELS, "1").strip().lower() not in ("0", "false", "off", "no")


# --------------------------------------------------------------------------- config
class CompressedTensorsConfig(_HFCompressedTensorsConfig):
    """transformers' ``CompressedTensorsConfig`` plus the loading option ``packed_kernels``.

    Same class name on purpose: transformers only merges loading options from a
    ``quantization_config=`` argument whose class name equals the checkpoint's config class.
    ``packed_kernels`` is a loading option only and never written to ``config.json``.

    Args:
        packed_kernels (`bool`, *optional*): ``False`` loads as upstream does (dense weights on
            first forward); ``True`` keeps weights packed; ``None`` defers to
            ``QVLM_PACKED_KERNELS``.
    """

    def __init__(self, *args, packed_kernels: bool | None = None, **kwargs):
        if args:  # config_groups given positionally
            kwargs["config_groups"], args = args[0], args[1:]
        kwargs["config_groups"], self.index_act_order_groups = _strip_index_act_order(kwargs.get("config_groups"))
        super().__init__(*args, **kwargs)
        self.packed_kernels = packed_kernels

    def get_loading_attributes(self):
        attrs = super().get_loading_attributes()
        if self.packed_kernels is not None:
            attrs["packed_kernels"] = self.packed_kernels
        return attrs

    def to_dict(self):
        d = super().to_dict()
        d.pop("packed_kernels", None)
        # write back the act-order that compressed-tensors 0.19 cannot parse (see _strip_index_act_order)
        for group, actorder in getattr(self, "index_act_order_groups", {}).items():
            weights = ((d.get("config_groups") or {}).get(group) or {}).get("weights")
            if isinstance(weights, dict):
                weights["actorder"] = actorder
        return d


#: GPTQ act-orders that store a ``weight_g_idx`` (column -> scale group). compressed-tensors 0.19
#: refuses them when parsing a config ("actorder='group' has been removed").
INDEX_ACT_ORDERS = ("group", "dynamic")


def _strip_index_act_order(config_groups):
    """``(config_groups without group/dynamic act-order, {group name: that act-order})``.

    compressed-tensors 0.19's ``QuantizationArgs`` raises on ``actorder: group``/``dynamic``, so
    transformers cannot even parse such a checkpoint's config. Parsing it with ``actorder: null``
    and remembering the groups lets :class:`PackedCompressedTensorsHfQuantizer` load their
    ``weight_g_idx`` and dequantize with it (or refuse clearly when the packed kernels are off)."""
    import copy

    if not isinstance(config_groups, dict):
        return config_groups, {}
    stripped: dict[str, str] = {}
    out = {}
    for name, group in config_groups.items():
        weights = group.get("weights") if isinstance(group, dict) else None
        actorder = weights.get("actorder") if isinstance(weights, dict) else None
        if isinstance(actorder, str) and actorder.lower() in INDEX_ACT_ORDERS:
            group = copy.deepcopy(group)
            group["weights"]["actorder"] = None
            stripped[name] = actorder
        out[name] = group
    return out, stripped


PackedKernelsConfig = CompressedTensorsConfig


def _get(obj, key):
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def scheme_packing_blocker(fmt, weights, input_activations=None, output_activations=None) -> str | None:
    """Why a Linear with this compressed-tensors scheme would *not* be packed by this loader
    (``None``: it would). Reads only the config (``weights`` etc. as ``QuantizationArgs`` or the
    dicts of ``config.json``), so ``qvlm inspect`` can say it without loading weights.

    Packed: integer, pack-quantized, 2/3/4/8-bit, group or channel, weight-only; act-order
    ``None``/``weight``/``static`` (one layout) or ``group``/``dynamic`` (packed with its
    ``weight_g_idx``, reference path). Everything else is left to transformers, which dequantizes
    it to dense on the first forward."""
    from qvlm_modifiers.kernels.packing import SUPPORTED_BITS

    if not weights:
        return "weights not quantized"
    bits, wtype = _get(weights, "num_bits"), _get(weights, "type") or "int"
    if input_activations or output_activations:
        abits = _get(input_activations or output_activations, "num_bits")
        return f"activations quantized too (W{bits}A{abits}): no packed kernel"
    fmt = getattr(fmt, "value", fmt)
    if fmt != "pack-quantized":
        return f"format {fmt} (not pack-quantized)"
    if wtype != "int":
        return f"{wtype} weights"
    if bits not in SUPPORTED_BITS:
        return f"{bits}-bit weights (packed kernels: {'/'.join(map(str, SUPPORTED_BITS))})"
    strategy = getattr(_get(weights, "strategy"), "value", _get(weights, "strategy"))
    if strategy not in ("group", "channel"):
        return f"strategy {strategy} (packed kernels: group, channel)"
    actorder = getattr(_get(weights, "actorder"), "value", _get(weights, "actorder"))
    if actorder not in (None, "weight", "static", *INDEX_ACT_ORDERS):
        return f"act-order {actorder!r}"
    return None


def _module_packing_blocker(module: nn.Module) -> str | None:
    """:func:`scheme_packing_blocker` for a loaded module, plus what only the loaded model shows."""
    from compressed_tensors.quantization import QuantizationStatus

    scheme = getattr(module, "quantization_scheme", None)
    if scheme is None or scheme.weights is None:
        return "weights not quantized"
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__} is not a Linear"
    if hasattr(module, "_hf_hook"):  # accelerate-offloaded (multi-device/disk maps): leave to upstream
        return "offloaded by accelerate (multi-device or disk device_map)"
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return "nn.MultiheadAttention reads out_proj.weight directly instead of calling it"
    reason = scheme_packing_blocker(scheme.format, scheme.weights, scheme.input_activations, scheme.output_activations)
    if reason is not None:
        return reason
    if getattr(module, "quantization_status", None) != QuantizationStatus.COMPRESSED or not hasattr(
        module, "weight_packed"
    ):
        return "not stored compressed"
    return None


def _supported_for_packing(module: nn.Module) -> bool:
    return _module_packing_blocker(module) is None


def linear_status(model: nn.Module) -> dict[str, str]:
    """Per quantized Linear of a model loaded through this loader: ``"packed"``, ``"packed,
    act-order index"`` (``weight_g_idx``, reference path), or ``"transformers: <reason>"`` (left to
    transformers' decompress-on-first-forward). Empty when the loader did not run (kernels off)."""
    return dict(getattr(model, "_qvlm_linear_status", {}))


def _layout_summary(modules) -> str:
    kinds = Counter()
    for m in modules:
        lay = m.layout
        kinds[f"W{lay.num_bits} {'g' + str(lay.group_size) if lay.group_size else 'channel'}"
              f" {'sym' if lay.symmetric else 'asym'}"] += 1
    return ", ".join(k if len(kinds) == 1 else f"{n} x {k}" for k, n in sorted(kinds.items()))


def _log_load_summary(model: nn.Module, status: dict[str, str]) -> str:
    packed = [m for m in packed_modules(model).values()]
    left = Counter(v.split(": ", 1)[1] for v in status.values() if v.startswith("transformers: "))
    indexed = sum(1 for v in status.values() if v == "packed, act-order index")
    line = (
        f"qvlm packed loader: {len(packed)} of {len(status)} quantized Linears packed"
        + (f" ({_layout_summary(packed)})" if packed else "")
        + f"; {sum(left.values())} left to transformers (dense after the first forward)"
        + ("".join(f"; {n} x {reason}" for reason, n in sorted(left.items())) if left else "")
    )
    if indexed:
        line += (
            f"; {indexed} with a GPTQ act-order index (weight_g_idx) run dequantize + matmul per call, "
            "not the Triton kernels"
        )
    # through loguru, as llm-compressor and our Modifiers log: shown at INFO by default, so a user
    # sees on every load what runs packed (stdlib INFO is hidden unless the app configures logging)
    loguru_logger.log("WARNING" if left or indexed else "INFO", line)
    return line


# --------------------------------------------------------------------------- quantizer
class PackedCompressedTensorsHfQuantizer(CompressedTensorsHfQuantizer):
    """transformers' compressed-tensors quantizer that (1) maps on-disk ``ignore`` names to
    in-memory names before the model is prepared, (2) keeps weight initialization away from
    compressed Linears (:func:`skip_init_of_compressed_linears`), (3) loads GPTQ act-order
    ``weight_g_idx`` tensors, and (4) after loading replaces every integer pack-quantized Linear by
    a :class:`PackedLinear` (unless switched off) and logs a one-line summary."""

    def _keeps_packed(self) -> bool:
        config = self.quantization_config
        return not config.dequantize and config.is_quantization_compressed and packed_kernels_enabled(config)

    def _process_model_before_weight_loading(self, model, **kwargs):
        ct_config = self.compressor.quantization_config
        if ct_config is not None:
            ct_config.ignore = in_memory_ignore_entries(model, list(ct_config.ignore or []))
        index_groups = getattr(self.quantization_config, "index_act_order_groups", {})
        if index_groups and not self._keeps_packed():
            from qvlm_modifiers.errors import CheckpointError

            raise CheckpointError(
                f"This checkpoint uses GPTQ act-order {sorted(set(index_groups.values()))} (config groups "
                f"{sorted(index_groups)}): its weights need their weight_g_idx to be dequantized, which "
                "compressed-tensors 0.19 (transformers' own path) no longer supports. Only the packed loader "
                "reads it: load without QVLM_PACKED_KERNELS=0 / packed_kernels=False / dequantize=True."
            )
        result = super()._process_model_before_weight_loading(model, **kwargs)
        if index_groups:
            _add_g_idx_parameters(model, ct_config, index_groups)
        skip_init_of_compressed_linears(model)
        return result

    def _process_model_after_weight_loading(self, model, **kwargs):
        remove_init_placeholders(model)
        if not self._keeps_packed():
            return super()._process_model_after_weight_loading(model, **kwargs)
        replaced = 0
        status: dict[str, str] = {}
        for name, module in list(model.named_modules()):
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                continue
            reason = _module_packing_blocker(module)
            if reason is not None:
                if getattr(module, "weight_g_idx", None) is not None:
                    from qvlm_modifiers.errors import CheckpointError

                    raise CheckpointError(
                        f"{name} uses a GPTQ act-order index (weight_g_idx) but cannot be packed ({reason}), and "
                        "transformers' own path (compressed-tensors 0.19) would dequantize it without the index, "
                        "i.e. wrongly. Load it so that it can be packed (e.g. on one device, without a "
                        "multi-device or disk device_map)."
                    )
                status[name] = f"transformers: {reason}"
                continue
            packed = PackedLinear.from_compressed_linear(module)
            _set_submodule(model, name, packed)
            status[name] = "packed, act-order index" if packed.weight_g_idx is not None else "packed"
            replaced += 1
        # Modules we could not take over (other schemes) keep upstream's decompress-on-first-forward
        # hook; it only visits modules that still carry a quantization scheme.
        from compressed_tensors.quantization.utils.helpers import is_module_quantized

        if not any(is_module_quantized(m) for m in model.modules()):
            self.compressor.remove_decompression_hook(model)
        model._qvlm_packed_linears = replaced
        model._qvlm_linear_status = status
        _log_load_summary(model, status)

    @property
    def is_trainable(self):
        return False if packed_kernels_enabled(self.quantization_config) else super().is_trainable

    def is_qat_trainable(self) -> bool:
        return False if packed_kernels_enabled(self.quantization_config) else super().is_qat_trainable()


def _add_g_idx_parameters(model: nn.Module, ct_config, index_groups: dict[str, str]) -> None:
    """Give every compressed Linear of a group/dynamic act-order config group a ``weight_g_idx``
    parameter, so that transformers loads the checkpoint's index into it (compressed-tensors 0.19
    no longer registers one)."""
    from compressed_tensors.utils.match import match_named_modules

    for group in index_groups:
        scheme = ct_config.config_groups[group]
        for _, module in match_named_modules(model, scheme.targets, ct_config.ignore):
            packed = getattr(module, "weight_packed", None)
            if isinstance(module, nn.Linear) and packed is not None and not hasattr(module, "weight_g_idx"):
                g_idx = torch.empty(module.in_features, dtype=torch.int32, device=packed.device)
                module.register_parameter("weight_g_idx", nn.Parameter(g_idx, requires_grad=False))


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
