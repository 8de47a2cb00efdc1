"""Read a compressed-tensors checkpoint without trusting it: ``qvlm inspect``.

Everything here reads safetensors *headers* directly (8-byte little-endian length + JSON), so a
truncated or corrupt file is reported as a :class:`~qvlm_modifiers.errors.CheckpointError` naming
the file and the fix, never as a traceback, and nothing is unpickled. The optional reload check
loads the checkpoint with ``AutoModelForImageTextToText.from_pretrained`` (safetensors only) and
compares every tensor of the reloaded model, mapped back to on-disk names with transformers' own
``revert_weight_conversion``, bit for bit against the file; it also reports transformers'
missing/unexpected/mismatched keys (the symptom of the vision-tower re-initialization pitfall).
It loads with transformers' own loader first; when that fails and ``import qvlm_modifiers``'s
packed loader succeeds (a packed SigLIP vision tower), it says so and checks that load instead.

Per quantized module it also says, from ``config.json`` alone, whether ``import qvlm_modifiers``'s
packed loader would keep it packed or leave it to transformers (which dequantizes it to dense on
the first forward), and why (:func:`qvlm_modifiers.packed_loader.scheme_packing_blocker`).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qvlm_modifiers.errors import CheckpointError
from qvlm_modifiers.safetensors_header import (  # noqa: F401  (re-exported)
    DTYPE_BYTES,
    QUANT_PARAM_SUFFIXES,
    SafetensorsHeader,
    _fix_hint,
    checkpoint_files,
    read_safetensors_header,
)

__all__ = [
    "SafetensorsHeader",
    "ModuleInfo",
    "CheckpointReport",
    "read_safetensors_header",
    "checkpoint_files",
    "inspect_checkpoint",
    "check_reload",
    "format_report",
]

@dataclass
class ModuleInfo:
    name: str
    scheme: str  # e.g. "W4A16 int group128 sym" or "bf16 (not quantized)"
    format: str  # on-disk form: "pack-quantized", "int-quantized", "dense"
    weight_shape: tuple[int, ...]
    stored_bytes: int  # weight + its quantization parameters
    # quantized modules: "packed", "packed, act-order index" or "transformers: <reason>" (packed loader)
    loader: str = ""


@dataclass
class CheckpointReport:
    path: str
    architecture: str
    quant_format: str | None
    config_groups: dict[str, str]  # group name -> scheme description
    ignore: list[str]
    modules: list[ModuleInfo]
    scheme_counts: dict[str, int]
    nominal_weight_bits: list[int]
    effective_bits_quantized: float | None  # stored bits per quantized weight, scales included
    size_on_disk: int
    bf16_size: int
    files: list[str]
    reload: dict[str, Any] | None = field(default=None)
    loader_summary: str = ""  # one line: what the packed loader would pack / leave to transformers

    @property
    def compression_vs_bf16(self) -> float:
        return self.bf16_size / self.size_on_disk if self.size_on_disk else float("nan")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["compression_vs_bf16"] = self.compression_vs_bf16
        return out


def _describe_args(args: dict | None) -> str | None:
    if not args:
        return None
    strategy = args.get("strategy") or "tensor"
    desc = f"{args.get('type', 'int')}{args.get('num_bits')} {strategy}"
    if strategy == "group" and args.get("group_size"):
        desc = f"{args.get('type', 'int')}{args.get('num_bits')} group{args['group_size']}"
    desc += " sym" if args.get("symmetric", True) else " asym"
    if args.get("dynamic"):
        desc += " dynamic"
    return desc


def describe_scheme(group: dict) -> str:
    """``W4A16 (weights int4 group128 sym)`` from a compressed-tensors config group."""
    w, a = group.get("weights") or {}, group.get("input_activations") or {}
    wb = w.get("num_bits", 16) if w else 16
    ab = a.get("num_bits", 16) if a else 16
    parts = [p for p in (_describe_args(w) and f"weights {_describe_args(w)}",
                         _describe_args(a) and f"activations {_describe_args(a)}") if p]
    return f"W{wb}A{ab} ({'; '.join(parts)})" if parts else f"W{wb}A{ab}"


def _target_matches(target: str, name: str) -> bool:
    if target.startswith("re:"):
        pattern = target[3:]
        return any(re.match(pattern, n) for n in (name, "model." + name, name.removeprefix("model.")))
    return name == target or name.endswith("." + target) or "model." + name == target


def _group_for(name: str, groups: dict[str, dict]) -> str | None:
    """Config group of a quantized module: name/regex targets first, then class-name targets."""
    by_name = [g for g, spec in groups.items() if any(
        t.startswith("re:") or "." in t for t in spec.get("targets", [])) and any(
        _target_matches(t, name) for t in spec.get("targets", []))]
    if by_name:
        return by_name[0]
    class_targets = [g for g, spec in groups.items() if any(
        not t.startswith("re:") and "." not in t for t in spec.get("targets", []))]
    return class_targets[0] if class_targets else None


def _loader_status(spec: dict, quant_format: str | None, leaves: dict) -> str:
    """What ``import qvlm_modifiers``'s packed loader does with a module of config group ``spec``."""
    from qvlm_modifiers.packed_loader import INDEX_ACT_ORDERS, scheme_packing_blocker

    weights = spec.get("weights") or {}
    reason = scheme_packing_blocker(spec.get("format") or quant_format, weights,
                                    spec.get("input_activations"), spec.get("output_activations"))
    if reason is not None:
        return f"transformers: {reason}"
    if "weight_g_idx" in leaves or str(weights.get("actorder")).lower() in INDEX_ACT_ORDERS:
        return "packed, act-order index"
    return "packed"


