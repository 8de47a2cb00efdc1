"""vLLM stage, step 1 (project venv): a tiny Qwen2.5-VL, one checkpoint per shipped recipe made with
the ``qvlm`` CLI, the test image/prompt, and the manifest for ``vllm_generate.py``.

    python tests/vllm/prepare.py WORKDIR [--recipes a,b,...] [--generate-weight-only]

The tiny model comes from :mod:`qvlm_modifiers.testing.zoo` (random weights). Random weights give an
almost flat next-token distribution (top log-probs within ~0.1 nat of log(1/vocab)), so greedy
tokens would flip on rounding noise and a token comparison would prove nothing. The LM head is
therefore scaled by ``LOGIT_SCALE`` before quantizing: logits spread over several nats, greedy
choices have real margins, and the model is still the same architecture vLLM has to serve.

Modes written to the manifest: every W8A8 checkpoint (int8 weights + dynamic int8 activations) is
generated from; weight-only W4A16/W3A16 ones are generated from with ``--generate-weight-only``
(the caller passes it when the CPU has AVX-512, which vLLM's CPU WNA16 kernels need), else only
loaded; every other checkpoint (W4A8, W4A4, W6A6, ...) is loaded, which runs vLLM's
compressed-tensors config parsing, scheme selection and weight loading for every layer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

LOGIT_SCALE = 8.0
# Search-effort settings that do not change what is written to quantization_config (scheme,
# ignore list, format), only how long the search runs: this stage checks that vLLM accepts the
# checkpoints, not the search quality (tests/test_qvlm*.py do that).
FAST_OVERRIDES = {
    "QVLMModifier": {"search_epochs": 1, "percentile_grid": [1.0, 0.99], "vision_epochs": 1},
    "MBQModifier": {"n_grid": 4},
    "AWQModifier": {"n_grid": 4},  # duo_scaling halves it; 2 points minimum
    "LMAWQModifier": {"n_grid": 4},
}


def fast_recipe(name: str, work: Path) -> str:
    """The shipped recipe, or a copy with FAST_OVERRIDES applied to the Modifiers that have them."""
    import yaml

    import qvlm_modifiers

    path = qvlm_modifiers.recipe_path(name)
    data = yaml.safe_load(path.read_text())
    changed = False
    for stage in data.values():
        for group in (stage or {}).values():
            for mod_type, mod_args in (group or {}).items():
                if mod_type in FAST_OVERRIDES and isinstance(mod_args, dict):
                    mod_args.update(FAST_OVERRIDES[mod_type])
                    changed = True
    if not changed:
        return name
    out = work / "recipes" / f"{name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# {name} with fast search settings for the vLLM stage\n" + yaml.safe_dump(data, sort_keys=False))
    return str(out)
FAMILY = "qwen2_5_vl"
QUESTION = "What shape is in the image?"


def _scheme_kind(ckpt: Path) -> str:
    qcfg = json.loads((ckpt / "config.json").read_text()).get("quantization_config") or {}
    kinds = set()
    for group in (qcfg.get("config_groups") or {}).values():
        w = (group.get("weights") or {}).get("num_bits")
        a = (group.get("input_activations") or {}).get("num_bits")
        kinds.add(f"W{w}A{a or 16}")
    return "+".join(sorted(kinds)) or "dense"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--recipes", default="", help="comma-separated recipe names (default: all shipped)")
    parser.add_argument("--generate-weight-only", action="store_true")
    parser.add_argument("--num-samples", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import qvlm_modifiers
    from qvlm_modifiers.testing import zoo
    from qvlm_modifiers.cli import main as qvlm

    torch.set_num_threads(2)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base"
    if not (base / "config.json").is_file():
        model, processor = zoo.build(FAMILY, seed=0, dtype=torch.bfloat16)
        with torch.no_grad():
            model.lm_head.weight.mul_(LOGIT_SCALE)
        model.save_pretrained(base)
        processor.save_pretrained(base)
    pairs = work / "pairs"
    if not pairs.exists():
        zoo.sample_pairs(16, seed=1).save_to_disk(str(pairs))

    # the test image and prompt: an image the calibration set does not contain
    sample = zoo.sample_pairs(1, seed=123)[0]
    image_path = work / "image.png"
    sample["image"].save(image_path)
    other = zoo.sample_pairs(1, seed=456)[0]  # control image for the comparison step
    other["image"].save(work / "other_image.png")
    processor = AutoProcessor.from_pretrained(base)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    AutoModelForImageTextToText  # noqa: B018 - imported to fail early if transformers lacks it

    recipes = [r for r in args.recipes.split(",") if r] or list(qvlm_modifiers.list_recipes())
    entries = [{"name": "bf16", "path": str(base), "mode": "generate", "kind": "bf16"}]
    failures = {}
    for name in recipes:
        out = work / "ckpt" / name
        if not (out / "config.json").is_file():
            t0 = time.perf_counter()
            code = qvlm(["quantize", str(base), "--recipe", fast_recipe(name, work), "--dataset", str(pairs), "--num-samples",
                         str(args.num_samples), "--output", str(out), "--overwrite", "--quiet"])
            print(f"[prepare] qvlm quantize --recipe {name}: exit {code} in {time.perf_counter() - t0:.1f} s",
                  flush=True)
            if code != 0:
                failures[name] = code
                continue
        kind = _scheme_kind(out)
        weight_only = kind.endswith("A16")
        if kind == "W8A8" or (weight_only and args.generate_weight_only):
            mode = "generate"
        else:
            mode = "load"
        entries.append({"name": name, "path": str(out), "mode": mode, "kind": kind})
    manifest = {"prompt": prompt, "question": QUESTION, "image": str(image_path),
                "control_image": str(work / "other_image.png"), "max_tokens": 8, "logprobs": 5,
                "checkpoints": entries, "quantize_failures": failures, "logit_scale": LOGIT_SCALE}
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"[prepare] {len(entries)} checkpoints in manifest; quantize failures: {failures or 'none'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
