"""Packed W3/W4 Triton kernels vs. plain-PyTorch references built on compressed-tensors' own
``pack_to_int32`` / ``unpack_from_int32`` / ``dequantize`` (no shared bit tricks).

Without a GPU the kernels run in the Triton interpreter (``TRITON_INTERPRET=1``, set below before
any kernel module is imported) on small shapes; on a CUDA machine the same tests run on the GPU.

Tolerance (first-order error bound, per output element; ``u`` = unit roundoff):
the reference is ``x @ W.T`` in float32 with the float32-exact dequantized ``W``. The kernel
(a) rounds each dequantized weight to the activation dtype (relative ``u_w``; 0 for per-channel,
whose small integers are exact), (b) accumulates in float32 (``<= K * 2**-24`` relative to
``|x| @ |W|.T``), (c) rounds the output (relative ``u_out``). Hence
``|y - ref| <= (u_w + K * 2**-24) * (|x| @ |W|.T) + u_out * |ref|``; we use one full ulp for ``u``
(2**-10 fp16, 2**-7 bf16) because the Triton interpreter's float32 -> bf16 conversion is not
round-to-nearest (measured: off by up to 1 ulp), then add a 1e-6 absolute floor.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must happen before triton.jit decorates our kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from qvlm_modifiers.kernels import dequant, dispatch, gemm, gemv_splitk  # noqa: E402
from qvlm_modifiers.kernels._unpack import dequant_tile, scale_and_zero  # noqa: E402
from qvlm_modifiers.kernels.packing import (  # noqa: E402
    PackedLayout,
    quantize_and_pack,
    reference_dequantize,
    reference_linear,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = torch.device("cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda")
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

# Covering design instead of the full product (the interpreter is slow): every
# (bits, group, symmetric) layout meets both activation dtypes, and M / N / K rotate so that each
# value of M in {1, 3, 16, 64}, N in {33, 96} (odd N exercises column masks and zero-point words
# that straddle int32 boundaries for 3-bit) and K in {128, 256, 384} occurs with W3 and W4,
# sym and asym, fp16 and bf16.
LAYOUTS = [(bits, group, sym) for bits in (4, 3) for group in (32, 64, 128, None) for sym in (True, False)]
CASES = []
for i, (bits, group, sym) in enumerate(LAYOUTS):
    for j, dtype in enumerate((torch.float16, torch.bfloat16)):
        m = (1, 3, 16, 64)[(i + 2 * j) % 4]
        n = (33, 96)[(i + j) % 2]
        k = (128, 256, 384)[(i + j) % 3]
        CASES.append((bits, group, sym, dtype, m, n, k))
# per-channel with K not a multiple of 32: the packed row ends inside a word
CASES += [(3, None, False, torch.bfloat16, 3, 33, 200), (4, None, True, torch.float16, 64, 33, 200)]


def _case_id(case):
    bits, group, sym, dtype, m, n, k = case
    return f"W{bits}-g{group or 'ch'}-{'sym' if sym else 'asym'}-{str(dtype)[6:]}-M{m}-N{n}-K{k}"


def _make(bits, group, sym, dtype, m, n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * 0.05
    packed, layout = quantize_and_pack(weight, bits, group, sym)
    x = torch.randn(m, k, generator=gen).to(dtype)
    tensors = (packed["weight_packed"], packed["weight_scale"], packed.get("weight_zero_point"))
    return x.to(DEVICE), tuple(t.to(DEVICE) if t is not None else None for t in tensors), layout, packed


def _bound(x, w_ref, ref, dtype, exact_weights):
    u = ULP[dtype]
    k = x.shape[-1]
    mag = x.float().abs() @ w_ref.abs().T
    return ((0.0 if exact_weights else u) + k * 2.0**-24) * mag + u * ref.float().abs() + 1e-6


def _check(y, x, tensors, layout, dtype, extra_weight_ulp=0.0):
    assert y.dtype == dtype and y.shape == (x.shape[0], layout.out_features)
    assert torch.isfinite(y).all()
    w_ref = reference_dequantize(*tensors, layout).to(DEVICE)
    ref = reference_linear(x, *tensors, layout).float()
    exact = layout.group_size is None and extra_weight_ulp == 0.0
    tol = _bound(x, w_ref, ref, dtype, exact) + extra_weight_ulp * (x.float().abs() @ w_ref.abs().T)
    err = (y.float() - ref).abs()
    assert (err <= tol).all(), f"max err {err.max().item():.3g}, worst err/tol {(err / tol).max().item():.3g}"
    # the bound must be tight enough to catch a real bug: a mis-read field changes a weight by at
    # least one scale step, far above tol
    assert tol.max() < 0.05 * ref.abs().max() + 1e-3


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_packed_linear_matches_reference(case):
    bits, group, sym, dtype, m, n, k = case
    x, tensors, layout, _ = _make(*case)
    y = dispatch.packed_linear(x, *tensors, layout)
    _check(y, x, tensors, layout, dtype)


@pytest.mark.parametrize("case", CASES[::3], ids=[_case_id(c) for c in CASES[::3]])
def test_packed_linear_matches_compressed_tensors_decompression(case):
    """Against compressed-tensors' own decompressor (``PackedQuantizationCompressor.decompress``),
    whose weights are rounded to the scale dtype (bf16): one extra bf16 ulp on the weights."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    bits, group, sym, dtype, m, n, k = case
    x, tensors, layout, packed = _make(*case)
    scheme = QuantizationScheme(targets=["Linear"], weights=layout.quantization_args())
    w_ct = PackedQuantizationCompressor.decompress(packed, scheme)["weight"]
    assert w_ct.dtype == torch.bfloat16
    # the reference dequantization agrees with compressed-tensors to bf16 rounding
    w_ref = reference_dequantize(*[t.cpu() if t is not None else None for t in tensors], layout)
    assert torch.equal(w_ref.to(torch.bfloat16), w_ct)
    y = dispatch.packed_linear(x, *tensors, layout)
    ref_ct = (x.float() @ w_ct.float().to(DEVICE).T)
    tol = _bound(x, w_ct.float().to(DEVICE), ref_ct, dtype, False) + ULP[torch.bfloat16] * (
        x.float().abs() @ w_ct.float().abs().to(DEVICE).T
    )
    assert ((y.float() - ref_ct).abs() <= tol).all()


