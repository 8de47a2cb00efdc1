"""Compile the packed kernels ahead of time for a GPU architecture, without a GPU.

    python -m qvlm_modifiers.kernels.aot_check            # all variants, sm_90 (Hopper)
    python -m qvlm_modifiers.kernels.aot_check --quick    # a representative subset (CI)
    python -m qvlm_modifiers.kernels.aot_check --arch 80  # Ampere

The Triton interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute but never runs
Triton's GPU code generator; this lowers each kernel through TTIR/TTGIR/LLVM/PTX down to a cubin
with the ``ptxas`` Triton ships, so code-generation errors show up on machines without a GPU.
Must run without ``TRITON_INTERPRET`` set (the kernels must be real ``JITFunction``s).
"""

from __future__ import annotations

import argparse
import os
import sys

SPLITK_SIG = {
    "x_ptr": "*{act}", "wq_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*i32", "out_ptr": "*fp32",
    "M": "i32", "N": "i32", "K": "i32", "KW": "i32", "ZW": "i32", "K_PER_SPLIT": "i32",
    "stride_xm": "i32", "stride_xk": "i32", "stride_wn": "i32", "stride_sn": "i32", "stride_sg": "i32",
    "stride_zw": "i32", "stride_zg": "i32", "stride_os": "i32", "stride_om": "i32", "stride_on": "i32",
}
GEMM_SIG = {
    "x_ptr": "*{act}", "wq_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*i32", "y_ptr": "*{act}",
    "M": "i32", "N": "i32", "K": "i32", "KW": "i32", "ZW": "i32",
    "stride_xm": "i32", "stride_xk": "i32", "stride_wn": "i32", "stride_sn": "i32", "stride_sg": "i32",
    "stride_zw": "i32", "stride_zg": "i32", "stride_ym": "i32", "stride_yn": "i32",
}
IL_SIG = {  # il_decode._il_matmul_kernel
    "x_ptr": "*{act}", "qw_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*u8", "y_ptr": "*{act}", "part_ptr": "*fp32",
    "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "N_PAD": "i32", "N_PACKS": "i32", "PACKS_PER_SPLIT": "i32",
    "SPLIT_K": "i32", "stride_xm": "i32", "stride_ym": "i32",
}
IL_DEQUANT_SIG = {  # il_prefill._il_dequant_kernel
    "qw_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*u8", "w_ptr": "*{act}", "N": "i32", "K": "i32", "N_PAD": "i32",
    "N_PACKS": "i32", "stride_wn": "i32",
}
# what the JIT launcher marks divisible by 16 for a 7B-shaped call (K = 4096): all pointers, and these ints
IL_DIVISIBLE = ("*", "K", "N_PAD", "stride_xm", "stride_ym", "stride_wn")
DEQUANT_SIG = {
    "wq_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*i32", "w_ptr": "*{act}", "N": "i32", "K": "i32", "KW": "i32",
    "ZW": "i32", "stride_wqn": "i32", "stride_sn": "i32", "stride_sg": "i32", "stride_zw": "i32", "stride_zg": "i32",
    "stride_wn": "i32", "stride_wk": "i32",
}


def _compile(fn, signature: dict, constexprs: dict, act: str, arch: int, num_warps: int = 4, num_stages: int = 3,
             divisible: tuple = ()):
    """Compile ``fn`` for ``sm_<arch>``. ``divisible`` names the arguments that the JIT launcher would
    mark as divisible by 16 (``"*"``: every pointer, as torch allocations are; plus int names)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {k: v.format(act=act) for k, v in signature.items()}
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items()
             if k in divisible or ("*" in divisible and v.startswith("*"))}
    sig.update({name: "constexpr" for name in constexprs})
    return triton.compile(
        ASTSource(fn, sig, constexprs, attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )


def weight_loads(ptx: str) -> tuple[int, int]:
    """(128-bit, narrower) weight loads in an interleaved kernel's ``ptx``. The kernels load the
    weights, and only the weights, with ``eviction_policy="evict_first"``. A direct load then
    carries ``L1::evict_first``; a pipelined one is a ``cp.async.cg`` (L1 bypassed), and the
    activations' copies are ``.ca``. 128-bit = ``.v4.b32`` loads and 16-byte copies."""
    import re

    direct = re.findall(r"ld\.global\.L1::evict_first[^ ]*", ptx)
    copies = re.findall(r"cp\.async\.cg\.[^\n]*?, (0x[0-9a-f]+),", ptx)
    vec = sum(".v4.b32" in d for d in direct) + sum(c == "0x10" for c in copies)
    return vec, len(direct) + len(copies) - vec


