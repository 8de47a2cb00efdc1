"""Other people's low-bit matmul kernels, timed side by side with ours in ``bench.py``.

Each ``make_<peer>`` takes one quantized Linear and returns a ``Peer``: ``fn(x) -> y`` computes
``x @ W.T`` with that peer's kernel, ``stored_bytes`` is what its weight format keeps in memory,
and ``w_ref`` (``[N, K]`` float32, or None for "ours") is the dense weight its output is checked
against. If the peer cannot run the case, it raises ``Unavailable``:
not installed, wrong device, or a bit width or group size it lacks. Where the format allows it,
the peers get *the same quantized weights* as ours:

- ``tinygemm``: PyTorch's built-in int4 kernel, ``torch.ops.aten._weight_int4pack_mm`` (CUDA; the
  ``_for_cpu`` variant on CPU, so the conversion is tested without a GPU). Its format is
  ``w = (q - 8) * scale + zero``, with the scale and zero in bf16, so ours maps exactly onto it
  apart from the bf16 rounding of ``zero = (8 - z) * s``. It takes bf16 activations, 4 bits, and
  groups of 32, 64, 128 or 256. W3 weights fit in its int4 container, but that would time W4, so
  it is not offered for W3.
- ``gemlite``: Mobius Labs' Triton kernels (``pip install gemlite``), ``W = (W_q - zeros) * scales``,
  when importable. Supports 1, 2, 4 and 8 bits, so not W3.
- ``marlin``: vLLM's GPTQ-Marlin kernel, when vLLM is importable. It quantizes the same dense
  weight itself (symmetric, 4 or 8 bits) with vLLM's own test helper, so its weights are not
  ours. Its error is printed against its own dequantized reference.

Nothing here is imported by the model path; a failing peer only prints ``unavailable``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .packing import PackedLayout

__all__ = ["Unavailable", "Peer", "PEERS", "make_peer", "tinygemm_operands"]


class Peer(NamedTuple):
    fn: Callable
    stored_bytes: int
    note: str
    w_ref: torch.Tensor | None = None


class Unavailable(RuntimeError):
    """This peer cannot run this case here (the reason is the message)."""


def _unsigned(tensors: tuple, layout: PackedLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unsigned integer weights ``[N, K]``, float32 scales ``[N, G]`` and zero points ``[N, G]``."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    wp, ws, wz = tensors
    b, n, k = layout.num_bits, layout.out_features, layout.in_features
    q = unpack_from_int32(wp, b, torch.Size((n, k))).to(torch.int32) + (1 << (b - 1))
    if wz is None:
        z = torch.full((n, layout.n_groups), 1 << (b - 1), dtype=torch.int32, device=wp.device)
    else:
        z = unpack_from_int32(wz, b, torch.Size((n, layout.n_groups)), packed_dim=0).to(torch.int32) + (1 << (b - 1))
    return q, ws.float(), z


def tinygemm_operands(tensors: tuple, layout: PackedLayout, inner_k_tiles: int = 8):
    """``(packed weight, scales_and_zeros [G, N, 2] bf16)`` for ``_weight_int4pack_mm`` (CUDA) or
    ``_weight_int4pack_mm_for_cpu``, holding our quantized weights."""
    if layout.num_bits != 4:
        raise Unavailable("tinygemm is int4 only")
    g = layout.group_size
    if g not in (32, 64, 128, 256):
        raise Unavailable(f"tinygemm needs group 32/64/128/256, not {g}")
    if layout.in_features % (inner_k_tiles * 16) or layout.out_features % 8:
        raise Unavailable("tinygemm needs K % (16 * inner_k_tiles) == 0 and N % 8 == 0")
    q, s, z = _unsigned(tensors, layout)
    sz = torch.stack([s.T, ((8 - z).float() * s).T], dim=-1).to(torch.bfloat16).contiguous()
    if q.is_cuda:
        q8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(q8, inner_k_tiles)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles)
    return packed, sz


def make_tinygemm(tensors, layout, w_dense, dtype, device):
    packed, sz = tinygemm_operands(tuple(t.to(device) if t is not None else None for t in tensors), layout)
    g = layout.group_size
    op = torch.ops.aten._weight_int4pack_mm if device.type == "cuda" else torch.ops.aten._weight_int4pack_mm_for_cpu

    def fn(x):
        return op(x.to(torch.bfloat16), packed, g, sz)

    stored = packed.numel() * packed.element_size() + sz.numel() * sz.element_size()
    return Peer(fn, stored, "bf16 activations")


def make_gemlite(tensors, layout, w_dense, dtype, device):
    if device.type != "cuda":
        raise Unavailable("gemlite needs CUDA")
    try:
        import gemlite.core as gl
    except ImportError as e:
        raise Unavailable(f"gemlite not importable ({e})") from None
    if layout.num_bits not in (1, 2, 4, 8):
        raise Unavailable(f"gemlite has no {layout.num_bits}-bit kernels")
    cls = getattr(gl, "GemLiteLinear", None) or getattr(gl, "GemLiteLinearTriton")
    gdt = gl.TORCH_TO_DTYPE[dtype]
    n, k = layout.out_features, layout.in_features
    group = layout.group_size or k
    layer = cls(layout.num_bits, group_size=group, in_features=k, out_features=n, input_dtype=gdt, output_dtype=gdt)
    q, s, z = _unsigned(tuple(t.to(device) if t is not None else None for t in tensors), layout)
    layer.pack(q.to(torch.uint8), s.to(dtype), z.to(dtype), None)
    stored = sum(t.numel() * t.element_size() for t in layer.buffers()) or (n * k * layout.num_bits // 8)
    return Peer(lambda x: layer(x), stored, f"gemlite {getattr(gl, '__version__', '')}".strip())


def make_marlin(tensors, layout, w_dense, dtype, device):
    if device.type != "cuda":
        raise Unavailable("Marlin needs CUDA")
    try:
        from vllm.model_executor.layers.quantization.utils import marlin_utils as mu
        from vllm.model_executor.layers.quantization.utils.marlin_utils_test import marlin_quantize
        from vllm.scalar_type import scalar_types
    except Exception as e:  # noqa: BLE001 (vLLM import errors vary)
        raise Unavailable(f"vLLM Marlin not importable ({type(e).__name__}: {str(e)[:80]})") from None
    if layout.num_bits not in (4, 8) or not layout.symmetric:
        raise Unavailable("GPTQ-Marlin: symmetric 4/8-bit only")
    qtype = scalar_types.uint4b8 if layout.num_bits == 4 else scalar_types.uint8b128
    n, k = layout.out_features, layout.in_features
    w_t = w_dense.to(device=device, dtype=dtype).T.contiguous()  # [K, N]
    w_ref, q_w, s, g_idx, sort_idx = marlin_quantize(w_t, qtype, layout.group_size or -1, False)[:5]
    make_ws = getattr(mu, "marlin_make_workspace_new", None)
    workspace = make_ws(device) if make_ws else mu.marlin_make_workspace(n, device)
    zp = mu.marlin_make_empty_g_idx(device)

    def fn(x):
        return mu.apply_gptq_marlin_linear(input=x, weight=q_w, weight_scale=s, weight_zp=zp, g_idx=g_idx,
                                           g_idx_sort_indices=sort_idx, workspace=workspace, wtype=qtype,
                                           output_size_per_partition=n, input_size_per_partition=k,
                                           is_k_full=True, bias=None)

    stored = q_w.numel() * q_w.element_size() + s.numel() * s.element_size()
    return Peer(fn, stored, "own quantization of the same weight", w_ref.float().T)


PEERS = {"tinygemm": make_tinygemm, "gemlite": make_gemlite, "marlin": make_marlin}


def make_peer(name: str, tensors: tuple, layout: PackedLayout, w_dense: torch.Tensor, dtype: torch.dtype,
              device: torch.device):
    """A ``Peer``, or raises ``Unavailable``. Errors of the peer's own code are
    turned into ``Unavailable`` too, with their message, since a peer is optional."""
    try:
        return PEERS[name](tensors, layout, w_dense, dtype, device)
    except Unavailable:
        raise
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"{type(e).__name__}: {str(e)[:160]}") from None
