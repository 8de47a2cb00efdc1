"""The ``qvlm`` argument parser: commands, their options and help texts.

``--quiet``, ``--log-file`` and ``--debug`` are accepted before or after the command name
(``qvlm -q recipes`` and ``qvlm recipes -q``): the sub-parsers repeat them with a suppressed
default, so a value given before the command is not reset by the sub-parser.
"""

from __future__ import annotations

import argparse

from qvlm_modifiers.cli.commands import cmd_bench, cmd_eval, cmd_inspect, cmd_quantize, cmd_recipes

__all__ = ["build_parser"]


def _common_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="only warnings, errors and the final summary line; no progress bars")
    parser.add_argument("--log-file", default=default, metavar="PATH",
                        help="also write a detailed log (DEBUG, incl. llm-compressor's) to PATH")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS if suppress else False,
                        help="show the full traceback of unexpected errors")


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, metavar="D",
                   help="a Dataset.save_to_disk folder, a folder of images with captions.jsonl/captions.tsv, "
                        "or a hub dataset name (image + text columns)")
    p.add_argument("--num-samples", type=int, required=True, metavar="N", help="number of image-text pairs to use")
    p.add_argument("--image-column", default="image", help="column with the images (default: image)")
    p.add_argument("--text-column", default="text", help="column with the caption/answer (default: text)")
    p.add_argument("--prompt-column", default=None,
                   help="column with the question/prompt (default: 'question' when present, else none)")
    p.add_argument("--max-seq-length", type=int, default=None, metavar="L", help="truncate longer rows")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom model code from the model's repository (off by default)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``qvlm`` command line; each command sets ``func`` to its ``cmd_*``."""
    parser = argparse.ArgumentParser(
        prog="qvlm", description="Quantize vision-language models with MBQ / Q-VLM / llm-compressor recipes.")
    _common_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("quantize", help="quantize a VLM with a recipe and save a compressed-tensors checkpoint")
    _common_options(p, suppress=True)
    p.add_argument("model", metavar="MODEL", help="local model directory or hub id")
    p.add_argument("--recipe", required=True, metavar="R", help="recipe YAML path or shipped recipe name (qvlm recipes)")
    _data_options(p)
    p.add_argument("--output", required=True, metavar="OUT", help="output directory (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    p.add_argument("--device-map", default=None,
                   help="how to place the model while calibrating: cpu (default), auto_offload (CPU, then disk), "
                        "or any transformers device_map; the sequential pipeline onloads one layer at a time")
    p.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="offload weights that do not fit in CPU memory to a fresh folder in DIR, removed at the end "
                        "(implies --device-map auto_offload)")
    p.add_argument("--max-cpu-memory", default=None, metavar="SIZE",
                   help="CPU memory the weights may use with --offload-dir, e.g. 40GiB; the rest goes to disk "
                        "(default: what is free)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="answer-token NLL of a checkpoint on image-text pairs (vs a reference)")
    _common_options(p, suppress=True)
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory (or hub id)")
    _data_options(p)
    p.add_argument("--reference", default=None, metavar="MODEL",
                   help="unquantized model to compare with (KL, top-1 agreement)")
    p.add_argument("--json-out", default=None, metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("recipes", help="list the shipped recipes")
    _common_options(p, suppress=True)
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("inspect", help="schemes, ignored modules, bits, size and reload check of a checkpoint")
    _common_options(p, suppress=True)
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--all", action="store_true", help="list every module")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-reload", action="store_true", help="skip the transformers reload check")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="run a benchmark script (kernels, e2e, memory); extra args are passed on")
    _common_options(p, suppress=True)
    p.add_argument("which", choices=["kernels", "e2e", "memory"])
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    p.set_defaults(func=cmd_bench)
    return parser
