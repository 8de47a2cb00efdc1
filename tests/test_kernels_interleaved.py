"""The interleaved kernel layout (``kernels/interleaved.py``) and its kernels, against
compressed-tensors' own ``unpack_from_int32`` / ``dequantize`` / ``PackedQuantizationCompressor``.

The repack tests are plain PyTorch and bit-exact. The kernel tests run in the Triton interpreter
(``TRITON_INTERPRET=1``, set before any kernel module is imported) on small shapes, or on the GPU
when there is one. Their error bound is ``tests/test_kernels.py``'s, without the weight-rounding
term, because these kernels multiply the exact ``q - z`` and apply the scale in float32.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must happen before triton.jit decorates our kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from qvlm_modifiers.kernels import il_decode, il_dispatch, il_prefill, interleaved, launch  # noqa: E402
from qvlm_modifiers.kernels.interleaved import KP, InterleavedLayout, repack  # noqa: E402
from qvlm_modifiers.kernels.packing import PackedLayout, quantize_and_pack, reference_dequantize  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = torch.device("cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda")
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _make(bits, group, sym, n, k, m=1, dtype=torch.float16, seed=0, tile_n=32):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * 0.05
    packed, layout = quantize_and_pack(weight, bits, group, sym)
    tensors = (packed["weight_packed"], packed["weight_scale"], packed.get("weight_zero_point"))
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    iw = repack(*tensors, layout, tile_n=tile_n).to(DEVICE)
    return x, iw, tensors, layout, packed


# ----------------------------------------------------------------------------- repack (plain PyTorch)
REPACK_CASES = [(bits, group, sym, n, k)
                for bits in (3, 4, 2, 8) for group in (32, 64, 128, None) for sym in (True, False)
                for n, k in ((33, 128), (70, 1024), (5, 256))]
# ragged K per channel (the row ends inside a word and inside a pack), K > one pack, N below one tile
REPACK_CASES += [(b, None, s, n, k) for b in (3, 4) for s in (True, False) for n, k in ((33, 200), (7, 1000), (40, 1544))]
REPACK_CASES += [(3, 512, False, 64, 1536), (4, 256, True, 96, 1536), (3, 16, False, 17, 64)]


@pytest.mark.parametrize("bits, group, sym, n, k", REPACK_CASES)
def test_repack_is_bit_exact_against_compressed_tensors(bits, group, sym, n, k):
    """The interleaved layout holds exactly compressed-tensors' integers, scales and zero points:
    ``reference_unpack`` == ``unpack_from_int32`` (+ offset), ``reference_dequantize`` ==
    packing.reference_dequantize (compressed-tensors' ``dequantize``) bit for bit in float32, and
    ``unrepack`` gives back the checkpoint tensors bit for bit."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    _, iw, tensors, layout, packed = _make(bits, group, sym, n, k, tile_n=16 if n < 20 else 32)
    iw = iw.to("cpu")
    q_ct = unpack_from_int32(tensors[0], bits, torch.Size((n, k))).to(torch.int32) + (1 << (bits - 1))
    assert torch.equal(interleaved.reference_unpack(iw), q_ct)
    assert torch.equal(interleaved.reference_dequantize(iw), reference_dequantize(*tensors, layout))
    back = interleaved.unrepack(iw)
    assert set(back) == set(packed)
    for name, t in packed.items():
        assert torch.equal(back[name], t), name


@pytest.mark.parametrize("bits, group, sym", [(4, 128, False), (3, 128, True), (3, 64, False), (4, None, True)])
def test_repack_matches_compressed_tensors_decompressor(bits, group, sym):
    """Against ``PackedQuantizationCompressor.decompress`` (bf16 weights): equal after rounding."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    _, iw, _, layout, packed = _make(bits, group, sym, 48, 512)
    scheme = QuantizationScheme(targets=["Linear"], weights=layout.quantization_args())
    w_ct = PackedQuantizationCompressor.decompress(packed, scheme)["weight"]
    assert torch.equal(interleaved.reference_dequantize(iw.to("cpu"), torch.bfloat16), w_ct)


@pytest.mark.parametrize("bits", [3, 4])
def test_every_field_sits_in_fixed_bits_of_one_word(bits):
    """No field straddles words: setting one weight to its maximum changes exactly one word per
    part (4 bits: one word, 4 bits set; 3 bits: 2 bits of a low slab + 1 bit of the high slab)."""
    n, k = 16, KP
    layout = PackedLayout(n, k, bits, None, True)
    scale = torch.ones(n, 1, dtype=torch.bfloat16)
    for row, col in ((0, 0), (3, 10), (15, 21), (7, 511), (9, 256 + 16 * 5 + 3)):
        q = torch.zeros(n, k, dtype=torch.int32)
        q[row, col] = (1 << bits) - 1
        iw = repack(interleaved._pack_stream(q, bits), scale, None, layout, tile_n=16)
        words = iw.qweight.flatten().to(torch.int64) & 0xFFFFFFFF
        changed = words.nonzero().flatten()
        bits_set = [bin(int(words[i])).count("1") for i in changed]
        assert sorted(bits_set) == ([1, 2] if bits == 3 else [4]), (row, col, bits_set)
        assert torch.equal(interleaved.reference_unpack(iw), q)


def test_layout_geometry_and_memory():
    """qweight is int32 [tiles, packs, BITS, tile_n, 16], contiguous, b/8 bytes per weight
    without padding; padding only rounds N up to tile_n and K up to 512."""
    _, iw, _, _, _ = _make(3, 128, False, 64, 1024)
    il = iw.layout
    assert iw.qweight.dtype == torch.int32 and iw.qweight.is_contiguous()
    assert tuple(iw.qweight.shape) == il.qweight_shape == (2, 2, 3, 32, 16)
    assert iw.qweight.numel() * 4 == 64 * 1024 * 3 // 8
    assert iw.scales.shape == (8, 64) and iw.zeros.dtype == torch.uint8 and iw.zeros.shape == (8, 64)
    il2 = InterleavedLayout(PackedLayout(11008, 4096, 4, 128, True))
    assert (il2.n_pad, il2.k_pad) == (11008, 4096)
    il3 = InterleavedLayout(PackedLayout(4096, 11008, 4, 128, True))
    assert il3.k_pad == 11264  # 2.3% padding


def test_unsupported_layouts_are_refused():
    assert not interleaved.supports(PackedLayout(64, 1024, 4, 1024, True))  # group larger than a pack
    assert not interleaved.supports(PackedLayout(64, 960, 4, 96, True))  # group not dividing 512
    assert not interleaved.supports(PackedLayout(64, 1024, 4, 128, True), tile_n=24)
    with pytest.raises(ValueError, match="group_size"):
        InterleavedLayout(PackedLayout(64, 960, 4, 96, True))


# ----------------------------------------------------------------------------- kernels
def _check(y, x, iw):
    """|y - ref| <= (K 2^-24) |x||W| + u_out |ref| + 1e-6 (exact weights, float32 sums, one output rounding)."""
    w_ref = interleaved.reference_dequantize(iw.to("cpu")).to(DEVICE)
    ref = x.float() @ w_ref.T
    assert y.dtype == x.dtype and y.shape == ref.shape and torch.isfinite(y).all()
    tol = (x.shape[1] * 2.0**-24) * (x.float().abs() @ w_ref.abs().T) + ULP[x.dtype] * ref.abs() + 1e-6
    err = (y.float() - ref).abs()
    assert (err <= tol).all(), f"max err {err.max().item():.3g}, worst err/tol {(err / tol).max().item():.3g}"


# (bits, group, sym, dtype, M, N, K, config): every layout meets GEMV and tl.dot, split-K 1 and > 1
DECODE_CASES = [
    (4, 128, True, torch.float16, 1, 33, 256, dict()),
    (4, 128, False, torch.bfloat16, 1, 70, 1024, dict(split_k=2)),
    (4, 32, True, torch.bfloat16, 16, 64, 1024, dict(use_dot=True, block_m=16, split_k=2, block_n=64)),
    (4, 64, False, torch.float16, 3, 33, 512, dict(use_dot=True, block_m=16)),
    (4, None, False, torch.float16, 3, 33, 200, dict(use_dot=True, block_m=16)),
    (4, None, True, torch.bfloat16, 1, 40, 1544, dict(split_k=3)),
    (3, 128, True, torch.bfloat16, 1, 96, 1024, dict(split_k=2)),
    (3, 128, False, torch.float16, 5, 33, 512, dict(use_dot=True, block_m=16)),
    (3, 64, False, torch.bfloat16, 1, 70, 1024, dict(split_k=2)),
    (3, 32, True, torch.bfloat16, 16, 128, 1024, dict(use_dot=True, block_m=16, split_k=2, block_n=64)),
    (3, None, True, torch.float16, 2, 33, 600, dict(split_k=2)),
    (3, None, False, torch.bfloat16, 1, 33, 200, dict()),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=[
    f"W{b}-g{g or 'ch'}-{'sym' if s else 'asym'}-{str(d)[6:]}-M{m}-N{n}-K{k}-{'dot' if c.get('use_dot') else 'gemv'}"
    f"-split{c.get('split_k', 1)}" for b, g, s, d, m, n, k, c in DECODE_CASES])
def test_decode_kernel_matches_reference(case):
    bits, group, sym, dtype, m, n, k, cfg = case
    x, iw, _, _, _ = _make(bits, group, sym, n, k, m=m, dtype=dtype)
    _check(il_decode.il_linear(x, iw, **cfg), x, iw)


def test_split_k_reduction_is_deterministic_and_resets_its_counters():
    """The last split of a tile sums the partials in split order, so every call gives the same
    bits, and the tile counters are back at zero after each launch."""
    x, iw, _, _, _ = _make(4, 128, False, 64, 1536, m=2, dtype=torch.float16)
    launch.scratch.clear()
    ys = [il_decode.il_linear(x, iw, use_dot=True, block_m=16, split_k=3) for _ in range(2)]
    assert torch.equal(ys[0], ys[1])
    assert int(launch.scratch.counters(x.device, 1).abs().sum()) == 0
    _check(ys[0], x, iw)
    y1 = il_decode.il_linear(x, iw, use_dot=True, block_m=16, split_k=1)
    assert (y1.float() - ys[0].float()).abs().max() <= 2 * ULP[torch.float16] * y1.float().abs().max()


@pytest.mark.parametrize("bits, group, sym, k", [(3, 64, False, 1024), (4, None, True, 200), (3, None, False, 600),
                                                 (4, 32, False, 512)])
def test_dequant_kernel_bitwise(bits, group, sym, k):
    """``dequantize_il`` == compressed-tensors' unpack + dequantize in float32, rounded to fp16,
    bit for bit (bf16: within one ulp in the interpreter, whose bf16 rounding is not RTN)."""
    _, iw, tensors, layout, _ = _make(bits, group, sym, 40, k)
    ref32 = reference_dequantize(*tensors, layout)
    assert torch.equal(il_prefill.dequantize_il(iw, torch.float16).cpu(), ref32.to(torch.float16))
    wbf = il_prefill.dequantize_il(iw, torch.bfloat16).cpu()
    if INTERPRETED:
        assert ((wbf.float() - ref32).abs() <= ULP[torch.bfloat16] * ref32.abs()).all()
    else:
        assert torch.equal(wbf, ref32.to(torch.bfloat16))


def test_prefill_path_reuses_one_buffer():
    """M > 16 goes through dequantize + matmul in the shared buffer: right answers for two layers
    of different shapes, and the second call allocates no new buffer."""
    launch.scratch.clear()
    x1, iw1, _, _, _ = _make(4, 128, True, 64, 512, m=20)
    x2, iw2, _, _, _ = _make(3, 64, False, 40, 512, m=33, dtype=torch.bfloat16, seed=1)
    assert il_dispatch.choose(x1, iw1)[0] == "dequant"
    y1 = il_dispatch.interleaved_linear(x1, iw1)
    buf = launch.scratch.dense(DEVICE, torch.float16, 1)
    y1b = il_dispatch.interleaved_linear(x1, iw1)
    assert launch.scratch.dense(DEVICE, torch.float16, 1).data_ptr() == buf.data_ptr()
    assert torch.equal(y1, y1b)
    tol = 2 * ULP[torch.float16] * (x1.float().abs() @ interleaved.reference_dequantize(iw1.to("cpu")).abs().T.to(DEVICE))
    assert ((y1.float() - interleaved.reference_linear(x1, iw1).float()).abs() <= tol + 1e-3).all()
    y2 = il_prefill.prefill_linear(x2, iw2)
    ref2 = x2.float() @ interleaved.reference_dequantize(iw2.to("cpu")).to(DEVICE).T
    assert (y2.float() - ref2).abs().max() <= 0.02 * ref2.abs().max()


def test_fused_path_at_large_m():
    """The single-launch kernel with 64-row tiles (the dispatcher's other prefill candidate)."""
    x, iw, _, _, _ = _make(3, 128, True, 64, 512, m=70)
    _check(il_decode.il_linear(x, iw, use_dot=True, block_m=64, block_n=64), x, iw)


def test_interleaved_linear_batched_input_and_bias():
    x, iw, _, _, _ = _make(4, 64, False, 33, 512, m=6)
    x3 = x.reshape(2, 3, 512).transpose(0, 1)  # non-contiguous [3, 2, 512]
    bias = torch.randn(33, device=DEVICE).to(torch.float16)
    y = il_dispatch.interleaved_linear(x3, iw, bias=bias)
    assert y.shape == (3, 2, 33)
    ref = interleaved.reference_linear(x3.reshape(-1, 512), iw.to("cpu"), bias=bias.cpu()).reshape(3, 2, 33)
    assert (y.float().cpu() - ref.float()).abs().max() < 0.02 * ref.float().abs().max()
    with pytest.raises(TypeError, match="fp16/bf16"):
        il_dispatch.interleaved_linear(x.float(), iw)
    with pytest.raises(ValueError, match="block_n"):
        il_decode.il_linear(x, iw, block_n=48)


def test_specialization_key_tracks_what_triton_specializes():
    t = torch.zeros(64, dtype=torch.float16)
    assert launch.specialization_key((t, 1, 32, 7)) != launch.specialization_key((t, 2, 32, 7))  # == 1
    assert launch.specialization_key((t, 2, 32, 7)) != launch.specialization_key((t, 2, 33, 7))  # % 16
    assert launch.specialization_key((t, 2, 32, 7)) == launch.specialization_key((t, 3, 48, 9))
    assert launch.specialization_key((t,)) != launch.specialization_key((t[1:],))  # 16-byte alignment
    assert launch.specialization_key((t,)) != launch.specialization_key((t.float(),))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="direct launches need a compiled kernel (GPU)")
def test_direct_launch_matches_jit_launch_and_graph_capture():
    """On a GPU: the direct ``CompiledKernel.run`` call gives the JIT launcher's bits, the decode
    call can be captured in a CUDA graph, and the replay gives the same bits."""
    x, iw, _, _, _ = _make(4, 128, True, 4096, 4096, m=1, dtype=torch.float16)
    launch.FAST_LAUNCH_OK["enabled"] = False
    y_jit = il_decode.il_linear(x, iw, split_k=4)
    launch.FAST_LAUNCH_OK["enabled"] = launch._triton_has_knobs()
    il_decode.il_linear(x, iw, split_k=4)  # compiles (JIT path) and caches
    before = launch.FAST_LAUNCH_OK["direct_calls"]
    y_fast = il_decode.il_linear(x, iw, split_k=4)
    assert torch.equal(y_fast, y_jit)
    if launch._triton_has_knobs():
        assert launch.FAST_LAUNCH_OK["direct_calls"] == before + 1, launch.FAST_LAUNCH_OK
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y_graph = il_decode.il_linear(x, iw, split_k=4)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_graph, y_jit)
    _check(y_jit, x, iw)