def loader_summary(modules: list[ModuleInfo]) -> str:
    """``"14 of 14 quantized Linears packed; 0 left to transformers"`` (+ reasons, act-order index)."""
    statuses = [m.loader for m in modules if m.loader]
    if not statuses:
        return ""
    packed = sum(1 for s in statuses if s.startswith("packed"))
    left = Counter(s.split(": ", 1)[1] for s in statuses if s.startswith("transformers: "))
    line = (f"{packed} of {len(statuses)} quantized Linears packed; {sum(left.values())} left to transformers "
            "(dense after the first forward)")
    line += "".join(f"; {n} x {reason}" for reason, n in sorted(left.items()))
    indexed = statuses.count("packed, act-order index")
    if indexed:
        line += f"; {indexed} with a GPTQ act-order index (reference dequantize + matmul, no Triton kernel)"
    return line


def _read_small_tensor(path: Path, name: str) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return tuple(int(v) for v in fh.get_tensor(name).flatten().tolist())


def inspect_checkpoint(ckpt: str | Path, reload: bool = False) -> CheckpointReport:
    """Describe a checkpoint: per-module scheme, ignored modules, bits, size vs bf16 [, reload check]."""
    ckpt = Path(ckpt)
    files = checkpoint_files(ckpt)
    try:
        config = json.loads((ckpt / "config.json").read_text())
    except ValueError as err:
        raise CheckpointError(f"{ckpt / 'config.json'} is not valid JSON ({err}). " + _fix_hint(ckpt / "config.json")) from err
    headers = [read_safetensors_header(f) for f in files]
    tensors: dict[str, dict] = {}
    for h in headers:
        tensors.update(h.tensors)

    qcfg = config.get("quantization_config") or {}
    if not qcfg:
        qcfg = (config.get("text_config") or {}).get("quantization_config") or {}
    groups: dict[str, dict] = qcfg.get("config_groups") or {}
    ignore = list(qcfg.get("ignore") or [])
    quant_format = qcfg.get("format")

    file_of = {name: h.path for h in headers for name in h.tensors}
    by_module: dict[str, dict[str, dict]] = defaultdict(dict)
    for name, info in tensors.items():
        module, _, leaf = name.rpartition(".")
        by_module[module][leaf] = info

    modules: list[ModuleInfo] = []
    bf16_bytes = 0
    quantized_numel = 0
    quantized_stored = 0
    for module, leaves in sorted(by_module.items()):
        quantized = "weight_scale" in leaves and ("weight" in leaves or "weight_packed" in leaves)
        for leaf, info in leaves.items():
            if quantized and (leaf in QUANT_PARAM_SUFFIXES or leaf in ("weight", "weight_packed")):
                continue
            bf16_bytes += math.prod(info["shape"]) * 2
        if not quantized:
            w = leaves.get("weight")
            if w is not None and len(w["shape"]) == 2:
                modules.append(ModuleInfo(module, f"{w['dtype'].lower()} (not quantized)", "dense",
                                          tuple(w["shape"]), math.prod(w["shape"]) * DTYPE_BYTES[w["dtype"]]))
            continue
        stored = sum(
            math.prod(i["shape"]) * DTYPE_BYTES[i["dtype"]]
            for leaf, i in leaves.items() if leaf.startswith("weight")
        )
        if "weight_packed" in leaves:
            fmt = "pack-quantized"
            packed = leaves["weight_packed"]
            # the logical shape is stored as a tensor; infer it from the scales' rows and the packing
            rows = packed["shape"][0]
            group = _group_for(module, groups)
            bits = ((groups.get(group) or {}).get("weights") or {}).get("num_bits") if group else None
            per_word = 32 // bits if bits else None
            cols = packed["shape"][1] * per_word if per_word and packed["dtype"] == "I32" else None
            shape = (rows, cols) if cols else tuple(packed["shape"])
            if "weight_shape" in leaves:  # the logical shape, stored by compressed-tensors (exact for 3/5/6/7 bits)
                shape = _read_small_tensor(file_of[f"{module}.weight_shape"], f"{module}.weight_shape")
        else:
            fmt = quant_format or "int-quantized"
            shape = tuple(leaves["weight"]["shape"])
            group = _group_for(module, groups)
        numel = math.prod(shape)
        bf16_bytes += numel * 2
        quantized_numel += numel
        quantized_stored += stored
        scheme = describe_scheme(groups[group]) if group in groups else "quantized (no matching config group)"
        loader = _loader_status(groups[group], quant_format, leaves) if group in groups else "transformers: no config group"
        modules.append(ModuleInfo(module, scheme, fmt, shape, stored, loader))

    counts = Counter(m.scheme for m in modules)
    nominal = sorted({((g.get("weights") or {}).get("num_bits")) for g in groups.values() if g.get("weights")})
    report = CheckpointReport(
        path=str(ckpt),
        architecture=",".join(config.get("architectures") or [config.get("model_type", "?")]),
        quant_format=quant_format,
        config_groups={g: describe_scheme(spec) for g, spec in groups.items()},
        ignore=ignore,
        modules=modules,
        scheme_counts=dict(counts),
        nominal_weight_bits=[b for b in nominal if b is not None],
        effective_bits_quantized=(8 * quantized_stored / quantized_numel) if quantized_numel else None,
        size_on_disk=sum(h.file_size for h in headers),
        bf16_size=bf16_bytes,
        files=[f.name for f in files],
        loader_summary=loader_summary(modules),
    )
    if reload:
        report.reload = check_reload(ckpt, headers)
    return report


