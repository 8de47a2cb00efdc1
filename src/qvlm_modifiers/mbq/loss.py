"""Modality-balanced reconstruction loss of MBQ (paper Eq. 16-17, normalised as the reference code does).

The paper's objective for one block is ``|g_v| * ||dY_v|| + |g_t| * ||dY_t||`` (Eq. 16 for the
scale search, Eq. 17 its MAE form), where ``dY = Y_fp - Y_q`` is the block-output error on vision
(``v``) and language (``t``) tokens and ``|g|`` the modality's mean gradient magnitude
(:mod:`qvlm_modifiers.mbq.sensitivity`). The reference code divides by ``|g_t|`` (text weight 1,
vision weight ``r = |g_v|/|g_t|``) and by a token count; the argmin over the scale grid is unchanged.

Token classes come from the calibration rows' ``loss_mask`` (built by :mod:`qvlm_modifiers.data`):
``0`` ignored (prompt, template, padding), ``1`` text (the labelled tokens: by default the whole
assistant turn, the reference's ``labels != -100``; answer only with ``text_mask="answer"``), ``2``
vision (image placeholder tokens).

Normalisations (``normalization``):

- ``"pooled"``: ``(w_t * S_t + w_v * S_v) / (C * (n_t + n_v))``: the reference's MAE mode
  (``auto_scale.py`` L164-183) and, with ``w_v = w_t = 1`` and every token counted as text, exactly
  llm-compressor AWQ's unmasked MSE.
- ``"per_modality"``: ``w_t * S_t / (C * n_t) + w_v * S_v / (C * n_v)``: the reference's MSE mode
  (``auto_scale.py`` L144-163); a modality without tokens contributes 0.
- ``"reference"``: ``pooled`` for MAE, ``per_modality`` for MSE (what the reference code does).

``S`` are sums of ``|dY|`` (MAE) or ``dY**2`` (MSE) over a modality's tokens and all ``C`` channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from qvlm_modifiers.modality import IGNORE, TEXT, VISION

__all__ = [
    "IGNORED_TOKEN",
    "TEXT_TOKEN",
    "VISION_TOKEN",
    "LossMode",
    "TextTokens",
    "Normalization",
    "ModalityErrorSums",
    "modality_token_masks",
    "modality_error_sums",
    "masked_error_sums",
    "modality_weighted_loss",
]

# the loss_mask classes, defined once in qvlm_modifiers.modality
IGNORED_TOKEN, TEXT_TOKEN, VISION_TOKEN = IGNORE, TEXT, VISION

LossMode = Literal["mae", "mse"]
TextTokens = Literal["answer", "all_text"]
Normalization = Literal["reference", "pooled", "per_modality"]


def modality_token_masks(
    loss_mask: torch.Tensor, text_tokens: TextTokens = "answer"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``(text, vision)`` token masks of a ``loss_mask`` (any shape, values 0/1/2).

    ``text_tokens="answer"`` counts only the labelled tokens (``loss_mask == 1``; the assistant turn
    with the data builder's default) as text, as the reference code does (``caption_mask = labels
    != -100``); ``"all_text"`` counts every non-vision position
    (prompt and template too; with the 1-sample collator there is no padding) -- the paper's
    "language tokens".
    """
    if text_tokens not in ("answer", "all_text"):
        raise ValueError(f"text_tokens must be 'answer' or 'all_text', got {text_tokens!r}")
    vision = loss_mask == VISION_TOKEN
    text = loss_mask == TEXT_TOKEN if text_tokens == "answer" else ~vision
    return text, vision


@dataclass
class ModalityErrorSums:
    """Per-modality error sums over tokens and channels, and token counts (summable over batches)."""

    text_sum: torch.Tensor
    text_tokens: torch.Tensor
    vision_sum: torch.Tensor
    vision_tokens: torch.Tensor
    channels: int

    def __add__(self, other: "ModalityErrorSums") -> "ModalityErrorSums":
        return ModalityErrorSums(
            self.text_sum + other.text_sum,
            self.text_tokens + other.text_tokens,
            self.vision_sum + other.vision_sum,
            self.vision_tokens + other.vision_tokens,
            self.channels,
        )

    def as_tensors(self) -> list[torch.Tensor]:
        return [self.text_sum, self.text_tokens, self.vision_sum, self.vision_tokens]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor], channels: int) -> "ModalityErrorSums":
        return cls(*tensors, channels=channels)


