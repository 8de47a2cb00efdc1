"""Load pack-quantized (W3/W4/...) compressed-tensors checkpoints with the weights kept packed.

``import qvlm_modifiers`` calls :func:`register`, which makes transformers' ``"compressed-tensors"``
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
- :func:`unregister` (restores transformers' own classes for the process).

``QVLM_PACKED_BACKEND`` (``auto`` default, ``triton``, ``reference``) picks the forward of the
loaded :class:`PackedLinear` modules; :func:`set_backend` changes it on a loaded model.
``auto`` = Triton when the input is on CUDA in fp16/bf16, else reference. ``triton`` on CPU
tensors needs ``TRITON_INTERPRET=1`` (tests only).
"""

from __future__ import annotations

import contextlib

import functools
import os
import re

import torch
from torch import nn
from transformers.quantizers import auto as hf_auto
from transformers.quantizers.quantizer_compressed_tensors import CompressedTensorsHfQuantizer
from transformers.utils.quantization_config import CompressedTensorsConfig as _HFCompressedTensorsConfig

__all__ = [
    "CompressedTensorsConfig",
    "PackedKernelsConfig",
    "PackedCompressedTensorsHfQuantizer",
    "PackedLinear",
    "register",
    "unregister",
    "is_registered",
    "packed_kernels_enabled",
    "set_backend",
    "packed_modules",
    "in_memory_ignore_entries",
    "ENV_KERNELS",
    "ENV_BACKEND",
]

ENV_KERNELS = "QVLM_PACKED_KERNELS"
ENV_BACKEND = "QVLM_PACKED_BACKEND"
_BACKENDS = ("auto", "triton", "reference")


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
        return d


PackedKernelsConfig = CompressedTensorsConfig


# --------------------------------------------------------------------------- module
class PackedLinear(nn.Module):
    """A Linear whose weight stays in the compressed-tensors pack-quantized layout.

    Buffers (names as in the checkpoint): ``weight_packed`` int32 ``[N, ceil(K*b/32)]``,
    ``weight_scale`` ``[N, groups]``, ``weight_zero_point`` int32 ``[ceil(N*b/32), groups]``
    (asymmetric only), ``weight_shape`` int64 ``[2]``; optional ``bias``."""

    def __init__(self, layout, weight_packed, weight_scale, weight_zero_point=None, weight_shape=None, bias=None):
        super().__init__()
        self.layout = layout
        self.in_features = layout.in_features
        self.out_features = layout.out_features
        self.register_buffer("weight_packed", weight_packed)
        self.register_buffer("weight_scale", weight_scale)
        if weight_zero_point is not None:
            self.register_buffer("weight_zero_point", weight_zero_point)
        else:
            self.weight_zero_point = None
        if weight_shape is None:
            weight_shape = torch.tensor([layout.out_features, layout.in_features])
        self.register_buffer("weight_shape", weight_shape)
        self.bias = bias
        self.backend = os.environ.get(ENV_BACKEND, "auto")
        if self.backend not in _BACKENDS:
            raise ValueError(f"{ENV_BACKEND}={self.backend!r} is not one of {_BACKENDS}; unset it or pick one.")

    @classmethod
    def from_compressed_linear(cls, module: nn.Linear) -> "PackedLinear":
        """Take over the loaded compressed tensors of a compressed-tensors pack-quantized Linear."""
        from qvlm_modifiers.kernels.packing import PackedLayout

        from qvlm_modifiers.errors import CheckpointError
        from qvlm_modifiers.kernels.packing import packed_words

        args = module.quantization_scheme.weights
        n, k = (int(v) for v in module.weight_shape.tolist())
        rows, words = module.weight_packed.shape
        if n != rows or k <= 0 or packed_words(k, args.num_bits) != words:
            raise CheckpointError(
                f"{type(module).__name__} quantized as W{args.num_bits} has weight_shape {(n, k)} inconsistent with "
                f"its weight_packed {tuple(module.weight_packed.shape)}: the checkpoint holds no compressed tensors "
                "for this module (it is probably stored dense but missing from quantization_config.ignore, or its "
                "weight is tied). Add the module to `ignore` in config.json, or load with QVLM_PACKED_KERNELS=0 "
                "to get transformers' own behaviour."
            )
        layout = PackedLayout(
            out_features=n,
            in_features=k,
            num_bits=args.num_bits,
            group_size=args.group_size if args.strategy == "group" else None,
            symmetric=args.symmetric,
        )
        zp = getattr(module, "weight_zero_point", None) if not args.symmetric else None
        bias = module.bias
        return cls(
            layout,
            module.weight_packed.data,
            module.weight_scale.data,
            zp.data if zp is not None else None,
            module.weight_shape.data,
            bias,
        )

    def __getattr__(self, name: str):
        if name == "weight":
            raise AttributeError(
                "PackedLinear keeps its weight packed and has no dense `weight`: call `.dequantized_weight()` for "
                "a dense copy, or load with QVLM_PACKED_KERNELS=0 (or "
                "quantization_config=PackedKernelsConfig(packed_kernels=False)) to get dense Linears."
            )
        return super().__getattr__(name)

    def _use_triton(self, x: torch.Tensor) -> bool:
        if self.backend == "reference":
            return False
        if self.backend == "triton":
            return True
        return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and _triton_available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_triton(x):
            from qvlm_modifiers.kernels.dispatch import packed_linear

            return packed_linear(
                x, self.weight_packed, self.weight_scale, self.weight_zero_point, self.layout, bias=self.bias
            )
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense ``[N, K]`` weight via compressed-tensors' unpack + dequantize (reference path)."""
        from qvlm_modifiers.kernels.packing import reference_dequantize

        w = reference_dequantize(self.weight_packed, self.weight_scale, self.weight_zero_point, self.layout)
        return w.to(dtype or self.weight_scale.dtype)

    def extra_repr(self) -> str:
        lay = self.layout
        g = f"group={lay.group_size}" if lay.group_size else "per-channel"
        return (
            f"in_features={lay.in_features}, out_features={lay.out_features}, bias={self.bias is not None}, "
            f"W{lay.num_bits} {g} {'sym' if lay.symmetric else 'asym'}, backend={self.backend}"
        )


