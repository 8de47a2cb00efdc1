"""Shipped baseline recipes (everything in recipes/ except mbq_*/qvlm_*) and recipe validation.

* every baseline recipe has a header, parses through :func:`qvlm_modifiers.load_recipe`, is found
  by :func:`qvlm_modifiers.recipe_path`, keeps (or, for ``*_vision``, quantizes) the vision tower
  of every family, and runs end to end on at least one family (the exact round trip in
  ``test_roundtrip.py`` or the vision-variant run below);
* every ``*_vision`` recipe on every family reloads through plain
  ``AutoModelForImageTextToText.from_pretrained`` with the in-memory quantized model's logits,
  with ``import qvlm_modifiers``'s loader always, and with transformers' own loader except where a
  packed SigLIP tower makes that impossible (:data:`NEEDS_QVLM_IMPORT`, shown to fail);
* LM-scoped AWQ/SmoothQuant mappings resolve inside the decoder layers only, for every family;
* AWQ on CPU-only PyTorch fails upstream in ``pin_memory`` and works with our mixin;
* ``load_recipe`` errors: missing file, not YAML, no Modifier, unknown Modifier, unknown field,
  bad value, unsupported bits.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from transformers import AutoModelForImageTextToText
from compressed_tensors.utils.match import is_match, match_modules_set

import qvlm_modifiers
from qvlm_modifiers import data
from qvlm_modifiers.testing import zoo
from qvlm_modifiers.errors import RecipeError
from qvlm_modifiers.families import get_family

from qvlm_modifiers.packed_loader import PackedLinear, linear_status
from qvlm_modifiers.upstream import upstream_loading

from test_roundtrip import LOGITS_ATOL, ROUNDTRIP_RECIPES, ROUNDTRIP_SCHEMES, _image_text_batch

BASELINES = sorted(
    name for name in qvlm_modifiers.list_recipes() if not name.startswith(("mbq_", "qvlm_"))
)
EXPECTED_BASELINES = {
    "rtn_w4a16", "rtn_w4a16_sym", "gptq_w4a16", "awq_w4a16", "rtn_w3a16", "gptq_w3a16", "w8a8",
    "smoothquant_gptq_w8a8", "smoothquant_gptq_w4a8", "rtn_w4a16_vision", "w8a8_vision",
}
#: vision variants, run here on every family (the others run in test_roundtrip.py)
VISION_RECIPES = [name for name in BASELINES if name.endswith("_vision")]
VISION_RUNS = [(name, family) for name in VISION_RECIPES for family in zoo.FAMILY_NAMES]
#: checkpoints that plain transformers (no ``import qvlm_modifiers``) cannot reload: packed int4
#: SigLIP Linears, whose missing ``.weight`` SiglipPreTrainedModel._init_weights reads
NEEDS_QVLM_IMPORT = {("rtn_w4a16_vision", "llava_onevision"), ("rtn_w4a16_vision", "gemma3")}


def _quant_ignore(recipe) -> list[str]:
    from llmcompressor.modifiers.quantization import QuantizationMixin

    ignores = [m.ignore for m in recipe.modifiers if isinstance(m, QuantizationMixin)]
    assert len(ignores) == 1
    return ignores[0]


def test_all_baselines_shipped_and_covered():
    assert EXPECTED_BASELINES <= set(BASELINES)
    run = set(ROUNDTRIP_SCHEMES) | {r for r, _ in ROUNDTRIP_RECIPES} | {r for r, _ in VISION_RUNS}
    assert set(BASELINES) <= run, f"recipes never run end to end: {set(BASELINES) - run}"


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_header_and_parse(name):
    path = qvlm_modifiers.recipe_path(name)
    assert qvlm_modifiers.recipe_path(str(path)) == path
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ") and len(lines[0]) > 20  # one-line description (CLI lists it)
    assert lines[1].startswith("# ")  # what it does
    recipe = qvlm_modifiers.load_recipe(name)
    assert recipe.modifiers
    assert "lm_head" in _quant_ignore(recipe)


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("family", zoo.FAMILY_NAMES)
def test_ignore_covers_every_family(name, family):
    """Vision tower (unless *_vision), projector and lm_head are ignored, decoder layers are not."""
    model, _ = zoo.build(family)
    fam = get_family(model)
    ignore = _quant_ignore(qvlm_modifiers.load_recipe(name))
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for n, m in linears:
        ignored = is_match(n, m, ignore)
        if n.startswith(fam.projector + ".") or n == "lm_head":
            assert ignored, f"{name}: {n} would be quantized"
        elif n.startswith(fam.vision_tower + "."):
            if name.endswith("_vision"):
                is_pooling_head = ".head." in n
                assert ignored == is_pooling_head, f"{name}: vision Linear {n} ignored={ignored}"
            else:
                assert ignored, f"{name}: vision Linear {n} would be quantized"
        elif n.startswith(fam.layers + "."):
            assert not ignored, f"{name}: decoder Linear {n} would stay unquantized"


def _check_reloads(out, fam, projector, batch, quant_logits, packed_vision=True,
                   loaders=("qvlm_modifiers", "transformers")):
    """Reload ``out`` through plain ``from_pretrained`` with the packed loader and/or transformers'
    own: nothing missing, vision tower quantized, projector untouched, in-memory model's logits."""
    for loader in loaders:
        with upstream_loading() if loader == "transformers" else contextlib.nullcontext():
            reloaded, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], (loader, info)
        quantized = [
            n for n, m in reloaded.named_modules() if hasattr(m, "quantization_scheme") or isinstance(m, PackedLinear)
        ]
        assert any(n.startswith(fam.vision_tower + ".") for n in quantized), loader
        assert not any(n.startswith(fam.projector + ".") for n in quantized), loader
        if loader == "qvlm_modifiers":
            status = linear_status(reloaded)
            assert status and set(status) == set(quantized)
            if packed_vision:  # every quantized Linear, vision tower included, runs packed
                assert set(status.values()) == {"packed"}, status
            else:  # W8A8: int8 weights + activations, left to transformers, and said so
                assert all(v.startswith("transformers: activations quantized") for v in status.values()), status
        reloaded.eval()
        with torch.no_grad():
            logits = reloaded(**batch).logits
        torch.testing.assert_close(logits, quant_logits, atol=LOGITS_ATOL, rtol=0, msg=loader)
        state = reloaded.state_dict()
        assert all(torch.equal(state[k], v) for k, v in projector.items()), loader


