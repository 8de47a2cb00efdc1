"""End to end: tiny LLaVA -> llm-compressor W4 (asym) / W3 (sym) -> save compressed -> reload
through ``AutoModelForImageTextToText.from_pretrained`` with ``import qvlm_modifiers``'s packed
loader. The reference is independent of the loader: the original model whose quantized Linears
get the weights compressed-tensors' own ``PackedQuantizationCompressor.decompress`` produces from
the saved safetensors.

Also: GPTQ (act-order ``static``, llm-compressor's default) and AWQ checkpoints stay packed after
forward and ``generate`` (bytes held by the language model's Linears against bf16), where
transformers' own loader holds dense weights after one forward; group act-order checkpoints
(``weight_g_idx``) load with their index; a packed SigLIP vision tower reloads without hiding
missing tensors; ``qvlm inspect`` says which Linears run packed."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil

import torch

if not torch.cuda.is_available():  # before any Triton kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForImageTextToText  # noqa: E402

import qvlm_modifiers  # noqa: E402,F401  (registers the packed loader)
from qvlm_modifiers import packed_loader, upstream  # noqa: E402
from qvlm_modifiers.testing import zoo  # noqa: E402
from qvlm_modifiers.packed_loader import PackedKernelsConfig, PackedLinear, linear_status  # noqa: E402
from qvlm_modifiers.upstream import upstream_loading  # noqa: E402

SCHEMES = {"w4_asym": ("W4A16_ASYM", 4), "w3_sym": ("W3A16", 3)}
NOT_QUANTIZED = ("model.vision_tower.", "model.multi_modal_projector.", "lm_head")


def _quantize(base_dir, out_dir, scheme):
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    model = AutoModelForImageTextToText.from_pretrained(base_dir)
    recipe = QuantizationModifier(
        targets="Linear",
        scheme=scheme,
        ignore=["lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*", "re:.*visual.*"],
    )
    oneshot(model=model, recipe=[recipe])
    model.save_pretrained(out_dir, save_compressed=True)
    return out_dir


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed_loader")
    base = zoo.save("llava", root / "base", dtype=torch.bfloat16)  # bf16 like real checkpoints
    out = {name: _quantize(base, root / name, scheme) for name, (scheme, _) in SCHEMES.items()}
    return base, out


@pytest.fixture(scope="module")
def inputs(ckpts):
    base, _ = ckpts
    _, processor = zoo.build("llava")
    pair = zoo.sample_pairs(1)[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": pair["question"]}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=[pair["image"]], text=prompt, return_tensors="pt")


def _reference_model(base, ckpt, dequantize=None):
    """Base model with each quantized Linear's weight = ``dequantize(state, module)`` of its saved
    tensors (``state``: the module's on-disk tensors keyed without the module prefix, found by their
    module-path suffix). Default: compressed-tensors' own decompression."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    if dequantize is None:
        qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
        scheme = QuantizationScheme.model_validate(qcfg["config_groups"]["group_0"])

        def dequantize(state, module):
            return PackedQuantizationCompressor.decompress(state, scheme)["weight"]

    model = AutoModelForImageTextToText.from_pretrained(base)
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        disk = {k: f.get_tensor(k) for k in f.keys()}
    replaced = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.startswith(NOT_QUANTIZED):
            continue
        suffix = name.split("language_model.", 1)[1] + "."
        keys = [k for k in disk if k.endswith("weight_packed") and ("." + suffix) in ("." + k)]
        assert len(keys) == 1, (name, keys)
        prefix = keys[0][: -len("weight_packed")]
        state = {k[len(prefix):]: v for k, v in disk.items() if k.startswith(prefix)}
        module.weight.data.copy_(dequantize(state, module))
        replaced += 1
    assert replaced == 14  # 2 decoder layers x (q, k, v, o, gate, up, down)
    return model