@functools.lru_cache(maxsize=1)
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def packed_modules(model: nn.Module) -> dict[str, PackedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}


def set_backend(model: nn.Module, backend: str) -> None:
    """Set the forward of every :class:`PackedLinear` of ``model`` (``auto``/``triton``/``reference``)."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {_BACKENDS}")
    for module in packed_modules(model).values():
        module.backend = backend


def _supported_for_packing(module: nn.Module) -> bool:
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationStatus

    from qvlm_modifiers.kernels.packing import SUPPORTED_BITS

    scheme = getattr(module, "quantization_scheme", None)
    if scheme is None or scheme.weights is None or not isinstance(module, nn.Linear):
        return False
    if hasattr(module, "_hf_hook"):  # accelerate-offloaded (multi-device/disk maps): leave to upstream
        return False
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return False  # nn.MultiheadAttention reads out_proj.weight directly instead of calling it
    args = scheme.weights
    return (
        getattr(module, "quantization_status", None) == QuantizationStatus.COMPRESSED
        and scheme.format == CompressionFormat.pack_quantized.value
        and scheme.input_activations is None
        and scheme.output_activations is None
        and args.type == "int"
        and args.num_bits in SUPPORTED_BITS
        and args.strategy in ("group", "channel")
        and args.actorder in (None, "weight")  # "weight" reorders at calibration only: layout unchanged
        and hasattr(module, "weight_packed")
    )


# --------------------------------------------------------------------------- ignore names
def in_memory_ignore_entries(model: nn.Module, ignore: list[str]) -> list[str]:
    """``ignore`` plus the in-memory form of every entry that matches no module as written.

    compressed-tensors 0.19 writes on-disk names (``vision_tower.x``) while the model being loaded
    has in-memory names (``model.vision_tower.x``). An entry that already matches is kept as is.
    For one that matches nothing: plain names go through the model's checkpoint conversion
    mapping (transformers ``WeightRenaming``s, on-disk -> in-memory) and otherwise match modules
    whose name ends with ``"." + entry``; ``re:`` patterns get the same renaming applied to their
    literal prefix, else are also tried after an arbitrary ``prefix.``. Class-name entries are
    left alone. Entries are only added, never removed (unmatched entries are harmless)."""
    names = [n for n, _ in model.named_modules() if n]
    name_set = set(names)
    renamings = _weight_renamings(model)
    out = list(dict.fromkeys(ignore))
    for entry in ignore:
        if entry.startswith("re:"):
            body = entry[3:]
            if any(re.match(body, n) for n in names):
                continue
            for src, dst in renamings:
                if re.match(src, body):
                    candidate = "re:" + re.sub(src, dst, body, count=1)
                    if candidate not in out and any(re.match(candidate[3:], n) for n in names):
                        out.append(candidate)
            prefixed = r"re:(?:.*\.)?" + body
            if prefixed not in out and any(re.match(prefixed[3:], n) for n in names):
                out.append(prefixed)
            continue
        if entry in name_set or "." not in entry and not any(n.endswith("." + entry) for n in names):
            continue  # exact name, or a class name such as "Linear"
        added = False
        for src, dst in renamings:
            candidate = re.sub(src, dst, entry, count=1)
            if candidate != entry and candidate in name_set and candidate not in out:
                out.append(candidate)
                added = True
        if not added:
            for n in names:
                if n.endswith("." + entry) and n not in out:
                    out.append(n)
    return out


def _weight_renamings(model: nn.Module) -> list[tuple[str, str]]:
    """(source regex, target) pairs of the model's on-disk -> in-memory key renamings."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        transforms = get_model_conversion_mapping(model, add_legacy=False)
    except Exception:  # older/newer transformers without this API: suffix matching still works
        return []
    pairs = []
    for t in transforms:
        if isinstance(t, WeightRenaming) and len(t.source_patterns) == 1 and len(t.target_patterns) == 1:
            pairs.append((t.source_patterns[0], t.target_patterns[0]))
    return pairs


