"""Keep the C heap from growing with every calibrated layer (glibc, CPU calibration).

glibc serves allocations above ``M_MMAP_THRESHOLD`` (128 KiB at start) with their own ``mmap`` and
returns them to the system on ``free``. But the threshold is *dynamic*: each time such a block is
freed, the threshold rises to its size (up to 32 MiB). After the first few layers of a sequential
calibration have freed their weight-sized temporaries, every later temporary of that size comes
from the ordinary heap instead, where freed blocks of slightly different sizes fragment it and it
is never given back. ``eval/bench_memory.py`` measured the effect on llm-compressor's AWQ and on
MBQ (width 256, 8 rows, weights copied to anonymous memory): working memory grew about 1.15 MiB
and 1.6 MiB per decoder layer, about one bf16 copy of each layer's weights, x1.5 and x1.4 from 4 to
32 layers. With the threshold fixed at 64 KiB both stayed flat (x1.03), at the same speed.

:func:`fix_malloc_mmap_threshold` sets the threshold explicitly with ``mallopt``, which also turns
the dynamic adjustment off, and puts the trim threshold (which the adjustment raised to twice the
mmap threshold) back to 128 KiB. It has to act before the model is loaded: applied when
calibration started (after loading), AWQ still grew 32.6 -> 64.5 MiB from 4 to 32 layers; applied
at ``import qvlm_modifiers`` it stayed at 32.0 -> 33.4 MiB. So ``import qvlm_modifiers`` applies it
(the product's usage imports the package before loading the model); it is process-wide. It does
nothing when ``QVLM_MALLOC_TUNING=0``, when the user set ``MALLOC_MMAP_THRESHOLD_`` (glibc's own variable) or
``MALLOC_TOP_PAD_``/``MALLOC_TRIM_THRESHOLD_`` themselves, or off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["MMAP_THRESHOLD_BYTES", "fix_malloc_mmap_threshold"]

MMAP_THRESHOLD_BYTES = 64 * 1024
_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value
_USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_")
_applied: int | None = None


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present on glibc only (musl has no mallopt effect)
        return libc
    except (OSError, AttributeError):
        return None


def fix_malloc_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (dynamic adjustment off). Returns whether
    the setting is in effect (``False``: disabled, the user's own setting kept, or not glibc).
    Idempotent."""
    global _applied
    if _applied == threshold:
        return True
    if os.environ.get("QVLM_MALLOC_TUNING", "1").strip() == "0":
        return False
    if any(name in os.environ for name in _USER_VARIABLES):
        return False
    libc = _glibc()
    if libc is None:
        return False
    # the dynamic adjustment also raised the trim threshold (to twice the mmap threshold), which keeps
    # freed memory at the top of the heap from being returned: put it back to its initial value too
    if libc.mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(threshold)) != 1:
        return False
    if libc.mallopt(ctypes.c_int(_M_TRIM_THRESHOLD), ctypes.c_int(TRIM_THRESHOLD_BYTES)) != 1:
        return False
    _applied = threshold
    return True