def test_direct_launch_logic(monkeypatch):
    """``launch.launch`` without a GPU, on a stand-in kernel: the first call per specialization key
    goes through ``kernel[grid]``, later ones call ``CompiledKernel.run`` with every argument in
    signature order, a new key compiles again, and a failing direct call falls back for good."""
    class Compiled:
        function, packed_metadata = "fn", "meta"

        def __init__(self):
            self.calls = []

        def launch_metadata(self, grid, stream, *args):
            return None

        def run(self, *a):
            self.calls.append(a)

    class Kernel:
        arg_names = ["x", "n", "BITS", "SPLIT"]

        def __init__(self):
            self.jit_calls = 0

        def __getitem__(self, grid):
            def call(*args, **kw):
                self.jit_calls += 1
                return self.compiled
            return call

    kernel = Kernel()
    kernel.compiled = Compiled()
    monkeypatch.setattr(launch, "_on_cuda", lambda args: True)
    monkeypatch.setattr(launch, "_stream", lambda device: 7)
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    monkeypatch.setattr(launch, "_hooks", lambda: (None, None))
    monkeypatch.setitem(launch.FAST_LAUNCH_OK, "enabled", True)
    monkeypatch.setitem(launch.FAST_LAUNCH_OK, "error", None)
    launch._COMPILED.clear()
    x = torch.zeros(8)
    for _ in range(3):
        launch.launch(kernel, (4, 2), (x, 32), dict(SPLIT=True, BITS=4))  # constexprs in any order
    assert kernel.jit_calls == 1 and len(kernel.compiled.calls) == 2
    assert kernel.compiled.calls[0] == (4, 2, 1, 7, "fn", "meta", None, None, None, x, 32, 4, True)
    launch.launch(kernel, (4, 2), (x, 33), dict(SPLIT=True, BITS=4))  # 33: not divisible by 16 -> new key
    assert kernel.jit_calls == 2
    kernel.compiled.run = lambda *a: (_ for _ in ()).throw(TypeError("other launcher signature"))
    launch.launch(kernel, (4, 2), (x, 32), dict(SPLIT=True, BITS=4))
    assert kernel.jit_calls == 3 and not launch.FAST_LAUNCH_OK["enabled"] and "TypeError" in launch.FAST_LAUNCH_OK["error"]
    launch._COMPILED.clear()
