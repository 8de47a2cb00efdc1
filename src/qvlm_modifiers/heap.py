"""Keep the C heap from growing with every calibrated layer (glibc, CPU calibration).

glibc serves allocations above ``M_MMAP_THRESHOLD`` (128 KiB at start) with their own ``mmap`` and
returns them to the system on ``free``. But the threshold is *dynamic*: each time such a block is
freed, the threshold rises to its size (up to 32 MiB). After the first few layers of a sequential
calibration have freed their weight-sized temporaries, every later temporary of that size comes
from the ordinary heap instead, where freed blocks of slightly different sizes fragment it and it
is never given back. ``eval/bench_memory.py`` measured the effect (width 256, 8 rows, weights copied
to anonymous memory, ``eval/results/bench_memory/``): without this fix the working memory of
llm-compressor's AWQ grew x1.53 from 4 to 32 layers (anonymous memory 38.7 -> 70.8 MiB) and MBQ's
x1.37 (93.9 -> 138.8 MiB), about one bf16 copy of each layer's weights per layer; with it, x1.05
(31.6 -> 34.1 MiB) and x1.03 (76.7 -> 80.3 MiB), at the same time per layer.

:func:`fix_malloc_mmap_threshold` sets the threshold explicitly with ``mallopt``, which also turns
the dynamic adjustment off, and puts the trim threshold (which the adjustment raised to twice the
mmap threshold) back to 128 KiB. It has to act before the model is loaded: the same two settings
applied when calibration started (after loading) left AWQ growing 32.6 -> 64.5 MiB from 4 to 32
layers; applied before loading, 32.0 -> 33.4 MiB (single runs, not kept).

It has a price: every allocation of 64 KiB or more then gets its own ``mmap`` and fresh zeroed pages.
Greedy VQA generation on the default model (60 questions, batch 20, fp32, one thread) took 1.28x
the CPU time (4.97 s vs 3.89 s, two alternating runs each: ``eval/bench_heap_setting.py``,
``eval/results/smolvlm-tiny/bench_heap_setting.txt``). So it is applied where calibration is the job, before
the model is loaded: by the ``qvlm quantize`` command and by ``eval/bench_memory.py``. A library
user calibrating on CPU sets ``QVLM_MALLOC_TUNING=1`` before ``import qvlm_modifiers`` (then the
import applies it) or calls :func:`fix_malloc_mmap_threshold` before loading the model. It is
process-wide and cannot be undone. It probably matters less at real model widths (not measured):
there most weight-sized temporaries exceed glibc's 32 MiB cap of the dynamic threshold and are
mmapped anyway, while the measured growth comes from width-256 synthetic models.

:func:`fix_malloc_mmap_threshold` does nothing when ``QVLM_MALLOC_TUNING=0`` (or false/off/no),
when the user set glibc's own ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_TOP_PAD_``, ``MALLOC_MMAP_MAX_`` or ``glibc.malloc`` tunables, or off glibc.
"""

from __future__ import annotations

import os
import sys

__all__ = ["MMAP_THRESHOLD_BYTES", "fix_malloc_mmap_threshold", "apply_if_requested"]

MMAP_THRESHOLD_BYTES = 64 * 1024
_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value
_USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_")
_OFF = ("0", "false", "off", "no")
_ON = ("1", "true", "on", "yes")
_applied: int | None = None


def _glibc():
    """glibc's handle, or ``None`` (not Linux, not glibc, or no ctypes). Never raises."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")  # glibc's fixed soname (no ldconfig lookup at import)
        libc.gnu_get_libc_version  # noqa: B018 - present on glibc only (musl has no mallopt effect)
        return libc
    except Exception:  # noqa: BLE001 - an allocator tweak must never break the import
        return None


def fix_malloc_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (dynamic adjustment off). Returns whether
    the setting is in effect (``False``: disabled, the user's own setting kept, or not glibc).
    Idempotent."""
    global _applied
    if _applied == threshold:
        return True
    if os.environ.get("QVLM_MALLOC_TUNING", "1").strip().lower() in _OFF:
        return False
    if any(name in os.environ for name in _USER_VARIABLES) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = _glibc()
    if libc is None:
        return False
    # the dynamic adjustment also raised the trim threshold (to twice the mmap threshold), which keeps
    # freed memory at the top of the heap from being returned: put it back to its initial value too
    import ctypes

    if libc.mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(threshold)) != 1:
        return False
    if libc.mallopt(ctypes.c_int(_M_TRIM_THRESHOLD), ctypes.c_int(TRIM_THRESHOLD_BYTES)) != 1:
        return False
    _applied = threshold
    return True


def apply_if_requested() -> bool:
    """:func:`fix_malloc_mmap_threshold` if ``QVLM_MALLOC_TUNING`` is 1/true/on/yes (what
    ``import qvlm_modifiers`` calls); otherwise nothing."""
    if os.environ.get("QVLM_MALLOC_TUNING", "").strip().lower() not in _ON:
        return False
    return fix_malloc_mmap_threshold()
