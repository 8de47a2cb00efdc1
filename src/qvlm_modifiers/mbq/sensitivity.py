"""Modality sensitivity of MBQ: how much more the loss reacts to text-token than to vision-token error.

Paper Sec. 3.2, Eq. 8-13: the first-order change of the loss from an output perturbation of a layer is
``sum_tokens g * dY``, so the loss weighs each modality's reconstruction error by its mean gradient
magnitude ``|g|``. The reference code (``pre_quant.py`` ``GradCacheHook`` L30-105, L265-305) measures
it as follows, and so does this module:

1. one forward + backward per calibration sample on the *unquantized* model, loss = the model's
   cross-entropy on the text tokens (labels = ``input_ids`` where ``loss_mask == 1``: the whole
   assistant turn with :func:`qvlm_modifiers.data.build_calibration_dataset`'s default, the
   reference's ``labels != -100``);
2. at each decoder layer's attention output projection (``o_proj``, kind ``"attn"``) and MLP down
   projection (``down_proj``, kind ``"mlp"``), ``g = dL/dY`` of the module *output*:
   ``g_v[n] = mean |g[vision tokens of sample n, :]|``, ``g_t[n] = mean |g[text tokens of n, :]|``
   (mean over all token x channel elements of that modality);
3. unweighted average over samples ``G_v = mean_n g_v[n]``, ``G_t = mean_n g_t[n]``; ratio
   ``r = G_v / G_t`` per layer and kind;
4. ``r[i] = max(r[i], median_j r[j])`` per kind (not in the paper; the reference's median floor).

``r_attn[i]`` weights vision tokens in layer i's ``input_layernorm -> q/k/v`` and ``v_proj -> o_proj``
searches, ``r_mlp[i]`` in ``post_attention_layernorm -> gate/up`` and ``up_proj -> down_proj``.

Departures, each explicit: samples lacking one modality are skipped for that modality (the reference
would average a NaN in); the median of an even count is the mean of the two middle values.

Diagnostics: the output gradient of the *last* labelled position is exactly 0 at every layer (no
later token carries loss), so a sample whose text tokens are only that position (a one-token
answer under ``text_mask="answer"``) has a text gradient of exactly 0, and such samples drag
``G_t`` towards 0 and the ratio up by orders of magnitude. The pass counts them and warns once
with the count (:attr:`ModalitySensitivity.zero_text_grad_samples`), and logs the per-layer
``G_v``, ``G_t`` and ratios as one table at INFO (:meth:`ModalitySensitivity.table`).

Memory (``checkpoint_layers=True``, the default): the backward is layer by layer. Each decoder
layer runs under non-reentrant :func:`torch.utils.checkpoint.checkpoint`, so the forward keeps only
every layer's *input* hidden states (plus the loss head's graph), and the backward recomputes one
layer at a time from its stored input, passes ``dL/dY`` through it (the ``o_proj`` / ``down_proj``
gradient hooks fire on the original graph, once per sample) and hands ``dL/dh`` to the layer
below. Alive at once: the ``L`` boundary states of one sample (``L x tokens x hidden`` elements, which
do grow with depth, but are one hidden vector per token and layer) and one layer's autograd
intermediates (attention probabilities, MLP activations: several times larger, and constant in
depth). ``checkpoint_layers=False`` is one plain backward through the whole model (every layer's
intermediates alive at once); both give the same gradients (the recomputed forward is the same
computation).
"""

from __future__ import annotations

import contextlib
import functools
import json
import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from loguru import logger
from torch import nn

from qvlm_modifiers.errors import CalibrationDataError, UnsupportedModelError
from qvlm_modifiers.mbq.loss import TEXT_TOKEN, TextTokens, modality_token_masks
from qvlm_modifiers.modality import batch_loss_mask

__all__ = [
    "SENSITIVITY_KINDS",
    "ModalitySensitivity",
    "sensitivity_taps",
    "modality_mean_abs_gradient",
    "sensitivity_ratios",
    "floor_at_median",
    "compute_modality_sensitivity",
]

