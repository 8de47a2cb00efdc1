"""Per-token modality labels (``loss_mask``) for calibration data that carries none.

MBQ weighs vision-token and text-token reconstruction error differently, so it must know which
token is which. Rows built by :func:`qvlm_modifiers.data.build_calibration_dataset` carry a
``loss_mask`` (:data:`IGNORE` 0, :data:`TEXT` 1, :data:`VISION` 2). Rows built the way
llm-compressor's VLM examples build them (the processor's output per row, maybe ``labels``) do not;
for those the labels are derived here, per row, from what the row holds:

- **vision**: the family's image placeholder tokens (``input_ids == image_token_id``; Qwen2/2.5-VL:
  ``mm_token_type_ids == 1``, which is what their M-RoPE reads);
- **text**: ``labels != -100`` when the row has labels (the MBQ reference's text tokens: the
  supervised assistant turn -- the same tokens :func:`qvlm_modifiers.data.build_calibration_dataset`
  labels 1 by default, ``text_mask="assistant_turn"``), otherwise every non-image token ("all-text");
- **ignored**: padding (``attention_mask == 0``) and, under the labels rule, unsupervised tokens.

A row with neither a vision nor a text token cannot be weighed and is refused, by its index, before
calibration starts.

How the labels reach the Modifiers: llm-compressor's pipelines hand Modifiers the per-batch labels in
``state.loss_masks`` only with ``oneshot(use_loss_mask=True)`` and only from a ``loss_mask`` column.
:class:`DerivedLossMasks` fills ``state.loss_masks`` for any other data, through public hooks only:
the labels of every dataset row are derived up front (keyed by the row's ``input_ids``), and a
forward pre-hook on the input embeddings -- every supported family embeds the batch's ``input_ids``
with them in its first subgraph, before any decoder layer runs -- stores the matching row's labels
at ``state.loss_masks[state.current_batch_idx]``. A batch whose ids match no dataset row (e.g. a
collator that truncates or pads to the batch) falls back to the ids alone (vision by image token,
padding by ``pad_token_id``, the rest text), with a warning.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

import numpy as np
import torch
from loguru import logger
from torch import nn

from qvlm_modifiers.errors import CalibrationDataError

__all__ = [
    "IGNORE",
    "TEXT",
    "VISION",
    "RULE_OWN",
    "RULE_LABELS",
    "RULE_ALL_TEXT",
    "derive_loss_mask",
    "batch_loss_mask",
    "DerivedLossMasks",
]

#: token classes of a ``loss_mask`` (the one definition; data, MBQ and Q-VLM import these)
IGNORE, TEXT, VISION = 0, 1, 2

RULE_OWN = "the rows' own loss_mask"
RULE_LABELS = "text = labels != -100 (the supervised turn, as the MBQ reference)"
RULE_ALL_TEXT = "text = every non-image, non-padding token (rows have no labels)"

_IGNORE_INDEX = -100


def _modality_ids(config: Any) -> tuple[int, bool]:
    """(image placeholder token id, whether ``mm_token_type_ids`` marks image tokens)."""
    from qvlm_modifiers.families import get_family, image_token_id

    return image_token_id(config), get_family(config).uses_mm_token_type_ids


def derive_loss_mask(
    input_ids: Any,
    config: Any,
    labels: Any = None,
    attention_mask: Any = None,
    mm_token_type_ids: Any = None,
) -> tuple[torch.Tensor, str]:
    """``loss_mask`` (same shape as ``input_ids``, int64) of one row or batch, and the text rule used.

    :param input_ids: token ids, ``(seq,)`` or ``(batch, seq)``
    :param config: the VLM's config (or model): gives the image token id of its family
    :param labels: optional; when given, text tokens are ``labels != -100``
    :param attention_mask: optional; 0 marks padding (ignored)
    :param mm_token_type_ids: optional (Qwen2/2.5-VL); 1 marks image tokens
    """
    ids = torch.as_tensor(input_ids)
    image_id, by_type_ids = _modality_ids(config)
    if by_type_ids and mm_token_type_ids is not None:
        vision = torch.as_tensor(mm_token_type_ids).reshape(ids.shape) == 1
    else:
        vision = ids == image_id
    if labels is not None:
        text = (torch.as_tensor(labels).reshape(ids.shape) != _IGNORE_INDEX) & ~vision
        rule = RULE_LABELS
    else:
        text = ~vision
        rule = RULE_ALL_TEXT
    mask = torch.full(ids.shape, IGNORE, dtype=torch.long)
    mask[text] = TEXT
    mask[vision] = VISION
    if attention_mask is not None:
        mask[torch.as_tensor(attention_mask).reshape(ids.shape) == 0] = IGNORE
    return mask, rule


def batch_loss_mask(batch: dict[str, Any], config: Any) -> tuple[torch.Tensor, str]:
    """The batch's own ``loss_mask``, or one derived from its ``input_ids``/``labels``/padding."""
    if batch.get("loss_mask") is not None:
        return torch.as_tensor(batch["loss_mask"]), RULE_OWN
    if "input_ids" not in batch:
        raise CalibrationDataError(
            "A calibration batch has neither 'loss_mask' nor 'input_ids', so image and text tokens cannot be "
            "told apart. Pass the processor's output (input_ids, pixel_values, ...) per row."
        )
    return derive_loss_mask(
        batch["input_ids"],
        config,
        labels=batch.get("labels"),
        attention_mask=batch.get("attention_mask"),
        mm_token_type_ids=batch.get("mm_token_type_ids"),
    )