@torch.no_grad()
def modality_error_sums(
    reference: torch.Tensor,
    candidate: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_mode: LossMode = "mae",
    text_tokens: TextTokens = "answer",
) -> ModalityErrorSums:
    """Sums of the block-output error ``dY = reference - candidate`` per modality.

    :param reference: full-precision block output ``(batch, seq, channels)``
    :param candidate: output of the scaled-and-quantized block, same shape
    :param loss_mask: ``(batch, seq)`` token classes 0/1/2
    :param loss_mode: ``"mae"`` sums ``|dY|`` (Eq. 17), ``"mse"`` sums ``dY**2``
    """
    if reference.shape[:-1] != loss_mask.shape:
        raise ValueError(
            f"loss_mask shape {tuple(loss_mask.shape)} does not match the block output's tokens "
            f"{tuple(reference.shape[:-1])}"
        )
    text, vision = modality_token_masks(loss_mask.to(reference.device), text_tokens)
    return masked_error_sums(reference, candidate, text, vision, loss_mode)


@torch.no_grad()
def masked_error_sums(
    reference: torch.Tensor,
    candidate: torch.Tensor,
    text: torch.Tensor,
    vision: torch.Tensor,
    loss_mode: LossMode = "mae",
) -> ModalityErrorSums:
    """:func:`modality_error_sums` with precomputed boolean ``(batch, seq)`` text / vision masks."""
    if loss_mode not in ("mae", "mse"):
        raise ValueError(f"loss_mode must be 'mae' or 'mse', got {loss_mode!r}")
    diff = reference - candidate.to(reference.device)
    err = diff.abs() if loss_mode == "mae" else diff.pow(2)
    acc = torch.float32 if err.dtype in (torch.float16, torch.bfloat16) else err.dtype
    per_token = err.sum(dim=-1, dtype=acc)  # reduce channels first: the masks then index (B, S) only
    return ModalityErrorSums(
        text_sum=per_token[text].sum(),
        text_tokens=text.sum(),
        vision_sum=per_token[vision].sum(),
        vision_tokens=vision.sum(),
        channels=reference.shape[-1],
    )


def modality_weighted_loss(
    sums: ModalityErrorSums,
    vision_weight: float,
    text_weight: float = 1.0,
    loss_mode: LossMode = "mae",
    normalization: Normalization = "reference",
) -> torch.Tensor:
    """Eq. 16-17: ``text_weight * err_text + vision_weight * err_vision`` with the chosen normalisation.

    Returns a 0-dim tensor; ``nan`` when no token of either modality was seen (the caller must
    refuse such calibration data rather than pick a scale on nothing).
    """
    if normalization == "reference":
        normalization = "pooled" if loss_mode == "mae" else "per_modality"
    channels = sums.channels
    if normalization == "pooled":
        counted = (sums.text_tokens + sums.vision_tokens) * channels
        total = text_weight * sums.text_sum + vision_weight * sums.vision_sum
        return total / counted if counted > 0 else total.new_tensor(float("nan"))
    if normalization == "per_modality":
        if sums.text_tokens + sums.vision_tokens == 0:
            return sums.text_sum.new_tensor(float("nan"))
        loss = sums.text_sum.new_zeros(())
        if sums.text_tokens > 0:
            loss = loss + text_weight * sums.text_sum / (sums.text_tokens * channels)
        if sums.vision_tokens > 0:
            loss = loss + vision_weight * sums.vision_sum / (sums.vision_tokens * channels)
        return loss
    raise ValueError(
        f"normalization must be 'reference', 'pooled' or 'per_modality', got {normalization!r}"
    )
