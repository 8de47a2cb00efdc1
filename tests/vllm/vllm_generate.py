"""Runs inside the vLLM venv (NOT the project venv): load each checkpoint of a manifest in vLLM's
CPU backend and, where asked, generate greedily from one prompt with one image.

    python tests/vllm/vllm_generate.py MANIFEST.json RESULTS.json

MANIFEST: {"prompt": str, "image": png path, "max_tokens": int, "logprobs": int,
           "checkpoints": [{"name": str, "path": dir, "mode": "generate" | "load"}]}
RESULTS:  {"vllm": version, "avx512": bool, "int8_gemm": probe report (int8_gemm.py),
           "checkpoints": {name: {"status": "ok" | "failed", "mode", "error", "load_s", "generate_s",
           "quantization", "tokens": [...], "logprobs": [{token_id: logprob, ...} per step]}}}

Each checkpoint is loaded with ``quantization`` detected from its config.json (vLLM's
compressed-tensors loader); a failure of one checkpoint is recorded and the next one runs.
The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by the caller) so one Python
start serves every checkpoint.
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback


def _cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            return " avx512f" in fh.read()
    except OSError:
        return False


def _probe_int8_gemm() -> dict:
    """Which integer arithmetic vLLM's CPU W8A8 ops compute here (see int8_gemm.py); recorded for
    compare.py. AMX CPUs serve our shapes with another kernel (vLLM's SGL int8 GEMM), not probed."""
    try:
        import torch
        from vllm import _custom_ops as ops

        import int8_gemm  # beside this script

        report = int8_gemm.probe(ops)
        report["amx"] = bool(torch.cpu._is_amx_tile_supported())
        return report
    except Exception as err:  # noqa: BLE001 - recorded; compare.py then checks exact arithmetic
        return {"arithmetic": "unknown", "error": f"{type(err).__name__}: {err}"}


def _release(llm) -> None:
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        del llm
        gc.collect()
        cleanup_dist_env_and_memory()
    except Exception:  # noqa: BLE001 - best effort between checkpoints
        gc.collect()


def main() -> int:
    manifest_path, results_path = sys.argv[1], sys.argv[2]
    with open(manifest_path) as fh:
        manifest = json.load(fh)

    import vllm
    from PIL import Image
    from vllm import LLM, SamplingParams

    image = Image.open(manifest["image"]).convert("RGB")
    params = SamplingParams(temperature=0.0, max_tokens=manifest["max_tokens"], logprobs=manifest["logprobs"])
    results = {"vllm": vllm.__version__, "avx512": _cpu_has_avx512(), "checkpoints": {},
               "int8_gemm": _probe_int8_gemm()}
    print(f"[vllm] W8A8 integer arithmetic on this CPU: {results['int8_gemm'].get('arithmetic')} "
          f"({results['int8_gemm']})", flush=True)
    for entry in manifest["checkpoints"]:
        name, path, mode = entry["name"], entry["path"], entry["mode"]
        rec = {"mode": mode, "status": "failed"}
        results["checkpoints"][name] = rec
        with open(f"{path}/config.json") as fh:
            rec["quantization"] = (json.load(fh).get("quantization_config") or {}).get("quant_method")
        t0 = time.perf_counter()
        llm = None
        try:
            llm = LLM(model=path, dtype="bfloat16", max_model_len=1024, enforce_eager=True, max_num_seqs=1,
                      limit_mm_per_prompt={"image": 1}, gpu_memory_utilization=0.15, seed=0)
            rec["load_s"] = round(time.perf_counter() - t0, 2)
            if mode == "generate":
                t1 = time.perf_counter()
                out = llm.generate({"prompt": manifest["prompt"], "multi_modal_data": {"image": image}}, params)
                completion = out[0].outputs[0]
                rec["generate_s"] = round(time.perf_counter() - t1, 2)
                rec["tokens"] = list(completion.token_ids)
                rec["logprobs"] = [{str(tok): lp.logprob for tok, lp in step.items()} for step in completion.logprobs]
                rec["prompt_token_count"] = len(out[0].prompt_token_ids)
            rec["status"] = "ok"
        except Exception as err:  # noqa: BLE001 - recorded per checkpoint
            rec["error"] = f"{type(err).__name__}: {err}"
            rec["traceback"] = traceback.format_exc()[-4000:]
        finally:
            if llm is not None:
                _release(llm)
        print(f"[vllm] {name}: {mode} {rec['status']}" + (f" ({rec.get('error', '')[:300]})" if rec["status"] != "ok" else
              f" load {rec.get('load_s')} s" + (f", generate {rec.get('generate_s')} s" if mode == "generate" else "")),
              flush=True)
    with open(results_path, "w") as fh:
        json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":  # vLLM's engine may spawn processes: keep the guard
    sys.exit(main())
