"""Does GPTQ rounding inside Q-VLM's searched ranges help? A small CPU measurement.

``python eval/measure_qvlm_gptq.py [--rows 8] [--layers 4]``

``python eval/measure_qvlm_gptq.py --block-vs-layerwise --layers 6 --rows 4 --epochs 10``
instead prints, per 3-layer block, the Eq. 3 block-output MSE of the layer-wise (Eq. 2) solution
and of the joint block search started from it.

Builds the zoo's tiny LLaVA with ``--layers`` decoder layers, calibrates ``QVLMModifier`` on
``--rows`` synthetic pairs for a few schemes, with ``gptq_rounding`` off and on, and prints per
block (with ``gptq_rounding``) the block objective on the guard's held-out rows of GPTQ inside the
searched ranges vs GPTQ inside min/max ranges and which one the guard kept, plus the held-out logit MSE against the FP
model with and without GPTQ rounding (``--rows`` other pairs).
Random-weight tiny models only: a plumbing-level indication, not evidence for a real model. (Lived in
the package as ``qvlm_modifiers.qvlm.measure_gptq``; it builds the test zoo's models, so it is an
evaluation script, not product code.)
"""

from __future__ import annotations

import argparse
import tempfile

import torch


def _build(layers: int, path: str):
    from qvlm_modifiers.testing import zoo

    zoo.save("llava", path, seed=0, num_layers=layers)


def _logits(model, rows):
    from qvlm_modifiers import data

    outs = []
    with torch.no_grad():
        for i in range(len(rows)):
            batch = data.collate_fn([rows[i]])
            batch.pop("loss_mask", None)
            outs.append(model(**batch).logits.float())
    return outs


SCHEMES = {
    "W4A16-g128": {"weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 128}},
    "W3A16-channel": {"weights": {"num_bits": 3, "type": "int", "symmetric": False, "strategy": "channel"}},
    "W4A4-token": {
        "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "channel"},
        "input_activations": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "token", "dynamic": True},
    },
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--block-vs-layerwise", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.block_vs_layerwise:
        return block_vs_layerwise(args)

    from transformers import AutoModelForImageTextToText, AutoProcessor

    import qvlm_modifiers
    from qvlm_modifiers import data
    from qvlm_modifiers.testing import zoo
    from qvlm_modifiers.qvlm import QVLMModifier

    path = tempfile.mkdtemp(prefix="qvlm-gptq-")
    _build(args.layers, path)
    processor = AutoProcessor.from_pretrained(path)
    fp = AutoModelForImageTextToText.from_pretrained(path)
    pairs = zoo.sample_pairs(2 * args.rows, seed=0)
    calib = data.build_calibration_dataset(pairs.select(range(args.rows)), processor, fp, prompt_column="question")
    held = data.build_calibration_dataset(pairs.select(range(args.rows, 2 * args.rows)), processor, fp, prompt_column="question")
    ref = _logits(fp, held)
    print(f"tiny LLaVA, {args.layers} decoder layers, {args.rows} calibration + {args.rows} held-out rows")
    print(f"{'scheme':14s} {'block':10s} {'searched+GPTQ':>14s} {'min/max+GPTQ':>13s}  winner   | held-out logit MSE: RTN / with gptq_rounding")
    for name, group in SCHEMES.items():
        held_mse = {}
        records = None
        for gptq in (False, True):
            model = AutoModelForImageTextToText.from_pretrained(path)
            modifier = QVLMModifier(
                config_groups={"g": {"targets": ["Linear"], **group}}, search_epochs=args.epochs,
                entropy_threshold=-1.0, gptq_rounding=gptq,
            )
            qvlm_modifiers.oneshot(model, processor=processor, dataset=calib, recipe=modifier,
                                   num_calibration_samples=len(calib), shuffle_calibration_samples=False)
            out = _logits(model, held)
            held_mse[gptq] = sum((a - b).pow(2).mean().item() for a, b in zip(out, ref)) / len(ref)
            if gptq:
                records = model.config.qvlm_blocks["block_losses"]
        for i, rec in enumerate(records):
            tail = f"| {held_mse[False]:.3e} / {held_mse[True]:.3e}" if i == 0 else ""
            guard = rec["guard"]  # the held-out guard (issue #24): searched ranges vs min/max, GPTQ in both
            print(f"{name:14s} {str(rec['layers']):10s} {guard['holdout_loss_searched']:14.4e} {guard['holdout_loss_rtn']:13.4e}  "
                  f"{guard['winner']:8s} {tail}")


def block_vs_layerwise(args) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import qvlm_modifiers
    from qvlm_modifiers import data
    from qvlm_modifiers.testing import zoo
    from qvlm_modifiers.qvlm import QVLMModifier

    path = tempfile.mkdtemp(prefix="qvlm-block-")
    _build(args.layers, path)
    processor = AutoProcessor.from_pretrained(path)
    print(f"tiny LLaVA, {args.layers} decoder layers, {args.rows} calibration rows, blocks of 3 (h0 = -1)")
    for name, group in SCHEMES.items():
        model = AutoModelForImageTextToText.from_pretrained(path)
        rows = data.build_calibration_dataset(zoo.sample_pairs(args.rows), processor, model, prompt_column="question")
        modifier = QVLMModifier(config_groups={"g": {"targets": ["Linear"], **group}}, entropy_threshold=-1.0,
                                search_epochs=args.epochs)
        qvlm_modifiers.oneshot(model, processor=processor, dataset=rows, recipe=modifier,
                               num_calibration_samples=len(rows), shuffle_calibration_samples=False)
        for rec in model.config.qvlm_blocks["block_losses"]:
            ratio = rec["search_loss"] / rec["layerwise_loss"]
            print(f"{name:14s} {str(rec['layers']):10s} layer-wise {rec['layerwise_loss']:.4e}  "
                  f"block {rec['search_loss']:.4e}  ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