def check_reload(ckpt: str | Path, headers: list[SafetensorsHeader] | None = None,
                 trust_remote_code: bool = False) -> dict[str, Any]:
    """Reload with transformers and compare every tensor with the file, bit for bit.

    ``exact`` is True when transformers reports no missing/unexpected/mismatched keys, and every
    tensor of the reloaded model (mapped back to on-disk names by transformers'
    ``revert_weight_conversion``) equals the checkpoint's tensor of that name; tied weights that the
    file stores once are compared once. Loads with transformers' own compressed-tensors quantizer
    (what vLLM-free users and other tools get); only when that raises, with this package's packed
    loader, and then reports ``loader: "qvlm_modifiers"`` and ``upstream_error`` (the checkpoint
    reloads only after ``import qvlm_modifiers``: a packed SigLIP vision tower).
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText
    from transformers.core_model_loading import revert_weight_conversion

    from qvlm_modifiers.upstream import packed_loading, upstream_loading

    ckpt = Path(ckpt)
    headers = headers or [read_safetensors_header(f) for f in checkpoint_files(ckpt)]

    def load():
        return AutoModelForImageTextToText.from_pretrained(
            ckpt, dtype="auto", use_safetensors=True, output_loading_info=True, trust_remote_code=trust_remote_code,
        )

    via: dict[str, Any] = {"loader": "transformers"}
    try:
        with upstream_loading():  # judge the checkpoint itself, as plain transformers loads it
            model, info = load()
    except Exception as upstream_err:  # noqa: BLE001 - reported as the check's result, with its message
        try:
            with packed_loading():
                model, info = load()
        except Exception:  # noqa: BLE001
            return {"exact": False, "error": f"{type(upstream_err).__name__}: {upstream_err}"}
        via = {"loader": "qvlm_modifiers", "upstream_error": f"{type(upstream_err).__name__}: {upstream_err}"}
    model.eval()
    problems: dict[str, list[str]] = {
        k: sorted(map(str, info.get(k) or [])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    state = revert_weight_conversion(model, dict(model.state_dict()))
    file_of = {name: h.path for h in headers for name in h.tensors}
    differing: list[str] = []
    not_in_file: list[str] = []
    compared = 0
    seen_storage: dict[tuple[int, int], str] = {}
    handles = {}
    try:
        for name, tensor in state.items():
            if name not in file_of:
                key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
                if key in seen_storage or getattr(model.config, "tie_word_embeddings", False) and name.endswith("lm_head.weight"):
                    continue
                not_in_file.append(name)
                continue
            seen_storage[(tensor.untyped_storage().data_ptr(), tensor.storage_offset())] = name
            path = file_of[name]
            if path not in handles:
                handles[path] = safe_open(str(path), framework="pt")
            stored = handles[path].get_tensor(name)
            compared += 1
            if stored.dtype != tensor.dtype or stored.shape != tensor.shape or not torch.equal(stored, tensor.detach().cpu()):
                differing.append(name)
    finally:
        handles.clear()
    in_file_not_model = sorted(set(file_of) - set(state))
    exact = not any(problems.values()) and not differing and not not_in_file and not in_file_not_model
    return {
        "exact": exact,
        **via,
        "compared_tensors": compared,
        "differing": differing[:20],
        "model_tensors_not_in_file": not_in_file[:20],
        "file_tensors_not_in_model": in_file_not_model[:20],
        **{k: v[:20] for k, v in problems.items()},
    }


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def format_report(report: CheckpointReport, all_modules: bool = False) -> str:
    lines = [f"checkpoint   {report.path}", f"architecture {report.architecture}",
             f"format       {report.quant_format or 'not quantized'}"]
    for g, desc in report.config_groups.items():
        lines.append(f"group        {g}: {desc}")
    if not report.ignore:
        lines.append("ignored      (none)")
    elif all_modules or len(report.ignore) <= 6:
        lines.append(f"ignored      {', '.join(report.ignore)}")
    else:
        lines.append(f"ignored      {len(report.ignore)} entries: {', '.join(report.ignore[:6])}, ... (--all lists them)")
    lines.append("schemes      " + "; ".join(f"{n} x {s}" for s, n in sorted(report.scheme_counts.items())))
    if report.nominal_weight_bits:
        eff = f", {report.effective_bits_quantized:.2f} stored bits/weight incl. scales" if report.effective_bits_quantized else ""
        lines.append(f"bits         {'/'.join(map(str, report.nominal_weight_bits))}{eff}")
    lines.append(
        f"size         {_human(report.size_on_disk)} on disk vs {_human(report.bf16_size)} in bf16 "
        f"({report.compression_vs_bf16:.2f}x smaller)"
    )
    if report.loader_summary:
        lines.append(f"packed       with import qvlm_modifiers: {report.loader_summary}")
    if all_modules:
        lines.append("modules:")
        width = max((len(m.name) for m in report.modules), default=0)
        for m in report.modules:
            runs = f"  -> {m.loader}" if m.loader else ""
            lines.append(f"  {m.name:<{width}}  {m.scheme}  [{m.format}, {'x'.join(map(str, m.weight_shape))}]{runs}")
    else:
        by_scheme: dict[str, list[str]] = defaultdict(list)
        for m in report.modules:
            by_scheme[m.scheme].append(m.name)
        for scheme, names in sorted(by_scheme.items()):
            shown = ", ".join(names[:3]) + (f", ... ({len(names) - 3} more)" if len(names) > 3 else "")
            lines.append(f"  {scheme}: {shown}")
        left = [m for m in report.modules if m.loader.startswith("transformers: ")]
        for m in left[:5]:
            lines.append(f"  not packed: {m.name} ({m.loader.split(': ', 1)[1]})")
        if len(left) > 5:
            lines.append(f"  not packed: ... ({len(left) - 5} more)")
        lines.append("  (--all lists every module)")
    if report.reload is not None:
        r = report.reload
        if r.get("error"):
            lines.append(f"reload       FAILED: {r['error']}")
        elif r["exact"] and r.get("loader") == "qvlm_modifiers":
            lines.append(
                f"reload       exact only with `import qvlm_modifiers` ({r['compared_tensors']} tensors bit-identical "
                f"after from_pretrained); plain transformers fails: {r['upstream_error'][:200]}"
            )
        elif r["exact"]:
            lines.append(f"reload       exact ({r['compared_tensors']} tensors bit-identical after from_pretrained)")
        else:
            detail = "; ".join(f"{k}: {', '.join(v[:5])}" for k, v in r.items() if isinstance(v, list) and v)
            lines.append(f"reload       NOT exact: {detail}")
    return "\n".join(lines)
