"""The ``qvlm`` command line: quantize, evaluate, list recipes, inspect checkpoints, benchmark.

::

    qvlm quantize MODEL --recipe R --dataset D --num-samples N --output OUT
    qvlm eval CKPT --dataset D [--reference MODEL]
    qvlm recipes
    qvlm inspect CKPT [--all] [--no-reload] [--json]
    qvlm bench {kernels,e2e,memory} [ARGS...]

Every user-facing failure is a :class:`~qvlm_modifiers.errors.QVLMError`; :func:`main` prints its
message (which names the problem and the fix) and returns its exit code (2) instead of a traceback.
``quantize`` checks everything it can (output directory, recipe, model files, processor, data)
*before* loading weights, and writes the checkpoint atomically (temporary sibling directory,
renamed at the end, via :func:`qvlm_modifiers.save.save_pretrained`), so a failure or a kill
never leaves a half-written output directory.

Modules: :mod:`~qvlm_modifiers.cli.parser` (arguments), :mod:`~qvlm_modifiers.cli.commands` (the
five commands), :mod:`~qvlm_modifiers.cli.checks` (every input check, run before any weight is
loaded), :mod:`~qvlm_modifiers.cli.loading` (model loading and disk offload),
:mod:`~qvlm_modifiers.cli.record` (output folder and ``qvlm_run.json``),
:mod:`~qvlm_modifiers.cli.logs` (logging, progress bars).
"""

from __future__ import annotations

import sys
from typing import Sequence

from qvlm_modifiers.cli.checks import UsageError
from qvlm_modifiers.cli.commands import recipe_description
from qvlm_modifiers.cli.loading import disk_offloaded_tensors
from qvlm_modifiers.cli.logs import close_logging, log, progress_bars, setup_logging
from qvlm_modifiers.cli.parser import build_parser
from qvlm_modifiers.cli.record import RUN_RECORD_NAME
from qvlm_modifiers.errors import QVLMError

__all__ = ["main", "build_parser", "RUN_RECORD_NAME", "UsageError", "recipe_description", "disk_offloaded_tensors"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qvlm`` console script; returns the exit code.

    0 success; 1 an inspected checkpoint does not reload exactly, or an unexpected error;
    2 bad input (any :class:`QVLMError`, or a usage error); 130 interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), message already printed
        return int(exc.code or 0)
    args._argv = argv
    try:
        setup_logging(args.quiet, args.log_file)
    except QVLMError as err:
        print(f"qvlm: error: {err}", file=sys.stderr)
        return err.exit_code
    try:
        import qvlm_modifiers  # noqa: F401 - registers our Modifiers before a recipe is parsed

        with progress_bars(not args.quiet):
            return int(args.func(args) or 0)
    except QVLMError as err:
        log.debug("%s", err, exc_info=True)  # traceback only in --log-file
        print(f"qvlm: error: {err}", file=sys.stderr)
        if args.debug:
            raise
        return err.exit_code
    except KeyboardInterrupt:
        print("qvlm: interrupted; no output directory was committed.", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the last line of defence: a message, not a traceback
        log.debug("unexpected error", exc_info=True)
        if args.debug:
            raise
        print(
            f"qvlm: internal error: {type(err).__name__}: {err}\nThis is a bug in qvlm or an unsupported setup; "
            "rerun with --debug for the traceback (or --log-file PATH to record it) and report it.",
            file=sys.stderr,
        )
        return 1
    finally:
        close_logging()
