"""What the ``qvlm`` commands print while they run: log handlers, progress bars, sizes.

Three loggers reach the terminal during a run: ours (``qvlm``, stdlib logging), transformers' (stdlib)
and llm-compressor's / compressed-tensors' (loguru). :func:`setup_logging` gives all three the same
levels, so ``--quiet`` and ``--log-file`` mean the same for each. :func:`progress_bars` silences every
tqdm bar for ``--quiet``, including the bars of libraries that create their own.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Iterator

from qvlm_modifiers.cli.checks import UsageError

__all__ = ["log", "setup_logging", "close_logging", "progress_bars", "human_bytes"]

#: the CLI's own logger: INFO lines on stderr, the summary line goes to stdout with ``print``
log = logging.getLogger("qvlm")


def setup_logging(quiet: bool, log_file: str | None) -> list[logging.Handler]:
    """Console handler (INFO, WARNING with --quiet) + optional file handler (DEBUG); the same
    levels are applied to llm-compressor's loguru logger and transformers' logger.

    Raises :class:`UsageError` when ``log_file`` cannot be opened (before any other work)."""
    handlers: list[logging.Handler] = []
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    console.setFormatter(logging.Formatter("%(message)s"))
    handlers.append(console)
    if log_file:
        try:
            Path(log_file).expanduser().parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(Path(log_file).expanduser(), encoding="utf-8")
        except OSError as err:
            raise UsageError(
                f"Cannot open the log file {log_file!r} ({err.strerror or err}). Pass a writable --log-file path."
            ) from err
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(fh)
    log.handlers.clear()
    for h in handlers:
        log.addHandler(h)
    log.setLevel(logging.DEBUG)
    log.propagate = False

    # transformers uses stdlib logging
    try:
        import transformers

        transformers.logging.set_verbosity_error() if quiet else transformers.logging.set_verbosity_warning()
    except Exception:  # noqa: BLE001 - transformers missing is reported where it is needed
        pass
    # llm-compressor / compressed-tensors log through loguru
    try:
        from loguru import logger as loguru_logger

        loguru_logger.remove()
        loguru_logger.add(sys.stderr, level="WARNING" if quiet else "INFO",
                          format="{time:HH:mm:ss} | {level} | {message}")
        if log_file:
            loguru_logger.add(str(Path(log_file).expanduser()), level="DEBUG",
                              format="{time} {level} llmcompressor: {message}")
        os.environ["LLM_COMPRESSOR_LOG_DISABLED"] = "false"
    except Exception:  # noqa: BLE001
        pass
    return handlers


def close_logging() -> None:
    """Close and detach the handlers :func:`setup_logging` installed (the log file is flushed), so
    that in-process callers (tests, ``main([...])`` twice) do not accumulate handlers."""
    for handler in list(log.handlers):
        handler.close()
        log.removeHandler(handler)


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """With ``enabled=False`` every tqdm bar created meanwhile (ours, llm-compressor's,
    datasets') is disabled; tqdm reads its ``TQDM_*`` environment only at import, so the
    default is patched for the duration instead."""
    if enabled:
        yield
        return
    import tqdm.std

    original = tqdm.std.tqdm.__init__

    @functools.wraps(original)
    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    tqdm.std.tqdm.__init__ = quiet_init
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # noqa: BLE001
        pass
    try:
        yield
    finally:
        tqdm.std.tqdm.__init__ = original
        try:
            import datasets

            datasets.enable_progress_bars()
        except Exception:  # noqa: BLE001
            pass


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``: sizes in the summary lines."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"
