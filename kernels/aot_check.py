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
DEQUANT_SIG = {
    "wq_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*i32", "w_ptr": "*{act}", "N": "i32", "K": "i32", "KW": "i32",
    "ZW": "i32", "stride_wqn": "i32", "stride_sn": "i32", "stride_sg": "i32", "stride_zw": "i32", "stride_zg": "i32",
    "stride_wn": "i32", "stride_wk": "i32",
}


def _compile(fn, signature: dict, constexprs: dict, act: str, arch: int, num_warps: int = 4, num_stages: int = 3):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {k: v.format(act=act) for k, v in signature.items()}
    sig.update({name: "constexpr" for name in constexprs})
    return triton.compile(
        ASTSource(fn, sig, constexprs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = Hopper, 80 = Ampere)")
    p.add_argument("--quick", action="store_true", help="representative subset")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels by Python functions")
        return 2
    from qvlm_modifiers.kernels import dequant, gemm, gemv_splitk

    kernels = {
        "splitk": (gemv_splitk._splitk_kernel, SPLITK_SIG),
        "gemm": (gemm._gemm_kernel, GEMM_SIG),
        "dequant": (dequant._dequant_kernel, DEQUANT_SIG),
    }
    failures = 0
    for name, act, constexprs in variants(args.quick):
        fn, sig = kernels[name]
        label = f"{name} {act} " + " ".join(f"{k}={v}" for k, v in constexprs.items())
        try:
            k = _compile(fn, sig, constexprs, act, args.arch)
            assert k.asm["cubin"], "empty cubin"
            mma = " mma" if "mma" in k.asm["ptx"] else ""
            print(f"OK   {label} (ptx {len(k.asm['ptx'])} B, cubin {len(k.asm['cubin'])} B{mma})", flush=True)
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