def _load(ckpt, **kwargs):
    model, info = AutoModelForImageTextToText.from_pretrained(ckpt, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("name", list(SCHEMES))
def test_reload_keeps_weights_packed_and_ignored_modules_untouched(ckpts, name):
    base, out = ckpts
    model = _load(out[name])
    bits = SCHEMES[name][1]
    packed = packed_loader.packed_modules(model)
    assert len(packed) == 14
    for mod_name, mod in packed.items():
        assert not mod_name.startswith(NOT_QUANTIZED)
        assert mod.weight_packed.dtype == torch.int32 and mod.layout.num_bits == bits
        assert not hasattr(mod, "weight")  # no dense copy kept
    with pytest.raises(AttributeError, match="dequantized_weight"):
        next(iter(packed.values())).weight
    assert not hasattr(model, "ct_decompress_hook")  # upstream's decompress-on-first-forward is gone
    original = AutoModelForImageTextToText.from_pretrained(base)
    orig_modules = dict(original.named_modules())
    ignored = 0
    for mod_name, mod in model.named_modules():
        if mod_name.startswith(NOT_QUANTIZED) and isinstance(orig_modules[mod_name], torch.nn.Linear):
            assert type(mod) is torch.nn.Linear, mod_name
            assert not hasattr(mod, "quantization_scheme"), mod_name
            assert torch.equal(mod.weight, orig_modules[mod_name].weight), mod_name
            ignored += 1
    assert ignored == 12 + 2 + 1  # vision tower (2 layers x 6), projector (2), lm_head


@pytest.mark.parametrize("name", list(SCHEMES))
def test_logits_and_greedy_generate_match_dequantized_reference(ckpts, inputs, name):
    base, out = ckpts
    model = _load(out[name])
    assert all(m.backend == "auto" for m in packed_loader.packed_modules(model).values())
    reference = _reference_model(base, out[name])
    with torch.no_grad():
        logits = model(**inputs).logits
        ref_logits = reference(**inputs).logits
    # identical bf16 weights (both round the exact (q - z) * s to bf16 once) and identical ops
    assert logits.dtype == torch.bfloat16
    assert torch.equal(logits, ref_logits)
    gen = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    ref_gen = reference.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(gen, ref_gen)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_packed_weight_memory_is_bits_over_16_of_bf16(ckpts, name):
    _, out = ckpts
    bits = SCHEMES[name][1]
    model = _load(out[name])
    packed_bytes = dense_bytes = 0
    for mod in packed_loader.packed_modules(model).values():
        assert mod.weight_scale.dtype == torch.bfloat16
        for t in (mod.weight_packed, mod.weight_scale, mod.weight_zero_point):
            if t is not None:
                packed_bytes += t.numel() * t.element_size()
        dense_bytes += mod.out_features * mod.in_features * 2  # bf16
    ratio = packed_bytes / dense_bytes
    # b/16 for the packed integers, plus one bf16 scale (and b-bit zero point if asymmetric)
    # per group of 128: (2 + b/8) / 128 bytes per weight / 2 bytes = <= 1% here
    assert bits / 16 <= ratio <= bits / 16 + 0.01, ratio


def test_triton_kernel_path_matches_reference_path(ckpts, monkeypatch):
    """The loaded model routed through the Triton kernels (interpreter on CPU) in bf16 is as close
    to the float32 reference as the bf16 PyTorch reference path is (within 2x + 1% of the logit
    range: both only differ by bf16 rounding, a wrongly read weight would be far off)."""
    base, out = ckpts
    model = _load(out["w3_sym"])
    reference = _reference_model(base, out["w3_sym"]).float()
    ids = torch.tensor([[1, 70, 105, 32, 119, 111, 114]])  # text-only: 7 tokens -> decode kernel
    from qvlm_modifiers.kernels import dispatch

    calls = []
    real = dispatch.packed_linear
    monkeypatch.setattr(dispatch, "packed_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: interpreter (set at the top)
    model.to(device)
    with torch.no_grad():
        ref = reference(input_ids=ids).logits.float()
        packed_loader.set_backend(model, "reference")
        torch_bf16 = model(input_ids=ids.to(device)).logits.float().cpu()
        packed_loader.set_backend(model, "triton")
        triton_bf16 = model(input_ids=ids.to(device)).logits.float().cpu()
    err_torch = (torch_bf16 - ref).abs().max()
    err_triton = (triton_bf16 - ref).abs().max()
    assert err_triton <= 2 * err_torch + 0.01 * ref.abs().max(), (err_triton, err_torch)
    assert len(calls) == 14  # every quantized Linear went through the Triton kernels, once


def test_switches_turn_packed_kernels_off(ckpts, inputs, monkeypatch):
    base, out = ckpts
    reference = _reference_model(base, out["w4_asym"])
    with torch.no_grad():
        ref_logits = reference(**inputs).logits

    monkeypatch.setenv(packed_loader.ENV_KERNELS, "0")
    model = _load(out["w4_asym"])
    assert not packed_loader.packed_modules(model)  # upstream route: decompressed on first forward
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref_logits)
    # the documented loading option beats the environment variable
    model = _load(out["w4_asym"], quantization_config=PackedKernelsConfig(packed_kernels=True))
    assert len(packed_loader.packed_modules(model)) == 14
    monkeypatch.delenv(packed_loader.ENV_KERNELS)
    model = _load(out["w4_asym"], quantization_config=PackedKernelsConfig(packed_kernels=False))
    assert not packed_loader.packed_modules(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref_logits)


def test_on_disk_ignore_names_are_honoured(ckpts, tmp_path):
    """A checkpoint whose ``ignore`` holds only the on-disk names compressed-tensors 0.19 writes
    (``vision_tower...``): upstream re-initializes the vision tower, the packed loader does not."""
    base, out = ckpts
    ckpt = tmp_path / "ondisk"
    shutil.copytree(out["w4_asym"], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    on_disk = [n for n in cfg["quantization_config"]["ignore"] if not n.startswith("model.") and n != "lm_head"]
    assert any(n.startswith("vision_tower.") for n in on_disk)
    cfg["quantization_config"]["ignore"] = on_disk
    (ckpt / "config.json").write_text(json.dumps(cfg))

    original = AutoModelForImageTextToText.from_pretrained(base)
    q_name = "model.vision_tower.encoder.layers.0.self_attn.q_proj"
    model = _load(ckpt)
    assert type(model.get_submodule(q_name)) is torch.nn.Linear
    assert torch.equal(model.get_submodule(q_name).weight, original.get_submodule(q_name).weight)
    assert len(packed_loader.packed_modules(model)) == 14

    # upstream (pinned transformers 5.17 / compressed-tensors 0.19) gets this wrong: proves the
    # test exercises the fix
    with upstream_loading():
        plain, info = AutoModelForImageTextToText.from_pretrained(ckpt, output_loading_info=True)
    assert hasattr(plain.get_submodule(q_name), "quantization_scheme") or info["missing_keys"]


def test_registration_is_idempotent_and_reversible():
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    from transformers.quantizers.quantizer_compressed_tensors import CompressedTensorsHfQuantizer

    assert upstream.is_registered()
    upstream.register()
    assert AUTO_QUANTIZER_MAPPING["compressed-tensors"] is packed_loader.PackedCompressedTensorsHfQuantizer
    upstream.unregister()
    try:
        assert AUTO_QUANTIZER_MAPPING["compressed-tensors"] is CompressedTensorsHfQuantizer
    finally:
        upstream.register()
    assert upstream.is_registered()


def test_bad_backend_is_rejected(ckpts):
    _, out = ckpts
    model = _load(out["w3_sym"])
    with pytest.raises(ValueError, match="backend"):
        packed_loader.set_backend(model, "cuda-magic")


def test_packed_model_saves_and_reloads(ckpts, inputs, tmp_path):
    """``save_pretrained`` of a packed-loaded model writes the same compressed tensors (same names)
    and reloads to the same logits."""
    _, out = ckpts
    model = _load(out["w3_sym"])
    with torch.no_grad():
        logits = model(**inputs).logits
    model.save_pretrained(tmp_path / "resaved")
    cfg = json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and "packed_kernels" not in cfg
    again = _load(tmp_path / "resaved")
    assert len(packed_loader.packed_modules(again)) == 14
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, logits)


def test_dense_module_missing_from_ignore_raises_clear_error(ckpts, tmp_path):
    """A module stored dense but not ignored gets a quantization scheme and no compressed tensors:
    upstream silently re-initializes it; the packed loader names the problem and the fix."""
    from qvlm_modifiers.errors import CheckpointError

    _, out = ckpts
    ckpt = tmp_path / "bad_ignore"
    shutil.copytree(out["w4_asym"], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["ignore"] = [
        n for n in cfg["quantization_config"]["ignore"] if "multi_modal_projector.linear_1" not in n
    ]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="ignore"):
        AutoModelForImageTextToText.from_pretrained(ckpt)


def test_qwen2_vl_on_disk_ignore_names(tmp_path):
    """Another family with other on-disk -> in-memory renamings (``visual.`` -> ``model.visual.``,
    ``model.`` -> ``model.language_model.``): on-disk-only ``ignore`` keeps the vision tower dense."""
    base = zoo.save("qwen2_vl", tmp_path / "base", dtype=torch.bfloat16)
    ckpt = _quantize(base, tmp_path / "w4", "W4A16")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["ignore"] = [
        n for n in cfg["quantization_config"]["ignore"] if not n.startswith("model.")
    ]
    assert any(n.startswith("visual.") for n in cfg["quantization_config"]["ignore"])
    (ckpt / "config.json").write_text(json.dumps(cfg))
    model = _load(ckpt)
    original = AutoModelForImageTextToText.from_pretrained(base)
    assert len(packed_loader.packed_modules(model)) == 14
    visual = [(n, m) for n, m in model.named_modules() if n.startswith("model.visual.") and isinstance(m, torch.nn.Linear)]
    assert visual
    for name, module in visual:
        assert type(module) is torch.nn.Linear and torch.equal(module.weight, original.get_submodule(name).weight)


def test_only_called_linears_are_taken_over():
    """``nn.MultiheadAttention`` (SigLIP heads) reads ``out_proj.weight`` directly instead of
    calling the module, so that Linear must keep upstream's dense route."""
    from compressed_tensors.quantization import QuantizationScheme, QuantizationStatus, preset_name_to_scheme

    def mark(module):
        scheme: QuantizationScheme = preset_name_to_scheme("W4A16", ["Linear"])
        scheme.format = "pack-quantized"
        module.quantization_scheme = scheme
        module.quantization_status = QuantizationStatus.COMPRESSED
        module.weight_packed = torch.nn.Parameter(torch.zeros(8, 1, dtype=torch.int32), requires_grad=False)
        return module

    assert packed_loader._supported_for_packing(mark(torch.nn.Linear(8, 8)))
    assert not packed_loader._supported_for_packing(mark(torch.nn.MultiheadAttention(8, 2).out_proj))


# ---------------------------------------------------------------------------------------------
# GPTQ (act-order static) and AWQ checkpoints stay packed; group act-order; SigLIP; inspect
# ---------------------------------------------------------------------------------------------
CALIBRATED = ("gptq_w4a16", "awq_w4a16")  # shipped recipes: GPTQ writes actorder "static"
# Bytes held by the language model's packed W4 g128 asym Linears over their bf16 weights: 4/16 for
# the codes, plus per group of 128 weights one bf16 scale and one 4-bit zero point
# ((2 + 0.5) / 128 / 2 = 0.0098), plus the bf16 bias of q/k/v (1/in_features <= 0.0078) and a
# 16-byte weight_shape per module: 0.26 here. 0.25 + 0.02 leaves no room for any dense copy.
W4_PACKED_BOUND = 4 / 16 + 0.02


@pytest.fixture(scope="module")
def calibrated(ckpts, tmp_path_factory):
    """gptq_w4a16 and awq_w4a16 checkpoints of the bf16 tiny LLaVA (2 calibration rows)."""
    from transformers import AutoProcessor

    from qvlm_modifiers import data

    base, _ = ckpts
    root = tmp_path_factory.mktemp("calibrated")
    processor = AutoProcessor.from_pretrained(base)
    out = {}
    for recipe in CALIBRATED:
        model = AutoModelForImageTextToText.from_pretrained(base)
        calib = data.build_calibration_dataset(zoo.sample_pairs(2), processor, model, num_samples=2)
        qvlm_modifiers.oneshot(model=model, processor=processor, dataset=calib, recipe=recipe,
                               num_calibration_samples=2, output_dir=root / recipe)
        out[recipe] = root / recipe
    return out


def _lm_linear_bytes_over_bf16(model) -> float:
    """Bytes held (parameters + buffers) by the Linears of the language model's decoder layers,
    over 2 bytes x the numel of their dense weights."""
    from qvlm_modifiers.families import get_family

    layers = get_family(model).layers + "."
    held = dense = 0
    for name, module in model.named_modules():
        if name.startswith(layers) and isinstance(module, (torch.nn.Linear, PackedLinear)):
            tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            held += sum(t.numel() * t.element_size() for t in tensors)
            dense += 2 * module.in_features * module.out_features
    assert dense
    return held / dense


@contextlib.contextmanager
def _loguru_lines():
    """What the packed loader logs (through loguru, like llm-compressor), with the level."""
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(f"| {m.record['level'].name} | {m.record['message']}"), level="INFO")
    try:
        yield lines
    finally:
        logger.remove(sink)


