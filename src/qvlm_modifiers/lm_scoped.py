"""AWQ and SmoothQuant restricted to a VLM's language model: ``LMAWQModifier``, ``LMSmoothQuantModifier``.

llm-compressor infers the smoothing mappings of AWQModifier / SmoothQuantModifier per
architecture as regexes such as ``re:.*input_layernorm$`` / ``re:.*q_proj$``. On a VLM these also
match inside the vision tower (CLIP/SigLIP have ``q_proj``/``k_proj``/``v_proj``, Qwen2.5-VL's ViT
has ``gate/up/down_proj``), which either breaks the grouping of ``match_modules_set`` or smooths
vision layers that the recipe keeps in bf16. Both Modifiers here anchor every mapping regex to
the family's decoder layers (``qvlm_modifiers.families``: ``model.language_model.layers.N.`` or
``model.text_model.layers.N.``) with a lookahead ``(?=<layers>\\.\\d+\\.)`` and leave the rest of
the pattern unchanged. Explicit ``mappings`` in a recipe are used as given.

- ``LMAWQModifier`` scopes llm-compressor's own AWQ mappings for the architecture
  (``get_layer_mappings_from_model``; Gemma 3 gets its q/k-norm-aware set) and carries
  :class:`~qvlm_modifiers.upstream.CPUSafeAWQMixin`, so it runs on CPU-only PyTorch. Like
  AWQModifier it is a transform: follow it with a QuantizationModifier/GPTQModifier.
- ``LMSmoothQuantModifier`` uses :func:`smoothquant_mappings`: ``input_layernorm -> q/k/v`` and
  the norm that really feeds the MLP -> ``gate/up``. That norm is ``post_attention_layernorm`` in
  Llama/Qwen2/Idefics3 layers but ``pre_feedforward_layernorm`` in Gemma 3, whose
  ``post_attention_layernorm`` normalizes the attention *output* before the residual add;
  llm-compressor 0.14 maps Gemma3ForConditionalGeneration to the default (post-attention) set,
  which would scale gate/up without the matching inverse scale.
"""

from __future__ import annotations

import re

from llmcompressor.core import State
from llmcompressor.modifiers.transform.awq import AWQModifier
from llmcompressor.modifiers.transform.awq.dynamic_mappings import get_layer_mappings_from_model
from llmcompressor.modifiers.transform.awq.mappings import AWQMapping
from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
from torch import nn

from qvlm_modifiers.upstream import CPUSafeAWQMixin
from qvlm_modifiers.families import decoder_layers, get_family

__all__ = [
    "LMAWQModifier",
    "LMSmoothQuantModifier",
    "scope_target",
    "scope_awq_mappings",
    "smoothquant_mappings",
]


def scope_target(target: str, layers_path: str) -> str:
    """``re:`` target restricted to modules under ``<layers_path>.<index>.``; exact names as is."""
    if target.startswith("re:"):
        return rf"re:(?={re.escape(layers_path)}\.\d+\.)" + target[3:]
    return target


def scope_awq_mappings(mappings: list[AWQMapping], layers_path: str) -> list[AWQMapping]:
    """Copies of AWQ ``mappings`` whose regexes only match under ``layers_path.<index>.``."""
    return [
        AWQMapping(
            smooth_layer=scope_target(m.smooth_layer, layers_path),
            balance_layers=[scope_target(b, layers_path) for b in m.balance_layers],
            activation_hook_target=m.activation_hook_target,
        )
        for m in mappings
    ]


def smoothquant_mappings(model: nn.Module) -> list[list]:
    """SmoothQuant mappings ``[[balance regexes], smooth regex]`` for the decoder layers of a
    supported VLM (see module docstring for the MLP norm choice)."""
    layers_path = get_family(model).layers
    first_layer = decoder_layers(model)[0]
    mlp_norm = (
        "pre_feedforward_layernorm"
        if hasattr(first_layer, "pre_feedforward_layernorm")
        else "post_attention_layernorm"
    )
    return [
        [
            [scope_target(rf"re:.*self_attn\.{p}_proj$", layers_path) for p in ("q", "k", "v")],
            scope_target(r"re:.*\.input_layernorm$", layers_path),
        ],
        [
            [scope_target(rf"re:.*mlp\.{p}_proj$", layers_path) for p in ("gate", "up")],
            scope_target(rf"re:.*\.{mlp_norm}$", layers_path),
        ],
    ]


class LMAWQModifier(CPUSafeAWQMixin, AWQModifier):
    """AWQ (Lin et al., MLSys 2024) on the language model's decoder layers of a supported VLM.

    Fields are AWQModifier's (``mappings``, ``offload_device``, ``duo_scaling``, ``n_grid``).
    With ``mappings`` unset, llm-compressor's mappings for the architecture are scoped to the
    family's decoder layers.
    """

    def on_initialize(self, state: State, **kwargs) -> bool:
        if self.mappings is None:
            layers_path = get_family(state.model).layers
            self.mappings = scope_awq_mappings(get_layer_mappings_from_model(state.model), layers_path)
        return super().on_initialize(state, **kwargs)


class LMSmoothQuantModifier(SmoothQuantModifier):
    """SmoothQuant (Xiao et al., ICML 2023) on the language model's decoder layers of a VLM.

    Fields are SmoothQuantModifier's (``smoothing_strength``, ``mappings``, ``ignore``, ...).
    With ``mappings`` unset, :func:`smoothquant_mappings` is used.
    """

    def _infer_mappings_from_model(self, model: nn.Module):
        if self.mappings is not None:
            return self.mappings
        return smoothquant_mappings(model)