def _row_key(ids: Any) -> bytes:
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1)).tobytes()


class DerivedLossMasks:
    """Fills ``state.loss_masks`` with each calibration batch's modality labels (see module docstring).

    Usage inside a Modifier: ``index_dataset`` in ``on_initialize`` (refuses bad rows before any
    work), ``attach`` in ``on_calibration_start``, ``detach`` in ``on_finalize``.
    """

    def __init__(self, model: nn.Module, owner: str):
        self.config = model.config
        self.owner = owner
        self.rules: Counter[str] = Counter()
        self._by_ids: dict[bytes, torch.Tensor] = {}
        self._pad_id = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
        if self._pad_id is None:
            self._pad_id = getattr(self.config, "pad_token_id", None)
        self._handle = None
        self._warned_fallback = False

    # ------------------------------------------------------------------ before calibration
    def index_dataset(self, rows: Iterable[dict[str, Any]] | Any) -> None:
        """Derive (or take) every row's labels, key them by ``input_ids``; refuse rows that have
        neither an image nor a text token, naming the row. ``rows``: a ``datasets.Dataset`` or any
        iterable of row dicts."""
        rows = _token_columns(rows)
        for index, row in enumerate(rows):
            if row.get("input_ids") is None:
                raise CalibrationDataError(
                    f"{self.owner}: calibration row {index} has no 'input_ids'. Pass the processor's output "
                    "per row (input_ids, pixel_values, ...)."
                )
            mask, rule = batch_loss_mask(row, self.config)
            mask = mask.reshape(-1)
            if not ((mask == VISION).any() or (mask == TEXT).any()):
                raise CalibrationDataError(
                    f"{self.owner}: calibration row {index} has neither image tokens (id "
                    f"{_modality_ids(self.config)[0]}) nor text tokens ({rule}), so its error cannot be "
                    "weighed. Give every row an image processed by this model's processor and some text "
                    "(for labels, at least one position != -100), or drop the row."
                )
            self.rules[rule] += 1
            self._by_ids.setdefault(_row_key(row["input_ids"]), mask)
        if not self.rules:
            raise CalibrationDataError(
                f"{self.owner}: the calibration dataset is empty. Pass at least one image-text row."
            )
        if set(self.rules) != {RULE_OWN}:
            described = "; ".join(f"{n} rows: {r}" for r, n in self.rules.items())
            logger.info(
                f"{self.owner}: calibration rows carry no loss_mask; modality labels derived per row. "
                f"vision = the image token (id {_modality_ids(self.config)[0]}); {described}"
            )

    # ------------------------------------------------------------------ during calibration
    def attach(self, model: nn.Module, state: Any) -> None:
        """Install the embedding pre-hook. Called at calibration start: a non-empty
        ``state.loss_masks`` then can only be left over from an earlier run (both llm-compressor
        pipelines set theirs at or after this point), so it is cleared."""
        if state.loss_masks:
            state.loss_masks = None
        if getattr(model, "_qvlm_derived_loss_masks", None) is not None:
            return  # another of our Modifiers in the same recipe already fills them
        self._handle = model.get_input_embeddings().register_forward_pre_hook(self._hook, with_kwargs=True)
        model._qvlm_derived_loss_masks = self
        self._model = model

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            if getattr(self._model, "_qvlm_derived_loss_masks", None) is self:
                del self._model._qvlm_derived_loss_masks

    def _hook(self, _module, args, kwargs):
        from llmcompressor.core import active_session

        ids = args[0] if args else kwargs.get("input")
        state = active_session().state
        index = getattr(state, "current_batch_idx", None)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or index is None or index < 0:
            return None  # e.g. the scalar image-token lookup some families make
        masks = state.loss_masks
        if masks is not None and index < len(masks) and masks[index] is not None:
            return None  # the batch brought its own loss_mask (oneshot(use_loss_mask=True))
        mask = torch.stack([self._row_mask(row) for row in ids.detach().cpu()])
        if masks is None:
            masks = state.loss_masks = []
        while len(masks) <= index:
            masks.append(None)
        masks[index] = mask
        return None

    def _row_mask(self, ids: torch.Tensor) -> torch.Tensor:
        found = self._by_ids.get(_row_key(ids))
        if found is not None:
            return found
        if not self._warned_fallback:
            self._warned_fallback = True
            logger.warning(
                f"{self.owner}: a calibration batch's input_ids match no dataset row (a collator that pads or "
                "truncates?); its labels come from the ids alone (text = every non-image, non-pad token). "
                "Use batch_size=1, or give the rows a loss_mask and pass use_loss_mask=True."
            )
        attention = None if self._pad_id is None else (ids != self._pad_id).long()
        return derive_loss_mask(ids, self.config, attention_mask=attention)[0]


_TOKEN_COLUMNS = ("input_ids", "labels", "attention_mask", "mm_token_type_ids", "loss_mask")


def _token_columns(rows: Any) -> Iterable[dict[str, Any]]:
    """Rows restricted to the token columns (a ``datasets.Dataset`` then skips decoding images)."""
    names = getattr(rows, "column_names", None)
    if names is not None and hasattr(rows, "select_columns"):
        return rows.select_columns([c for c in _TOKEN_COLUMNS if c in names])
    return rows