@pytest.mark.parametrize("recipe", CALIBRATED)
def test_gptq_and_awq_checkpoints_stay_packed_after_forward_and_generate(calibrated, inputs, recipe, caplog):
    ckpt = calibrated[recipe]
    weights = json.loads((ckpt / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert weights["actorder"] == ("static" if recipe.startswith("gptq") else None)
    with _loguru_lines() as lines:
        model = _load(ckpt)
    assert any("qvlm packed loader: 14 of 14 quantized Linears packed (W4 g128 asym); 0 left to transformers" in line
               and "| INFO" in line for line in lines), lines
    assert set(linear_status(model).values()) == {"packed"} and len(linear_status(model)) == 14
    with torch.no_grad():
        model(**inputs)
    model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert len(packed_loader.packed_modules(model)) == 14
    assert _lm_linear_bytes_over_bf16(model) <= W4_PACKED_BOUND

    # transformers' own loader (what happened to these checkpoints before "static" was accepted):
    # the whole model is decompressed on the first forward, dense weights held from then on
    with upstream_loading():
        upstream = _load(ckpt)
    assert _lm_linear_bytes_over_bf16(upstream) <= W4_PACKED_BOUND  # packed until the first forward
    with torch.no_grad():
        upstream(**inputs)
    assert _lm_linear_bytes_over_bf16(upstream) >= 1.0


def _with_group_act_order(src, dst, seed=0):
    """Copy of GPTQ checkpoint ``src`` as an act-order ``group`` checkpoint (older llm-compressor):
    ``actorder: group`` and, per quantized Linear, a ``weight_g_idx`` assigning each input column
    to a scale group (a random permutation of the contiguous assignment, group_size columns each)."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    weights = cfg["quantization_config"]["config_groups"]["group_0"]["weights"]
    weights["actorder"] = "group"
    (dst / "config.json").write_text(json.dumps(cfg))
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    gen = torch.Generator().manual_seed(seed)
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        prefix = key[: -len("weight_packed")]
        in_features = int(tensors[prefix + "weight_shape"][1])
        tensors[prefix + "weight_g_idx"] = (torch.randperm(in_features, generator=gen) // weights["group_size"]).int()
    save_file(tensors, str(dst / "model.safetensors"), metadata=metadata)
    return dst


def _dequantize_with_g_idx(state, module):
    """W[:, j] = (q[:, j] - z[:, g]) * s[:, g] with g = weight_g_idx[j], written group by group
    (independent of the loader's gather)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    n, k = module.weight.shape
    q = unpack_from_int32(state["weight_packed"], 4, torch.Size((n, k))).float()
    scale = state["weight_scale"].float()
    zp = unpack_from_int32(state["weight_zero_point"], 4, torch.Size((n, scale.shape[1])), packed_dim=0)
    g_idx = state["weight_g_idx"]
    w = torch.empty(n, k)
    for g in range(scale.shape[1]):
        cols = (g_idx == g).nonzero().flatten()
        w[:, cols] = (q[:, cols] - zp[:, g : g + 1].float()) * scale[:, g : g + 1]
    return w


def test_group_act_order_checkpoint_loads_packed_with_its_index(ckpts, calibrated, inputs, tmp_path, caplog, monkeypatch):
    """compressed-tensors 0.19 refuses ``actorder: group`` outright, so transformers cannot load
    such a checkpoint and there is no upstream result to compare with: the reference is the
    dequantization with the index, written independently."""
    from qvlm_modifiers.errors import CheckpointError
    from qvlm_modifiers.kernels import dispatch

    base, _ = ckpts
    ckpt = _with_group_act_order(calibrated["gptq_w4a16"], tmp_path / "group")
    with upstream_loading(), pytest.raises(Exception, match="actorder='group' has been removed"):
        AutoModelForImageTextToText.from_pretrained(ckpt)

    with _loguru_lines() as lines:
        model = _load(ckpt)  # no missing / unexpected key: the index was loaded
    assert any("14 with a GPTQ act-order index (weight_g_idx) run dequantize + matmul per call" in line
               and "| WARNING" in line for line in lines), lines
    assert set(linear_status(model).values()) == {"packed, act-order index"}
    reference = _reference_model(base, ckpt, _dequantize_with_g_idx)
    with torch.no_grad():
        logits = model(**inputs).logits
        assert torch.equal(logits, reference(**inputs).logits)
        # the index matters: the same codes read without it (the static checkpoint) give other logits
        assert not torch.equal(logits, _reference_model(base, calibrated["gptq_w4a16"])(**inputs).logits)
        # no Triton kernel takes the index: forced "triton" still runs the reference path
        monkeypatch.setattr(dispatch, "packed_linear", lambda *a, **k: pytest.fail("Triton kernel called"))
        packed_loader.set_backend(model, "triton")
        assert torch.equal(model(**inputs).logits, logits)
    gen = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(gen, reference.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False))

    # a resave keeps the act-order and the index
    model.save_pretrained(tmp_path / "resaved")
    weights = json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]
    assert weights["config_groups"]["group_0"]["weights"]["actorder"] == "group"
    with torch.no_grad():
        assert torch.equal(_load(tmp_path / "resaved")(**inputs).logits, logits)

    # transformers' own dequantization would ignore the index: refused, naming the reason
    monkeypatch.setenv(packed_loader.ENV_KERNELS, "0")
    with pytest.raises(CheckpointError, match="weight_g_idx"):
        AutoModelForImageTextToText.from_pretrained(ckpt)


def test_packed_siglip_tower_reloads_and_missing_tensors_stay_reported(tmp_path):
    """The init workaround lets a packed SigLIP tower reload, but hides nothing: tensors removed
    from the checkpoint are reported missing, and a missing bias is initialized as usual."""
    from safetensors.torch import save_file

    model, processor = zoo.build("llava_onevision")
    model.get_submodule("model.vision_tower.encoder.layers.0.self_attn.q_proj").bias.data.fill_(0.5)  # zoo: zeros
    ckpt = qvlm_modifiers.save_pretrained(
        qvlm_modifiers.oneshot(model=model, processor=processor, recipe="rtn_w4a16_vision"), processor, tmp_path / "c"
    )
    with upstream_loading(), pytest.raises(AttributeError, match="has no attribute 'weight'"):
        AutoModelForImageTextToText.from_pretrained(ckpt)  # plain transformers: SigLIP's _init_weights
    reloaded = _load(ckpt)
    assert any(n.startswith("model.vision_tower.") for n in packed_loader.packed_modules(reloaded))
    assert not any("_qvlm_init_placeholder" in m.__dict__ for m in reloaded.modules())  # placeholders removed

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    dropped = ["vision_tower.encoder.layers.0.self_attn.q_proj.bias", "vision_tower.encoder.layers.0.mlp.fc1.weight_packed"]
    assert torch.equal(tensors[dropped[0]], torch.full_like(tensors[dropped[0]], 0.5))
    save_file({k: v for k, v in tensors.items() if k not in dropped}, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    reloaded, info = AutoModelForImageTextToText.from_pretrained(ckpt, output_loading_info=True)
    assert {"model." + k for k in dropped} <= set(info["missing_keys"]), info["missing_keys"]
    assert torch.equal(reloaded.get_submodule("model.vision_tower.encoder.layers.0.self_attn.q_proj").bias,
                       torch.zeros(tensors[dropped[0]].shape))  # SiglipAttention's init zeroes a missing bias


def test_init_workaround_warns_outside_the_transformers_versions_it_was_written_for(monkeypatch, caplog):
    import transformers

    for version, warns in (("5.17.0", False), ("5.15.2", False), ("5.18.0", True), ("4.57.1", True)):
        monkeypatch.setattr(transformers, "__version__", version)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="qvlm_modifiers.upstream"):
            assert upstream.skip_init_of_compressed_linears(torch.nn.Linear(2, 2)) == []
        assert ("written for transformers 5.15-5.17" in caplog.text) == warns, version


def test_inspect_says_which_linears_run_packed(ckpts, calibrated, tmp_path, capsys):
    """``qvlm inspect`` reads it from config.json (no weights loaded) and agrees with the load."""
    from qvlm_modifiers.cli import main
    from qvlm_modifiers.inspect_ckpt import inspect_checkpoint

    base, _ = ckpts
    checkpoints = {
        "gptq": calibrated["gptq_w4a16"],
        "group": _with_group_act_order(calibrated["gptq_w4a16"], tmp_path / "group"),
        "w8a8": _quantize(base, tmp_path / "w8a8", "W8A8"),
    }
    expected = {"gptq": "packed", "group": "packed, act-order index",
                "w8a8": "transformers: activations quantized too (W8A8): no packed kernel"}
    for name, ckpt in checkpoints.items():
        report = inspect_checkpoint(ckpt)
        quantized = [m for m in report.modules if m.loader]
        assert len(quantized) == 14 and {m.loader for m in quantized} == {expected[name]}, name
        assert set(linear_status(_load(ckpt)).values()) == {expected[name]}, name
    assert main(["inspect", str(checkpoints["w8a8"]), "--no-reload"]) == 0
    out = capsys.readouterr().out
    assert "0 of 14 quantized Linears packed; 14 left to transformers" in out
    assert "not packed: language_model.model.layers.0.mlp.down_proj (activations quantized too (W8A8)" in out
    assert main(["inspect", str(checkpoints["gptq"]), "--all", "--no-reload"]) == 0
    out = capsys.readouterr().out
    assert "with import qvlm_modifiers: 14 of 14 quantized Linears packed; 0 left to transformers" in out
    assert out.count("-> packed") == 14