SENSITIVITY_KINDS = ("attn", "mlp")

# Where the gradient is taken, per kind: the first submodule path that exists in a decoder layer.
_TAP_PATHS: dict[str, tuple[str, ...]] = {
    "attn": ("self_attn.o_proj", "attention.wo", "self_attn.out_proj", "attn.o_proj"),
    "mlp": ("mlp.down_proj", "feed_forward.w2", "mlp.fc2", "feed_forward.down_proj"),
}


@dataclass
class ModalitySensitivity:
    """Per-layer vision/text gradient statistics and the vision weights MBQ derives from them.

    :param ratios: ``{layer_idx: {"attn": r, "mlp": r}}``, median-floored if ``median_floored``:
        what :class:`~qvlm_modifiers.mbq.modifier.MBQModifier` uses as vision weights
    :param raw_ratios: the same before the median floor
    :param vision_grad: ``{layer_idx: {kind: G_v}}`` (mean |dL/dY| over vision tokens, sample-averaged)
    :param text_grad: ``{layer_idx: {kind: G_t}}``
    :param num_samples: samples that contributed
    :param zero_text_grad_samples: samples whose text-token gradient was exactly 0 at some tap
        (see the module docstring); 0 for sensitivities loaded from files written before this field
    """

    ratios: dict[int, dict[str, float]]
    raw_ratios: dict[int, dict[str, float]] = field(default_factory=dict)
    vision_grad: dict[int, dict[str, float]] = field(default_factory=dict)
    text_grad: dict[int, dict[str, float]] = field(default_factory=dict)
    num_samples: int = 0
    median_floored: bool = True
    zero_text_grad_samples: int = 0

    def table(self) -> str:
        """Per layer and kind: ``G_v``, ``G_t``, the raw and the used ratio, one line per layer."""
        lines = ["layer | attn G_v G_t raw -> used | mlp G_v G_t raw -> used"]
        for i in sorted(self.ratios):
            cells = []
            for kind in SENSITIVITY_KINDS:
                gv = self.vision_grad.get(i, {}).get(kind, float("nan"))
                gt = self.text_grad.get(i, {}).get(kind, float("nan"))
                raw = self.raw_ratios.get(i, {}).get(kind, float("nan"))
                cells.append(f"{gv:.3e} {gt:.3e} {raw:.4g} -> {self.ratios[i].get(kind, float('nan')):.4g}")
            lines.append(f"{i:5d} | " + " | ".join(cells))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def _str_keys(d):
            return {str(k): v for k, v in d.items()}

        return {
            "ratios": _str_keys(self.ratios),
            "raw_ratios": _str_keys(self.raw_ratios),
            "vision_grad": _str_keys(self.vision_grad),
            "text_grad": _str_keys(self.text_grad),
            "num_samples": self.num_samples,
            "median_floored": self.median_floored,
            "zero_text_grad_samples": self.zero_text_grad_samples,
        }

    def save(self, path: str | Path) -> Path:
        """Write JSON; ``MBQModifier(sensitivity=<path>)`` reads it (compute once, reuse in recipes)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModalitySensitivity":
        def _int_keys(d):
            return {int(k): {str(kk): float(vv) for kk, vv in v.items()} for k, v in (d or {}).items()}

        return cls(
            ratios=_int_keys(data["ratios"]),
            raw_ratios=_int_keys(data.get("raw_ratios")),
            vision_grad=_int_keys(data.get("vision_grad")),
            text_grad=_int_keys(data.get("text_grad")),
            num_samples=int(data.get("num_samples", 0)),
            median_floored=bool(data.get("median_floored", True)),
            zero_text_grad_samples=int(data.get("zero_text_grad_samples", 0)),
        )

    @classmethod
    def load(cls, path: str | Path) -> "ModalitySensitivity":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError) as err:
            raise CalibrationDataError(
                f"Cannot read MBQ sensitivities from {str(path)!r} ({err}). Pass the JSON file written "
                "by ModalitySensitivity.save / compute_modality_sensitivity(..., save_path=...), or a "
                "mapping {layer_idx: {'attn': r, 'mlp': r}}."
            ) from err


def sensitivity_taps(layers: Iterable[nn.Module]) -> dict[tuple[int, str], nn.Module]:
    """``{(layer_idx, kind): module}``: the output projections whose output gradient is measured."""
    taps: dict[tuple[int, str], nn.Module] = {}
    for idx, layer in enumerate(layers):
        for kind, paths in _TAP_PATHS.items():
            for path in paths:
                try:
                    taps[(idx, kind)] = layer.get_submodule(path)
                    break
                except AttributeError:
                    continue
            else:
                raise UnsupportedModelError(
                    f"Decoder layer {idx} ({type(layer).__name__}) has none of {paths} for the MBQ "
                    f"{kind!r} sensitivity. Pass a fixed vision_weight or precomputed sensitivities, or "
                    "add the module path to qvlm_modifiers.mbq.sensitivity._TAP_PATHS."
                )
    return taps


@torch.no_grad()
def modality_mean_abs_gradient(
    grad: torch.Tensor, loss_mask: torch.Tensor, text_tokens: TextTokens = "answer"
) -> list[tuple[float | None, float | None]]:
    """Per sample of a ``(batch, seq, channels)`` output gradient: ``(mean|g| vision, mean|g| text)``.

    The mean runs over all token x channel elements of the modality (reference ``GradCacheHook``);
    ``None`` where the sample has no token of that modality.
    """
    text, vision = modality_token_masks(loss_mask.to(grad.device), text_tokens)
    out = []
    for b in range(grad.shape[0]):
        g = grad[b].abs().float()
        gv = g[vision[b]].mean().item() if vision[b].any() else None
        gt = g[text[b]].mean().item() if text[b].any() else None
        out.append((gv, gt))
    return out


def sensitivity_ratios(
    vision_means: Mapping[Any, list[float]], text_means: Mapping[Any, list[float]]
) -> dict[Any, float]:
    """``r = mean_n(g_v[n]) / mean_n(g_t[n])`` per key (Eq. 13 divided by the text term)."""
    ratios = {}
    for key in vision_means:
        gv, gt = vision_means[key], text_means.get(key, [])
        if not gv or not gt:
            raise CalibrationDataError(
                f"No {'vision' if not gv else 'text'} tokens reached {key} in the sensitivity pass: "
                "calibration rows need image tokens (loss_mask == 2) and answer tokens (loss_mask == 1). "
                "Build them with qvlm_modifiers.data.build_calibration_dataset, or pass a fixed "
                "vision_weight."
            )
        mean_t = sum(gt) / len(gt)
        if mean_t == 0.0:
            raise CalibrationDataError(
                f"The text-token gradient at {key} is exactly zero, so the vision/text ratio is undefined. "
                "Check that answer tokens (loss_mask == 1) are followed by a next token, or pass a fixed "
                "vision_weight."
            )
        ratios[key] = (sum(gv) / len(gv)) / mean_t
    return ratios


def floor_at_median(ratios: Mapping[int, float]) -> dict[int, float]:
    """``r[i] = max(r[i], median_j r[j])`` (reference ``pre_quant.py`` L298-305, L352-360)."""
    med = statistics.median(ratios.values())
    return {i: max(r, med) for i, r in ratios.items()}


def _default_collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    try:  # the project's calibration collator, once it exists
        from qvlm_modifiers.data import collate_fn
    except ImportError:
        collate_fn = None
    if collate_fn is not None:
        return collate_fn(rows)
    if len(rows) != 1:
        raise CalibrationDataError("The MBQ sensitivity pass collates one row per batch; use batch size 1.")
    return {k: torch.as_tensor(v).unsqueeze(0) for k, v in rows[0].items()}


def _iter_batches(data: Any, collate_fn: Callable | None) -> Iterable[Mapping[str, Any]]:
    try:
        import datasets

        is_dataset = isinstance(data, datasets.Dataset)
    except ImportError:  # pragma: no cover
        is_dataset = False
    if is_dataset:
        collate = collate_fn or _default_collate
        return (collate([data[i]]) for i in range(len(data)))
    return data


def _model_device(model: nn.Module) -> torch.device:
    try:
        from compressed_tensors.utils import get_execution_device

        return get_execution_device(model)
    except Exception:  # pragma: no cover - fall back to the first parameter
        return next(model.parameters()).device


@contextlib.contextmanager
def layerwise_checkpointing(layers: Iterable[nn.Module]) -> Iterator[None]:
    """Run every layer's ``forward`` under non-reentrant :func:`torch.utils.checkpoint.checkpoint`
    while the context is open (the instance's current ``forward`` is wrapped, so offloading
    wrappers that patch ``forward`` keep working and also run on the recompute); restored after."""
    patched = []
    try:
        for layer in layers:
            had_own = "forward" in layer.__dict__
            previous = layer.__dict__.get("forward")
            layer.forward = functools.partial(torch.utils.checkpoint.checkpoint, layer.forward, use_reentrant=False)
            patched.append((layer, had_own, previous))
        yield
    finally:
        for layer, had_own, previous in reversed(patched):
            if had_own:
                layer.forward = previous
            else:
                del layer.forward


def compute_modality_sensitivity(
    model: nn.Module,
    data: Any,
    num_samples: int | None = None,
    text_tokens: TextTokens = "answer",
    median_floor: bool = True,
    layers: Iterable[nn.Module] | None = None,
    collate_fn: Callable | None = None,
    save_path: str | Path | None = None,
    checkpoint_layers: bool = True,
) -> ModalitySensitivity:
    """Run MBQ's gradient pass on an unquantized VLM and return per-layer vision weights.

    :param model: the full VLM (``*ForConditionalGeneration``); parameters are not changed and get no
        gradients (``requires_grad`` is restored afterwards); works with accelerate-offloaded models
    :param data: calibration rows with ``loss_mask`` (0 ignore, 1 answer text, 2 vision): a
        ``datasets.Dataset`` (collated one row at a time with ``collate_fn``), a DataLoader, or any
        iterable of batch dicts
    :param num_samples: use at most this many batches (default: all)
    :param text_tokens: which tokens are "text" in the gradient statistics (``"answer"``, the
        reference; or ``"all_text"``); the loss is always the answer-token cross-entropy
    :param median_floor: floor each layer's ratio at the median across layers (reference)
    :param layers: decoder layers to measure (default: the family's language-model layers)
    :param collate_fn: row collator for a ``datasets.Dataset`` (default: ``qvlm_modifiers.data.collate_fn``)
    :param save_path: also write the result as JSON there (reusable as ``MBQModifier(sensitivity=...)``)
    :param checkpoint_layers: backward one decoder layer at a time (recomputing it from its stored
        input), so that only one layer's autograd intermediates are alive (see the module
        docstring); ``False``: one backward through the whole model (same result, memory grows
        with every layer's intermediates)
    """
    if layers is None:
        from qvlm_modifiers.families import decoder_layers

        layers = decoder_layers(model)
    layers = list(layers)
    taps = sensitivity_taps(layers)
    vision_means: dict[tuple[int, str], list[float]] = {key: [] for key in taps}
    text_means: dict[tuple[int, str], list[float]] = {key: [] for key in taps}
    current_mask: dict[str, Any] = {}
    zero_text_samples: set[tuple[int, int]] = set()  # (batch, row)

    def make_tap(key):
        def forward_hook(_module, _args, output):
            out = output[0] if isinstance(output, tuple) else output
            if not out.requires_grad:
                return

            def grad_hook(grad):
                for row, (gv, gt) in enumerate(modality_mean_abs_gradient(grad, current_mask["mask"], text_tokens)):
                    if gv is not None:
                        vision_means[key].append(gv)
                    if gt is not None:
                        text_means[key].append(gt)
                        if gt == 0.0:
                            zero_text_samples.add((current_mask["sample"], row))

            out.register_hook(grad_hook)

        return forward_hook

    def embeddings_need_grad(_module, _args, output):
        # Parameters are frozen, so make the embeddings the leaf the backward pass starts from.
        return output.detach().requires_grad_(True)

    device = _model_device(model)
    grad_flags = {p: p.requires_grad for p in model.parameters()}
    handles = [m.register_forward_hook(make_tap(key)) for key, m in taps.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(embeddings_need_grad))
    n_used = 0
    checkpointing = functools.partial(layerwise_checkpointing, layers) if checkpoint_layers else contextlib.nullcontext
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        batches = _iter_batches(data, collate_fn)
        if num_samples is not None:
            batches = islice(batches, num_samples)
        for batch in batches:
            # the batch's own labels, or derived from its input_ids / labels (qvlm_modifiers.modality)
            loss_mask, _rule = batch_loss_mask(batch, model.config)
            if not (loss_mask == TEXT_TOKEN).any():
                logger.warning("MBQ sensitivity: skipping a sample without text tokens (loss_mask == 1)")
                continue
            inputs = {
                k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                for k, v in batch.items()
                if k not in ("loss_mask", "labels")
            }
            labels = torch.where(loss_mask == TEXT_TOKEN, inputs["input_ids"].cpu(), -100).to(device)
            current_mask["mask"], current_mask["sample"] = loss_mask, n_used
            with torch.enable_grad(), checkpointing():
                loss = model(**inputs, labels=labels, use_cache=False).loss
                loss.backward()
            n_used += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
    if n_used == 0:
        raise CalibrationDataError(
            "The MBQ sensitivity pass saw no usable sample (none had answer tokens, loss_mask == 1). "
            "Pass calibration rows with an answer, or a fixed vision_weight."
        )

    raw = sensitivity_ratios(vision_means, text_means)
    n_layers = 1 + max(i for i, _ in taps)
    ratios: dict[int, dict[str, float]] = {i: {} for i in range(n_layers)}
    raw_by_layer: dict[int, dict[str, float]] = {i: {} for i in range(n_layers)}
    for kind in SENSITIVITY_KINDS:
        per_layer = {i: raw[(i, kind)] for i in range(n_layers)}
        floored = floor_at_median(per_layer) if median_floor else per_layer
        for i in range(n_layers):
            ratios[i][kind] = floored[i]
            raw_by_layer[i][kind] = per_layer[i]

    def _avg(d):
        return {i: {k: sum(d[(i, k)]) / len(d[(i, k)]) for k in SENSITIVITY_KINDS} for i in range(n_layers)}

    result = ModalitySensitivity(
        ratios=ratios,
        raw_ratios=raw_by_layer,
        vision_grad=_avg(vision_means),
        text_grad=_avg(text_means),
        num_samples=n_used,
        median_floored=median_floor,
        zero_text_grad_samples=len(zero_text_samples),
    )
    if zero_text_samples:
        logger.warning(
            f"MBQ sensitivity: {len(zero_text_samples)} calibration rows ({n_used} batches) give a text-token "
            "gradient of exactly 0 (their text tokens are only the last labelled position, whose output gradient is 0); "
            "they pull the text gradient towards 0 and the vision/text ratios up. Label the whole assistant "
            "turn (build_calibration_dataset(text_mask='assistant_turn'), the default) and calibrate on "
            "longer answers/captions."
        )
    logger.info(f"MBQ sensitivity over {n_used} samples (G = mean |dL/dY|):\n{result.table()}")
    if save_path is not None:
        result.save(save_path)
    return result