@pytest.mark.parametrize("name,family", VISION_RUNS)
def test_vision_variant_quantizes_vision_tower_and_reloads(name, family, tmp_path, caplog):
    """Every family x every *_vision recipe: our save, plain from_pretrained, in-memory logits."""
    torch.manual_seed(0)
    model, processor = zoo.build(family)
    model.eval()
    fam = get_family(model)
    projector = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(fam.projector + ".")}
    assert projector
    _, batch = _image_text_batch(processor, model, zoo.sample_pairs(1))
    with caplog.at_level(logging.WARNING, logger="qvlm_modifiers.api"):
        qvlm_modifiers.oneshot(model=model, processor=processor, recipe=name)
    needs_import = (name, family) in NEEDS_QVLM_IMPORT
    assert ("only after `import qvlm_modifiers`" in caplog.text) == needs_import
    with torch.no_grad():  # the in-memory quantized model (weights fake-quantized on the fly)
        quant_logits = model(**batch).logits
    out = qvlm_modifiers.save_pretrained(model, processor, tmp_path / "out")
    if needs_import:
        # plain transformers 5.17 cannot reload it, hence the README's "needs import qvlm_modifiers"
        with upstream_loading(), pytest.raises(AttributeError, match="has no attribute 'weight'"):
            AutoModelForImageTextToText.from_pretrained(out)
    _check_reloads(out, fam, projector, batch, quant_logits, packed_vision=name == "rtn_w4a16_vision",
                   loaders=("qvlm_modifiers",) if needs_import else ("qvlm_modifiers", "transformers"))


def test_llmcompressor_save_of_packed_siglip_tower_reloads(saved_vlm, tmp_path):
    """llm-compressor's own ``oneshot`` + ``model.save_pretrained(save_compressed=True)`` (with
    ``import qvlm_modifiers``): the packed SigLIP tower reloads through the packed loader."""
    from llmcompressor import oneshot
    from transformers import AutoProcessor

    path = saved_vlm("gemma3")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    _, batch = _image_text_batch(processor, model, zoo.sample_pairs(1))
    oneshot(model=model, processor=processor, recipe=str(qvlm_modifiers.recipe_path("rtn_w4a16_vision")))
    with torch.no_grad():
        quant_logits = model(**batch).logits
    model.save_pretrained(tmp_path / "out", save_compressed=True)
    fam = get_family(model)
    _check_reloads(tmp_path / "out", fam, {}, batch, quant_logits, loaders=("qvlm_modifiers",))