@pytest.mark.parametrize("word_tile", [True, False])
@pytest.mark.parametrize("use_dot", [False, True])
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("bits", [3, 4])
def test_splitk_variants(bits, split_k, use_dot, word_tile):
    """Both inner products and both unpack variants of the decode kernel, and split-K with a
    partial last split (K=256 in 8 blocks of 32 -> splits of 3, 3, 2 blocks)."""
    case = (bits, 32, False, torch.float16, 1, 33, 256)
    x, tensors, layout, _ = _make(*case)
    y = gemv_splitk.splitk_linear(
        x, *tensors, layout, block_n=32, block_k=32, split_k=split_k, use_dot=use_dot, word_tile=word_tile
    )
    _check(y, x, tensors, layout, torch.float16)


@pytest.mark.parametrize("case", [(4, 64, False, torch.bfloat16, 16, 33, 128), (3, 32, True, torch.float16, 16, 96, 128)])
def test_prefill_paths_on_small_m(case):
    """The prefill GEMM (both unpack variants) and dequant+matmul also give the right answer at
    small M."""
    x, tensors, layout, _ = _make(*case)
    dtype = case[3]
    for word_tile in (True, False):
        y = gemm.gemm_linear(x, *tensors, layout, block_m=16, block_n=32, block_k=32, word_tile=word_tile)
        _check(y, x, tensors, layout, dtype)
    _check(dequant.dequant_linear(x, *tensors, layout), x, tensors, layout, dtype)


