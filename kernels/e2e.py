"""End-to-end greedy decode: bf16 against W4A16 g128 through the compressed-tensors-layout kernels
(``packed``, the loader's default) and through the interleaved layout (``interleaved``,
``il_dispatch.use_interleaved``). Each is run eagerly and with the decode step captured in one
CUDA graph.

    python -m qvlm_modifiers.kernels.e2e --layers 8 --tokens 64     # CUDA: Llama-7B-shaped LM
    python -m qvlm_modifiers.kernels.e2e                              # CPU: tiny zoo LLaVA, plumbing only

Model (GPU): a LLaVA whose language model has Llama-7B layer shapes (``--layers`` decoder
layers, random weights), quantized W4A16 g128 by llm-compressor, saved compressed and reloaded
through ``from_pretrained`` with the packed loader. On CPU it is the tiny zoo LLaVA, with the
reference forward, and the timings mean nothing.

Decode loop (``static_greedy``): a ``StaticCache`` sized for prompt + new tokens, an eager
prefill, then one forward per token on static ``input_ids`` / ``cache_position`` tensors. The
next token is picked by argmax on the device, with no host synchronisation. With ``graph=True``
the step is warmed up on a side stream, captured once with ``torch.cuda.graph`` and replayed
per token. Every graph run is checked to produce the same tokens as the eager run. On CPU the
tests check that the eager loop gives the same tokens as ``generate``.

Memory: the weight bytes on the device (parameters + buffers), and the peak CUDA memory of the
run. The quantized Linears alone are reported too. In a model this short, the bf16 embeddings,
``lm_head`` and vision tower are a larger share than in the full 32-layer model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():  # before any kernel module is imported (see kernels/_unpack.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

__all__ = ["static_greedy", "run_e2e", "llava_7b_shaped_config", "main"]


def llava_7b_shaped_config(layers: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576)


@torch.no_grad()
def static_greedy(model, ids: torch.Tensor, new_tokens: int, graph: bool = False) -> tuple[torch.Tensor, float]:
    """Greedy-decode ``new_tokens`` tokens after ``ids`` (batch 1) with a static KV cache.
    Returns the new tokens ``[1, new_tokens]`` and the seconds the ``new_tokens - 1`` decode
    steps took (prefill excluded)."""
    from transformers import StaticCache

    device = ids.device
    prompt = ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=prompt + new_tokens)
    logits = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt, device=device),
                   use_cache=True).logits[:, -1]
    step_ids = logits.argmax(-1, keepdim=True)
    step_pos = torch.tensor([prompt], device=device)
    tokens = [step_ids.clone()]

    def step():
        return model(input_ids=step_ids, past_key_values=cache, cache_position=step_pos, use_cache=True).logits[:, -1]

    run = step
    if graph:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up writes this position's KV, which the first real step rewrites
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_logits = step()

        def run():
            g.replay()
            return static_logits
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        nxt = run().argmax(-1, keepdim=True)
        tokens.append(nxt)
        step_ids.copy_(nxt)
        step_pos.add_(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return torch.cat(tokens, dim=1), time.perf_counter() - t0


def _weight_bytes(model) -> tuple[int, int, int]:
    """(all parameters + buffers, quantized Linears as stored, the same Linears in bf16) in bytes."""
    from qvlm_modifiers import packed_loader

    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    packed = dense = 0
    for mod in packed_loader.packed_modules(model).values():
        packed += sum(t.numel() * t.element_size() for t in mod.buffers() if t.dtype != torch.int64)
        dense += mod.in_features * mod.out_features * 2
    return total, packed, dense


def build_checkpoints(workdir: str, device: torch.device, layers: int) -> tuple[str, str, str]:
    """bf16 base and W4A16 g128 compressed checkpoints; returns ``(base_dir, q_dir, label)``. A
    ``workdir`` that already holds both (from an earlier run with the same settings) is reused."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForImageTextToText

    base_dir, q_dir = os.path.join(workdir, "base"), os.path.join(workdir, "w4a16")
    label = f"LLaVA, Llama-7B-shaped LM with {layers} layers" if device.type == "cuda" else "tiny zoo LLaVA"
    stamp = os.path.join(workdir, f"built-{device.type}-{layers}")
    if os.path.exists(stamp):
        return base_dir, q_dir, label
    if device.type == "cuda":
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(llava_7b_shaped_config(layers), dtype=torch.bfloat16)
    else:
        from qvlm_modifiers.testing import zoo

        model, _ = zoo.build("llava", dtype=torch.bfloat16)
    model.save_pretrained(base_dir)
    del model  # oneshot needs a model loaded from disk (it re-reads the config from name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.bfloat16, device_map=str(device))
    recipe = QuantizationModifier(targets="Linear", scheme="W4A16",
                                  ignore=["lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"])
    oneshot(model=model, recipe=[recipe])
    model.save_pretrained(q_dir, save_compressed=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    open(stamp, "w").close()
    return base_dir, q_dir, label


def run_e2e(workdir: str, device: torch.device, layers: int = 8, new_tokens: int = 64, prompt_len: int = 32,
            variants=("bf16", "interleaved", "packed")) -> list[dict]:
    import qvlm_modifiers  # noqa: F401  (registers the packed loader)
    from transformers import AutoModelForImageTextToText

    from qvlm_modifiers import packed_loader
    from qvlm_modifiers.kernels import il_dispatch

    on_gpu = device.type == "cuda"
    if not on_gpu:
        new_tokens, prompt_len = min(new_tokens, 8), min(prompt_len, 8)
    base_dir, q_dir, label = build_checkpoints(workdir, device, layers)
    print(f"\n# end-to-end ({label}, greedy decode {new_tokens} tokens after a {prompt_len}-token prompt, batch 1, "
          f"static KV cache{'' if on_gpu else '; CPU reference path: tokens/s mean nothing'})", flush=True)
    results = []
    for variant in variants:
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        model = AutoModelForImageTextToText.from_pretrained(base_dir if variant == "bf16" else q_dir,
                                                            dtype=torch.bfloat16, device_map=str(device)).eval()
        vocab = model.config.get_text_config().vocab_size
        ids = torch.randint(5, min(1000, vocab), (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
        n_packed = len(packed_loader.packed_modules(model))
        if variant == "interleaved":
            n_converted = il_dispatch.use_interleaved(model)
            assert n_converted == n_packed, (n_converted, n_packed)
        row = dict(variant=variant, n_packed=n_packed)
        row["weights"], row["packed_bytes"], row["dense_bytes"] = _weight_bytes(model)
        static_greedy(model, ids, min(new_tokens, 4))  # warm-up: compile + tune (prefill and decode shapes)
        tokens, secs = static_greedy(model, ids, new_tokens)
        row.update(tokens=tokens.cpu(), eager_tps=(new_tokens - 1) / secs, graph_tps=float("nan"), graph_note="")
        if on_gpu:
            try:
                g_tokens, g_secs = static_greedy(model, ids, new_tokens, graph=True)
                row["graph_tps"] = (new_tokens - 1) / g_secs
                row["graph_note"] = "same tokens" if torch.equal(g_tokens.cpu(), row["tokens"]) else "TOKENS DIFFER"
            except Exception as e:  # capture failed: report it, keep the eager numbers
                row["graph_note"] = f"capture FAILED: {type(e).__name__}: {str(e)[:200]}"
            row["peak"] = torch.cuda.max_memory_allocated(device)
        results.append(row)
        print(_line(row, results[0] if results[0]["variant"] == "bf16" else None, on_gpu), flush=True)
        del model
    _summary(results, on_gpu)
    return results


def _line(r: dict, base: dict | None, on_gpu: bool) -> str:
    gib = 2.0**30
    line = (f"e2e {r['variant']:12}: eager {r['eager_tps']:8.2f} tok/s, graph {r['graph_tps']:8.2f} tok/s "
            f"{r['graph_note']}| weights {r['weights'] / gib:6.3f} GiB")
    if on_gpu:
        line += f", peak {r['peak'] / gib:6.3f} GiB"
    if r["variant"] != "bf16":
        line += f" ({r['n_packed']} packed Linears, {r['packed_bytes'] / max(1, r['dense_bytes']):.3f}x of their bf16)"
    if base is not None and r is not base:
        line += (f" | vs bf16: eager {r['eager_tps'] / base['eager_tps']:.2f}x, graph "
                 f"{r['graph_tps'] / base['graph_tps']:.2f}x, weights {r['weights'] / base['weights']:.2f}x")
        if base["tokens"].shape == r["tokens"].shape:
            line += f", tokens {'=' if torch.equal(base['tokens'], r['tokens']) else '!='} bf16"
    return line


def _summary(results: list[dict], on_gpu: bool) -> None:
    by = {r["variant"]: r for r in results}
    packed, il, base = by.get("packed"), by.get("interleaved"), by.get("bf16")
    if packed is not None and il is not None:
        print(f"# interleaved tokens {'identical to' if torch.equal(packed['tokens'], il['tokens']) else 'DIFFER from'} "
              "the packed (compressed-tensors layout) model's")
    if on_gpu and base is not None and il is not None:
        for key, mode in (("graph_tps", "graph"), ("eager_tps", "eager")):
            speed, mem = il[key] / base[key], il["weights"] / base["weights"]
            print(f"# target (issue): interleaved decode >= 1.5x bf16 tok/s at <= 0.35x weight memory ({mode}): "
                  f"{speed:.2f}x at {mem:.2f}x: {'MET' if speed >= 1.5 and mem <= 0.35 else 'NOT MET'}")


def main(argv=None) -> list[dict]:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--variants", nargs="+", default=["bf16", "interleaved", "packed"],
                   choices=["bf16", "packed", "interleaved"])
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.workdir:
        return run_e2e(args.workdir, device, args.layers, args.tokens, args.prompt, args.variants)
    with tempfile.TemporaryDirectory() as tmp:
        return run_e2e(tmp, device, args.layers, args.tokens, args.prompt, args.variants)


if __name__ == "__main__":
    main(sys.argv[1:])