def variants(quick: bool):
    layouts = [(4, 128, False), (4, 128, True), (3, 128, False), (3, 64, True), (4, 0, True), (3, 0, False)]
    acts = ["fp16", "bf16"]
    if quick:
        layouts, acts = [(3, 128, False), (4, 0, True)], ["bf16"]
    for act in acts:
        for bits, group, has_zp in layouts:
            common = dict(BITS=bits, GROUP_K=group, HAS_ZP=has_zp)
            for use_dot in (False, True):
                for word_tile in (True, False):
                    yield ("splitk", act, dict(common, BLOCK_M=16 if use_dot else 1, BLOCK_N=64,
                                               BLOCK_K=64 if group else 128, USE_DOT=use_dot, UPCAST_DOT=False,
                                               TL_SUM=True, WORD_TILE=word_tile))
            for word_tile in (True, False):
                yield ("gemm", act, dict(common, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, UPCAST_DOT=False,
                                         WORD_TILE=word_tile))
            yield ("dequant", act, dict(common, BLOCK_N=64, BLOCK_K=128))
            il = dict(BITS=bits, GROUP_K=group, HAS_ZP=has_zp, TILE_N=32)
            for use_dot, split in ((False, True), (True, True), (False, False)) if not quick or group else ((False, True),):
                yield ("il", act, dict(il, BLOCK_M=16 if use_dot else 1, BLOCK_N=32, SPLIT=split, USE_DOT=use_dot,
                                       UPCAST_DOT=False, TL_SUM=True))
            if not quick:  # the fused prefill candidate: 64-row tl.dot tiles, no split
                yield ("il", act, dict(il, BLOCK_M=64, BLOCK_N=128, SPLIT=False, USE_DOT=True, UPCAST_DOT=False,
                                       TL_SUM=True))
            yield ("il_dequant", act, dict(il, BLOCK_N=32))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = Hopper, 80 = Ampere)")
    p.add_argument("--quick", action="store_true", help="representative subset")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels by Python functions")
        return 2
    from qvlm_modifiers.kernels import dequant, gemm, gemv_splitk, il_decode, il_prefill

    kernels = {
        "splitk": (gemv_splitk._splitk_kernel, SPLITK_SIG),
        "gemm": (gemm._gemm_kernel, GEMM_SIG),
        "dequant": (dequant._dequant_kernel, DEQUANT_SIG),
        "il": (il_decode._il_matmul_kernel, IL_SIG),
        "il_dequant": (il_prefill._il_dequant_kernel, IL_DEQUANT_SIG),
    }
    failures = 0
    for name, act, constexprs in variants(args.quick):
        fn, sig = kernels[name]
        label = f"{name} {act} " + " ".join(f"{k}={v}" for k, v in constexprs.items())
        try:
            il = name.startswith("il")
            k = _compile(fn, sig, constexprs, act, args.arch, num_stages=2 if il else 3,
                         divisible=IL_DIVISIBLE if il else ())
            assert k.asm["cubin"], "empty cubin"
            ptx = k.asm["ptx"]
            mma = " mma" if "mma" in ptx else ""
            extra = ""
            if il:  # the layout's point: every weight load is 128 bits wide
                vec, narrow = weight_loads(ptx)
                extra = f", 128-bit weight loads {vec}, narrower int32 loads {narrow}"
                assert vec >= constexprs["BITS"] and narrow == 0, f"weight loads: {vec} x 128-bit, {narrow} narrower"
                if constexprs.get("SPLIT"):
                    assert "atom.global.gpu.acq_rel.add" in ptx, "split-K counter is not an acq_rel atomic"
            print(f"OK   {label} (ptx {len(ptx)} B, cubin {len(k.asm['cubin'])} B{mma}{extra})", flush=True)
        except Exception as e:  # report every failure, then exit non-zero
            failures += 1
            print(f"FAIL {label}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
    k = _compile(gemv_splitk._sum_partials_kernel, {"p_ptr": "*fp32", "y_ptr": "*bf16", "MN": "i32"},
                 {"SPLIT_K": 4, "BLOCK": 1024}, "bf16", args.arch)
    print(f"OK   sum_partials (cubin {len(k.asm['cubin'])} B)")
    print("ALL OK" if failures == 0 else f"{failures} FAILED")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