# ---------------------------------------------------------------------------- LM-scoped mappings
@pytest.mark.parametrize("family", zoo.FAMILY_NAMES)
def test_smoothquant_mappings_stay_in_decoder_layers(family):
    from qvlm_modifiers.lm_scoped import LMSmoothQuantModifier

    model, _ = zoo.build(family)
    fam = get_family(model)
    modifier = LMSmoothQuantModifier(smoothing_strength=0.8)
    modifier.mappings = modifier._infer_mappings_from_model(model)
    resolved = modifier._resolve_mappings(model)
    num_layers = len(model.get_submodule(fam.layers))
    names = {m: n for n, m in model.named_modules()}
    assert len(resolved) == 2 * num_layers
    for mapping in resolved:
        assert mapping.smooth_name.startswith(fam.layers + ".")
        assert all(names[b].startswith(fam.layers + ".") for b in mapping.balance_layers)
    mlp_norms = {
        m.smooth_name.rsplit(".", 1)[1] for m in resolved if names[m.balance_layers[0]].endswith("gate_proj")
    }
    assert mlp_norms == ({"pre_feedforward_layernorm"} if family == "gemma3" else {"post_attention_layernorm"})


@pytest.mark.parametrize("family", zoo.FAMILY_NAMES)
def test_awq_mappings_scoped_to_decoder_layers(family):
    from llmcompressor.modifiers.transform.awq.dynamic_mappings import get_layer_mappings_from_model

    from qvlm_modifiers.lm_scoped import scope_awq_mappings

    model, _ = zoo.build(family)
    fam = get_family(model)
    mappings = scope_awq_mappings(get_layer_mappings_from_model(model), fam.layers)
    num_layers = len(model.get_submodule(fam.layers))
    names = {m: n for n, m in model.named_modules()}
    for mapping in mappings:
        groups = list(match_modules_set(model, (mapping.smooth_layer, *mapping.balance_layers)))
        assert len(groups) == num_layers, mapping
        for group in groups:
            for modules in group:
                assert len(modules) == 1 and names[modules[0]].startswith(fam.layers + ".")


def test_unscoped_awq_mappings_hit_the_vision_tower():
    """Why LMAWQModifier exists: the default regexes also match CLIP's q/k/v projections."""
    from llmcompressor.modifiers.transform.awq.dynamic_mappings import get_layer_mappings_from_model

    model, _ = zoo.build("llava")
    first = get_layer_mappings_from_model(model)[0]
    hits = [n for n, m in model.named_modules() if is_match(n, m, first.balance_layers)]
    assert any(n.startswith("model.vision_tower.") for n in hits)


@pytest.mark.skipif(torch.accelerator.is_available(), reason="pin_memory only fails without an accelerator")
def test_awq_cpu_fix_is_needed(calib_pairs):
    """Upstream AWQModifier (same LM-scoped mappings) fails on CPU-only torch in pin_memory.
    That the mixin is sufficient is shown by the awq_w4a16 round trip in test_roundtrip.py,
    which runs LMAWQModifier on CPU."""
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from llmcompressor.modifiers.transform.awq.dynamic_mappings import get_layer_mappings_from_model

    from qvlm_modifiers.upstream import PinSafeIntermediatesCache
    from qvlm_modifiers.lm_scoped import LMAWQModifier, scope_awq_mappings

    model, processor = zoo.build("llava")
    ds = data.build_calibration_dataset(calib_pairs, processor, model, num_samples=2)
    scoped = scope_awq_mappings(get_layer_mappings_from_model(model), "model.language_model.layers")
    quant = QuantizationModifier(
        targets="Linear",
        scheme="W4A16_ASYM",
        ignore=["lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"],
    )
    with pytest.raises(RuntimeError, match="accelerator"):
        qvlm_modifiers.oneshot(
            model=model, processor=processor, dataset=ds, recipe=[AWQModifier(mappings=scoped), quant],
            num_calibration_samples=2,
        )
    assert issubclass(LMAWQModifier, AWQModifier)
    cache = PinSafeIntermediatesCache(None, None)
    cache.append({"x": torch.zeros(2)})
    cache.pin_memory(0)  # no-op instead of the RuntimeError above
    assert not cache.fetch(0)["x"].is_pinned()


# ---------------------------------------------------------------------------- load_recipe errors
def _write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_missing_recipe(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        qvlm_modifiers.load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="Shipped recipes: .*gptq_w4a16"):
        qvlm_modifiers.load_recipe("no_such_recipe")


def test_not_yaml(tmp_path):
    path = _write(tmp_path, "quant_stage:\n  quant_modifiers: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML at line"):
        qvlm_modifiers.load_recipe(path)
    with pytest.raises(RecipeError, match="not a YAML mapping"):
        qvlm_modifiers.load_recipe(_write(tmp_path, "- a\n- b\n", "list.yaml"))
    with pytest.raises(RecipeError, match="contains no Modifier"):
        qvlm_modifiers.load_recipe(_write(tmp_path, "foo: 1\n", "empty.yaml"))