@pytest.mark.parametrize("layout_args", LAYOUTS, ids=[f"W{b}-g{g or 'ch'}-{'sym' if s else 'asym'}" for b, g, s in LAYOUTS])
def test_dequant_kernel_bitwise(layout_args):
    """The Triton dequantizer reads every field exactly as compressed-tensors' unpack does:
    fp16 output equals the float32 reference rounded to fp16 bit for bit (the interpreter's fp16
    conversion is round-to-nearest); bf16 within one ulp in the interpreter, exact on a GPU."""
    bits, group, sym = layout_args
    _, tensors, layout, _ = _make(bits, group, sym, torch.float16, 1, 33, 256)
    ref32 = reference_dequantize(*[t.cpu() if t is not None else None for t in tensors], layout)
    w16 = dequant.dequantize_packed(*tensors, layout, torch.float16).cpu()
    assert torch.equal(w16, ref32.to(torch.float16))
    wbf = dequant.dequantize_packed(*tensors, layout, torch.bfloat16).cpu()
    if INTERPRETED:
        assert ((wbf.float() - ref32).abs() <= ULP[torch.bfloat16] * ref32.abs()).all()
    else:
        assert torch.equal(wbf, ref32.to(torch.bfloat16))


@triton.jit
def _dequant_tile_probe(wq_ptr, s_ptr, z_ptr, w_ptr, N, K, KW, ZW,
                        stride_wn, stride_sn, stride_sg, stride_zw, stride_zg, stride_ok, stride_on,
                        BITS: tl.constexpr, GROUP_K: tl.constexpr, HAS_ZP: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, WORD_TILE: tl.constexpr):
    """Writes ``_unpack.dequant_tile``'s ``W^T`` tiles (what the GEMM kernels feed ``tl.dot``)
    to a dense ``[K, N]`` fp16 buffer."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    k = k0 + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    if GROUP_K == 0:
        g = 0
    else:
        g = k0 // GROUP_K
    s, z = scale_and_zero(s_ptr, z_ptr, offs_n, g, n_mask, ZW, stride_sn, stride_sg, stride_zw, stride_zg, BITS, HAS_ZP)
    w = dequant_tile(wq_ptr + offs_n * stride_wn, k0, K, KW, n_mask, s, z, tl.float16, BITS, BLOCK_K, BLOCK_N,
                     WORD_TILE, True)
    tl.store(w_ptr + k[:, None] * stride_ok + offs_n[None, :] * stride_on, w,
             mask=(k < K)[:, None] & n_mask[None, :])


@pytest.mark.parametrize("word_tile", [True, False])
@pytest.mark.parametrize("bits, group, sym, k", [(3, 64, False, 256), (3, None, True, 200), (4, 32, False, 128),
                                                 (3, 32, True, 96)])
def test_dequant_tile_bitwise(bits, group, sym, k, word_tile):
    """The shared per-tile dequantizer of the GEMM kernels (``_unpack.dequant_tile`` with
    ``scale_and_zero``), both unpack variants: every field of the tile, at every K offset (3-bit
    fields 10 and 21 of each 32-field pack straddle two words; K=200 ends the row inside a word;
    N=33 straddles zero-point words), equals compressed-tensors' unpack + dequantize in float32
    rounded to fp16, bit for bit (the interpreter's fp16 conversion is round-to-nearest)."""
    _, tensors, layout, _ = _make(bits, group, sym, torch.float16, 1, 33, k)
    wq, sc, zp = tensors
    zp = zp if zp is not None else sc  # dummy pointer when symmetric, as the launchers do
    out = torch.full((k, 33), float("nan"), dtype=torch.float16, device=DEVICE)
    block_k, block_n = 32, 16
    _dequant_tile_probe[(triton.cdiv(33, block_n), triton.cdiv(k, block_k))](
        wq, sc, zp, out, 33, k, wq.shape[1], zp.shape[0],
        wq.stride(0), sc.stride(0), sc.stride(1), zp.stride(0), zp.stride(1), out.stride(0), out.stride(1),
        BITS=bits, GROUP_K=group or 0, HAS_ZP=not sym, BLOCK_K=block_k, BLOCK_N=block_n, WORD_TILE=word_tile,
    )
    ref32 = reference_dequantize(*[t.cpu() if t is not None else None for t in tensors], layout)
    assert torch.equal(out.cpu(), ref32.T.to(torch.float16))


def test_batched_input_and_bias():
    """Leading batch dims are flattened, a non-contiguous input works, bias is added."""
    x, tensors, layout, _ = _make(4, 32, False, torch.float16, 6, 33, 128)
    x3 = x.reshape(2, 3, 128).transpose(0, 1)  # non-contiguous [3, 2, 128]
    bias = torch.randn(33, device=DEVICE).to(torch.float16)
    y = dispatch.packed_linear(x3, *tensors, layout, bias=bias)
    assert y.shape == (3, 2, 33)
    ref = reference_linear(x3.reshape(-1, 128), *tensors, layout, bias=bias).reshape(3, 2, 33)
    assert (y.float() - ref.float()).abs().max() < 0.02 * ref.float().abs().max()


def test_rejects_bad_input():
    x, tensors, layout, _ = _make(4, 32, True, torch.float16, 1, 33, 128)
    with pytest.raises(TypeError, match="fp16/bf16"):
        dispatch.packed_linear(x.float(), *tensors, layout)
    with pytest.raises(ValueError, match="in_features"):
        gemv_splitk.splitk_linear(x[:, :64], *tensors, layout)
    with pytest.raises(ValueError, match="group_size"):
        PackedLayout(33, 100, 4, 32, True)
    with pytest.raises(ValueError, match="num_bits"):
        PackedLayout(33, 128, 5, 32, True)


def test_bench_script_runs(capsys, tmp_path):
    """``kernels/bench.py`` keeps working: one tiny shape, decode and prefill M, every implementation
    (peers that cannot run here say why), and the end-to-end lines (bf16, packed, interleaved).
    (On CPU its timings mean nothing and it says so; nothing here checks speed.)"""
    from qvlm_modifiers.kernels import bench

    argv = ["--schemes", "w4g128", "--shapes", "128x96", "--ms", "1", "64", "--reps", "1", "--workdir", str(tmp_path),
            "--strict"]
    if DEVICE.type == "cuda":
        argv += ["--e2e", "off"]
    rows = bench.main(argv)
    out = capsys.readouterr().out
    by = {(r["m"], r["impl"]): r for r in rows}
    assert by[(1, "ours")]["path"].startswith("splitk") and by[(1, "il")]["path"].startswith("decode")
    assert by[(64, "ours")]["path"].split()[0] in ("gemm", "dequant")
    assert by[(64, "il")]["path"].split()[0] in ("dequant", "fused")
    for impl in ("fp16", "ct", "ours", "il", "tinygemm"):  # tinygemm: the _for_cpu op on CPU
        assert all(by[(m, impl)]["eager"] > 0 for m in (1, 64)), impl
    assert all(by[(m, i)]["rel_err"] < 2e-3 for m in (1, 64) for i in ("ours", "il"))
    assert by[(1, "tinygemm")]["rel_err"] < 2e-2  # its zero point is rounded to bf16
    if DEVICE.type == "cpu":
        assert "MEAN NOTHING" in out
        assert "gemlite  | unavailable" in out and "marlin   | unavailable" in out
        assert "e2e interleaved" in out and "(14 packed Linears" in out
        assert "interleaved tokens identical to the packed" in out


def test_kernels_compile_for_hopper():
    """The interpreter never runs Triton's GPU code generator: compile the real kernels for sm_90
    (Hopper) ahead of time down to a cubin with the ptxas Triton ships (no GPU needed), in a
    subprocess without TRITON_INTERPRET (see kernels/aot_check.py)."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "qvlm_modifiers.kernels.aot_check", "--quick"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ALL OK" in proc.stdout
    assert proc.stdout.count("OK  ") >= 8