# --------------------------------------------------------------------------- quantizer
class PackedCompressedTensorsHfQuantizer(CompressedTensorsHfQuantizer):
    """transformers' compressed-tensors quantizer that (1) maps on-disk ``ignore`` names to
    in-memory names before the model is prepared and (2) after loading replaces every integer
    pack-quantized Linear by a :class:`PackedLinear` (unless switched off)."""

    def _process_model_before_weight_loading(self, model, **kwargs):
        ct_config = self.compressor.quantization_config
        if ct_config is not None:
            ct_config.ignore = in_memory_ignore_entries(model, list(ct_config.ignore or []))
        return super()._process_model_before_weight_loading(model, **kwargs)

    def _process_model_after_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        if (
            config.dequantize
            or not config.is_quantization_compressed
            or not packed_kernels_enabled(config)
        ):
            return super()._process_model_after_weight_loading(model, **kwargs)
        replaced = 0
        for name, module in list(model.named_modules()):
            if not _supported_for_packing(module):
                continue
            _set_submodule(model, name, PackedLinear.from_compressed_linear(module))
            replaced += 1
        # Modules we could not take over (other schemes) keep upstream's decompress-on-first-forward
        # hook; it only visits modules that still carry a quantization scheme.
        from compressed_tensors.quantization.utils.helpers import is_module_quantized

        if not any(is_module_quantized(m) for m in model.modules()):
            self.compressor.remove_decompression_hook(model)
        model._qvlm_packed_linears = replaced

    @property
    def is_trainable(self):
        return False if packed_kernels_enabled(self.quantization_config) else super().is_trainable

    def is_qat_trainable(self) -> bool:
        return False if packed_kernels_enabled(self.quantization_config) else super().is_qat_trainable()


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# --------------------------------------------------------------------------- registration
def register() -> None:
    """Make ``quant_method: compressed-tensors`` load through this module (idempotent).

    transformers' ``register_quantizer``/``register_quantization_config`` refuse to replace an
    existing method, so the two mapping entries are set directly (the same dicts they write)."""
    hf_auto.AUTO_QUANTIZER_MAPPING["compressed-tensors"] = PackedCompressedTensorsHfQuantizer
    hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["compressed-tensors"] = CompressedTensorsConfig


def unregister() -> None:
    """Restore transformers' own compressed-tensors quantizer and config."""
    hf_auto.AUTO_QUANTIZER_MAPPING["compressed-tensors"] = CompressedTensorsHfQuantizer
    hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["compressed-tensors"] = _HFCompressedTensorsConfig


def is_registered() -> bool:
    return hf_auto.AUTO_QUANTIZER_MAPPING.get("compressed-tensors") is PackedCompressedTensorsHfQuantizer


@contextlib.contextmanager
def upstream_loading():
    """Load with transformers' own compressed-tensors quantizer inside the block (then restore).

    For judging a checkpoint itself, as a process that never imported this package (or vLLM)
    would see it: this loader also repairs ``ignore`` lists on load, upstream does not."""
    was_registered = is_registered()
    if was_registered:
        unregister()
    try:
        yield
    finally:
        if was_registered:
            register()