def test_unknown_modifier(tmp_path):
    path = _write(tmp_path, "quant_stage:\n  quant_modifiers:\n    GPTQModifer:\n      scheme: W4A16\n")
    with pytest.raises(RecipeError) as err:
        qvlm_modifiers.load_recipe(path)
    msg = str(err.value)
    assert "'GPTQModifer'" in msg and "GPTQModifier" in msg  # close match suggested
    assert "import qvlm_modifiers" in msg and "LMAWQModifier" in msg and "MBQModifier" in msg


def test_unknown_field(tmp_path):
    path = _write(
        tmp_path,
        "quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      targets: [Linear]\n"
        "      scheme: W4A16\n      ignroe: [lm_head]\n",
    )
    with pytest.raises(RecipeError) as err:
        qvlm_modifiers.load_recipe(path)
    msg = str(err.value)
    assert "no field 'ignroe'" in msg and "Did you mean 'ignore'" in msg
    assert "Valid fields of QuantizationModifier" in msg and "config_groups" in msg


def test_unknown_field_on_our_modifier(tmp_path):
    path = _write(
        tmp_path,
        "quant_stage:\n  quant_modifiers:\n    LMAWQModifier:\n      grid: 10\n"
        "    QuantizationModifier:\n      scheme: W4A16\n",
    )
    with pytest.raises(RecipeError, match="LMAWQModifier has no field 'grid'.*n_grid"):
        qvlm_modifiers.load_recipe(path)


def test_modifier_without_arguments_and_bad_order(tmp_path):
    path = _write(tmp_path, "quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n")
    with pytest.raises(RecipeError, match=r"GPTQModifier: \{\}"):
        qvlm_modifiers.load_recipe(path)
    # llm-compressor's own rule: AWQ must be followed by a quantization modifier
    path = _write(tmp_path, "quant_stage:\n  quant_modifiers:\n    LMAWQModifier: {}\n", "awq.yaml")
    with pytest.raises(RecipeError, match="subsequent quantization modifier"):
        qvlm_modifiers.load_recipe(path)


def test_invalid_value(tmp_path):
    path = _write(tmp_path, "quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      scheme: W4A16\n      block_size: lots\n")
    with pytest.raises(RecipeError, match="block_size"):
        qvlm_modifiers.load_recipe(path)


@pytest.mark.parametrize(
    "weights,acts,expected",
    [
        ("{num_bits: 1, type: int, symmetric: true, strategy: channel}", None, "1-bit integer weights"),
        ("{num_bits: 16, type: int, symmetric: true, strategy: channel}", None, "16-bit integer weights"),
        (
            "{num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 128}",
            "{num_bits: 4, type: int, symmetric: true, strategy: token, dynamic: true}",
            "4-bit input activations",
        ),
    ],
)
def test_unsupported_bits(tmp_path, weights, acts, expected):
    text = (
        "quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n      config_groups:\n"
        f"        group_0:\n          targets: [Linear]\n          weights: {weights}\n"
    )
    if acts:
        text += f"          input_activations: {acts}\n"
    with pytest.raises(RecipeError, match=expected):
        qvlm_modifiers.load_recipe(_write(tmp_path, text))



@pytest.mark.parametrize("dynamic,strategy", [(True, "token"), (False, "tensor")])
@pytest.mark.parametrize("modifier,accepted", [("QVLMModifier", True), ("QuantizationModifier", False)])
def test_simulated_activation_widths_only_for_the_modifier_that_simulates_them(tmp_path, dynamic, strategy, modifier, accepted):
    """W6A6 (the paper's setting) runs as fake-quant simulation: QVLMModifier declares 4/6-bit input
    activations, dynamic per token or static per tensor (the range its search chooses); a Modifier
    that does not declare them is refused with the supported widths."""
    text = (
        f"quant_stage:\n  quant_modifiers:\n    {modifier}:\n      config_groups:\n"
        "        group_0:\n          targets: [Linear]\n"
        "          weights: {num_bits: 6, type: int, symmetric: false, strategy: channel}\n"
        f"          input_activations: {{num_bits: 6, type: int, symmetric: false, strategy: {strategy}, "
        f"dynamic: {str(dynamic).lower()}}}\n"
    )
    if accepted:
        qvlm_modifiers.load_recipe(_write(tmp_path, text))
    else:
        with pytest.raises(RecipeError, match="6-bit input activations are not supported"):
            qvlm_modifiers.load_recipe(_write(tmp_path, text))
