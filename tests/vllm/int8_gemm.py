"""vLLM stage: the integer arithmetic of vLLM's CPU W8A8 linear, and a probe that tells which one
this CPU runs. Imported by ``vllm_generate.py`` (vLLM venv) and ``compare.py`` (project venv); it
needs torch only.

Why: on x86 CPUs without VNNI (AVX2-only, e.g. the AMD EPYC CI machines), vLLM's W8A8 GEMM is
oneDNN's s8s8 matmul, which oneDNN computes as ``(x + 128)`` (u8) times the s8 weight with
``vpmaddubsw``: each pair of adjacent products along K is summed into a *saturating int16* before
it is widened to int32, and ``128 * sum(w)`` is subtracted afterwards. When two large products of
the same sign meet, the pair saturates at 32767 and the output is wrong (oneDNN documents this in
"Nuances of int8 computations"). That is vLLM's serving arithmetic on such a CPU, not a defect of
the checkpoint; our transformers reload computes the exact product. The stage therefore probes
vLLM's own ops (:func:`probe`): if they are exact it compares as before, and if they match the
saturating sequence *bit for bit* it compares vLLM with our reload computing that same sequence
(:class:`EmulatedW8A8Linear`), so the comparison still sees every other difference (weights,
scales, layout, vision path) at the usual tolerance.
"""

from __future__ import annotations

import torch

SAT16 = (-32768, 32767)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token int8 quantization, as vLLM's ``onednn_scaled_int8_quant``:
    scale = absmax / 127 per row (fp32), x_q = round(x * (1 / scale)) clamped to [-128, 127]. The
    reciprocal matters: dividing by the scale rounds 23 of 51200 bf16 activations differently (one
    fp32 ulp at a .5 boundary). The probe checks this against vLLM's op on the CPU it runs on."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / 127.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    x_q = torch.round(xf * (1.0 / safe)).clamp(-128, 127).to(torch.int8)
    return x_q, scale


def gemm_exact(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """[M, K] int8 x [N, K] int8 -> [M, N] int64, exact integer arithmetic."""
    return x_q.long() @ w_q.long().t()


def gemm_u8s8_sat16(x_q: torch.Tensor, w_q: torch.Tensor, rows_per_chunk: int = 16) -> torch.Tensor:
    """[M, K] int8 x [N, K] int8 -> [M, N] int64 as oneDNN computes s8s8 on x86 without VNNI:
    u = x + 128 (u8); per pair k = 2i, 2i+1: sat16(u_k w_k + u_{k+1} w_{k+1}) (vpmaddubsw);
    int32 sum of the pairs; minus 128 * sum_k w_k (the s8 -> u8 shift's compensation)."""
    m, k = x_q.shape
    w = w_q.long()
    if k % 2:  # oneDNN pads K with zeros
        w = torch.nn.functional.pad(w, (0, 1))
        x_q = torch.nn.functional.pad(x_q, (0, 1))
        k += 1
    comp = 128 * w.sum(dim=-1)
    out = torch.empty((m, w.shape[0]), dtype=torch.long)
    for r in range(0, m, rows_per_chunk):
        u = x_q[r: r + rows_per_chunk].long() + 128
        prod = u[:, None, :] * w[None, :, :]
        pairs = prod.view(u.shape[0], w.shape[0], k // 2, 2).sum(-1).clamp(*SAT16)
        out[r: r + rows_per_chunk] = pairs.sum(-1) - comp[None, :]
    return out


class EmulatedW8A8Linear(torch.nn.Module):
    """A W8A8 Linear computing vLLM's CPU arithmetic: per-token int8 activations, the integer GEMM
    ``gemm`` (exact or saturating), then ``acc * x_scale * w_scale`` (fp64, rounded to fp32) + bias
    in fp32, cast to the input's dtype."""

    def __init__(self, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, gemm):
        super().__init__()
        self.register_buffer("w_q", w_q.to(torch.int8).clone())
        self.register_buffer("w_scale", w_scale.float().reshape(1, -1).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.gemm = gemm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_q, x_s = quantize_per_token(x.reshape(-1, shape[-1]))
        out = self.gemm(x_q, self.w_q).double() * x_s.double() * self.w_scale.double()
        out = out.float()
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*shape[:-1], -1)


def probe(ops) -> dict:
    """Run vLLM's CPU W8A8 ops (``vllm._custom_ops``) on seeded cases and say which integer
    arithmetic they compute: ``"exact"``, ``"u8s8_sat16"`` (bit for bit :func:`gemm_u8s8_sat16`)
    or ``"unknown"``. Also checks :func:`quantize_per_token` (values and scales) against vLLM's
    dynamic quantization; a mismatch there makes the verdict ``"unknown"`` too.
    Cases: K = 128 and 256 (the stage's model), M = 1 (decode) and 37 (prefill), integer
    activations at full range (saturation certain) and random bf16 activations (realistic)."""
    gen = torch.Generator().manual_seed(0)
    report = {"exact_cases": 0, "sat16_cases": 0, "cases": 0, "max_abs_err_vs_exact": 0.0,
              "max_rel_err_vs_exact": 0.0, "quant_mismatches": 0, "scale_mismatches": 0, "quant_elements": 0}
    for k in (128, 256):
        for m in (1, 37):
            n = 64
            w_q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
            w_s = torch.ones((n, 1), dtype=torch.float32)
            handler = ops.create_onednn_scaled_mm(w_q.t(), w_s, torch.float32, True, False, 32)
            full = torch.randint(-127, 128, (m, k), generator=gen).float()
            full[:, 0] = 127.0  # absmax 127 -> scale 1 -> x_q == x
            real = (torch.randn((m, k), generator=gen) * 3).to(torch.bfloat16).float()
            for x in (full, real):
                x_q, x_s, x_zp = ops.onednn_scaled_int8_quant(x, None, None, True)
                mine_q, mine_s = quantize_per_token(x)
                report["quant_mismatches"] += int((mine_q != x_q).sum())
                report["scale_mismatches"] += int((mine_s.reshape(-1) != x_s.float().reshape(-1)).sum())
                report["quant_elements"] += x_q.numel()
                out = torch.empty((m, n), dtype=torch.float32)
                ops.onednn_scaled_mm(handler, x_q, out, x_s, x_zp, None, None)
                # with w_scale 1 the output is acc * x_s; recover acc (an integer below 2^24 in fp32)
                acc = torch.round(out.double() / x_s.double().reshape(-1, 1)).long()
                exact = gemm_exact(x_q, w_q)
                sat = gemm_u8s8_sat16(x_q, w_q)
                report["cases"] += 1
                report["exact_cases"] += int(torch.equal(acc, exact))
                report["sat16_cases"] += int(torch.equal(acc, sat))
                err = (acc - exact).abs().double()
                report["max_abs_err_vs_exact"] = max(report["max_abs_err_vs_exact"], float(err.max()))
                rel = float(err.max() / exact.abs().double().max().clamp_min(1))
                report["max_rel_err_vs_exact"] = max(report["max_rel_err_vs_exact"], rel)
    if report["quant_mismatches"] or report["scale_mismatches"]:
        report["arithmetic"] = "unknown"
    elif report["exact_cases"] == report["cases"]:
        report["arithmetic"] = "exact"
    elif report["sat16_cases"] == report["cases"]:
        report["arithmetic"] = "u8s8_sat16"
    else:
        report["arithmetic"] = "unknown"
    return report
