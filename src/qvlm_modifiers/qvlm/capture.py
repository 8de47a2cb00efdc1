"""Q-VLM's cached block inputs: each decoder layer's call arguments, replayed on the Modifier's own streams.

Eq. 3 compares a block's quantized path ``W_q X_q`` with its FP path ``W_r X_r``, and the search
runs the block once per candidate range. So the Modifier keeps the block input of both paths
(``X_q``, ``X_r``: one hidden-state tensor per calibration batch, on the offload device) and needs
to call each decoder layer again on them. A decoder layer's call has more arguments than the hidden
states (attention mask, position ids, rotary embeddings, cache flags...): a forward pre-hook
records them per layer and per batch (:func:`record_layer_call`), and :func:`layer_runner` replays
the layer on any hidden state with the arguments of the same batch.

Memory: the arguments go to the offload device, and tensors equal to the same argument of the
previous layer's call for that batch (masks and rotary embeddings are usually shared by all layers)
are stored once (:func:`offload_tree`).
"""

from __future__ import annotations

import torch
from compressed_tensors.utils import get_execution_device
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from qvlm_modifiers.qvlm.objective import LayerFn

__all__ = ["LayerCall", "split_hidden", "offload_tree", "record_layer_call", "layer_runner"]

# one recorded call: ("arg" | "kw": where the hidden states went), the other args, the other kwargs
LayerCall = tuple[str, tuple, dict]


def split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, str, tuple, dict]:
    """A decoder layer's call split into ``(hidden states, "arg" | "kw", other args, other kwargs)``:
    the hidden states are the first positional argument, or the ``hidden_states`` keyword."""
    if args:
        return args[0], "arg", tuple(args[1:]), dict(kwargs)
    rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
    return kwargs["hidden_states"], "kw", tuple(args), rest


def offload_tree(value, device: torch.device, reuse=None):
    """``value``'s tensors on ``device``; tensors equal to the same leaf of ``reuse`` (the previous
    layer's arguments of this batch: masks and rotary embeddings are usually shared by all layers)
    are not copied again."""
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
            out.append(leaf.detach().to(device))
    return tree_unflatten(out, spec)


def record_layer_call(
    calls: dict[int, list[LayerCall]], k: int, args: tuple, kwargs: dict, device: torch.device
) -> torch.Tensor:
    """Append decoder layer ``k``'s call (one calibration batch) to ``calls[k]``, sharing equal
    tensors with layer ``k - 1``'s call of the same batch; returns the call's hidden states."""
    hidden, mode, rest_args, rest_kwargs = split_hidden(args, kwargs)
    batch_index = len(calls[k])
    previous = calls.get(k - 1)
    shared = previous[batch_index] if previous and batch_index < len(previous) else None
    calls[k].append(
        (mode, offload_tree(rest_args, device, shared and shared[1]), offload_tree(rest_kwargs, device, shared and shared[2]))
    )
    return hidden


def layer_runner(layer: torch.nn.Module, calls: list[LayerCall]) -> LayerFn:
    """``run(hidden, batch_index)``: ``layer`` applied to ``hidden`` with the other arguments of
    its recorded call for that batch, on the layer's execution device; returns its hidden states."""

    def run(hidden: torch.Tensor, batch_index: int) -> torch.Tensor:
        device = get_execution_device(layer)
        mode, rest_args, rest_kwargs = calls[batch_index]
        to_dev = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
        rest_args, rest_kwargs = tree_map(to_dev, rest_args), tree_map(to_dev, rest_kwargs)
        hidden = hidden.to(device)
        out = layer(hidden, *rest_args, **rest_kwargs) if mode == "arg" else layer(*rest_args, hidden_states=hidden, **rest_kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    return run
