"""The interleaved layout on a whole model: tiny LLaVA -> llm-compressor W4 asym / W3 sym -> save
compressed -> reload with the packed loader -> ``il_dispatch.use_interleaved``. The loaded model's
default route (compressed-tensors layout) is the reference: logits and greedy ``generate`` must
be identical on the plain-PyTorch route, and close on the Triton route (interpreter on CPU). Also
checks that saving still writes the checkpoint's compressed tensors, and that the static-cache
decode loop of ``kernels/e2e.py`` (the one captured in CUDA graphs on a GPU) gives ``generate``'s
tokens."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before any Triton kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import AutoModelForImageTextToText  # noqa: E402

import qvlm_modifiers  # noqa: E402,F401  (registers the packed loader)
from qvlm_modifiers import packed_loader  # noqa: E402
from qvlm_modifiers.testing import zoo  # noqa: E402
from qvlm_modifiers.kernels import il_dispatch  # noqa: E402

SCHEMES = {"w4_asym": "W4A16_ASYM", "w3_sym": "W3A16"}
IDS = torch.tensor([[1, 70, 105, 32, 119, 111, 114]])  # text only: 7 tokens


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    root = tmp_path_factory.mktemp("il_model")
    base = zoo.save("llava", root / "base", dtype=torch.bfloat16)
    out = {}
    for name, scheme in SCHEMES.items():
        model = AutoModelForImageTextToText.from_pretrained(base)
        recipe = QuantizationModifier(targets="Linear", scheme=scheme,
                                      ignore=["lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"])
        oneshot(model=model, recipe=[recipe])
        model.save_pretrained(root / name, save_compressed=True)
        out[name] = root / name
    out["base"] = base
    return out


def _load(path):
    return AutoModelForImageTextToText.from_pretrained(path).eval()


@pytest.mark.parametrize("name", list(SCHEMES))
def test_reference_route_is_identical_after_repacking(ckpts, name):
    model = _load(ckpts[name])
    with torch.no_grad():
        ref_logits = model(input_ids=IDS).logits
        ref_gen = model.generate(input_ids=IDS, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    n_packed = len(packed_loader.packed_modules(model))
    assert il_dispatch.use_interleaved(model) == n_packed == 14
    for mod in packed_loader.packed_modules(model).values():
        assert "weight_packed" not in mod._buffers and mod.il_qweight.dtype == torch.int32
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, ref_logits)
        assert torch.equal(model.generate(input_ids=IDS, max_new_tokens=6, min_new_tokens=6, do_sample=False), ref_gen)


def test_triton_route_matches_reference_route_and_saving_round_trips(ckpts, tmp_path):
    """Triton route within the bound tests/test_packed_loader.py uses for the compressed-tensors
    kernels (2x the bf16 reference route's error + 1% of the logit range). Saving the repacked
    model writes the original compressed tensors, which reload to the same logits."""
    ref_model = AutoModelForImageTextToText.from_pretrained(ckpts["base"]).float().eval()  # float32 reference:
    for name, mod in packed_loader.packed_modules(_load(ckpts["w3_sym"])).items():  # the exact (q - z) * s weights
        ref_model.get_submodule(name).weight.data.copy_(mod.dequantized_weight(torch.float32))
    with torch.no_grad():
        ref = ref_model(input_ids=IDS).logits
    model = _load(ckpts["w3_sym"])
    il_dispatch.use_interleaved(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (set at the top)
    model.to(device)
    calls = []
    real = il_dispatch.interleaved_linear
    il_dispatch.interleaved_linear = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        with torch.no_grad():
            packed_loader.set_backend(model, "reference")
            torch_bf16 = model(input_ids=IDS.to(device)).logits.float().cpu()
            packed_loader.set_backend(model, "triton")
            triton_bf16 = model(input_ids=IDS.to(device)).logits.float().cpu()
    finally:
        il_dispatch.interleaved_linear = real
    assert len(calls) == 14
    err_torch, err_triton = (torch_bf16 - ref).abs().max(), (triton_bf16 - ref).abs().max()
    assert err_triton <= 2 * err_torch + 0.01 * ref.abs().max(), (err_triton, err_torch)

    packed_loader.set_backend(model, "reference")
    model.save_pretrained(tmp_path / "resaved")
    again = _load(tmp_path / "resaved")
    orig = _load(ckpts["w3_sym"])
    for (name, a), (_, b) in zip(packed_loader.packed_modules(again).items(), packed_loader.packed_modules(orig).items()):
        assert torch.equal(a.weight_packed, b.weight_packed) and torch.equal(a.weight_scale, b.weight_scale), name
    with torch.no_grad():  # the resaved checkpoint on the plain-PyTorch route, on CPU
        assert torch.equal(again(input_ids=IDS).logits, orig(input_ids=IDS).logits)


def test_static_cache_decode_loop_matches_generate():
    from qvlm_modifiers.kernels.e2e import static_greedy

    model, _ = zoo.build("llava", dtype=torch.bfloat16)
    model.eval()
    ids = torch.randint(5, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gen = model.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    tokens, _ = static_greedy(model, ids, 8)
    assert torch.equal(tokens, gen[:, ids.shape[1]:])
