"""Wall time and memory of a run: the one definition, for the run record and the benchmarks.

* :func:`peak_memory`: this process's peak resident set size so far (``getrusage`` ``ru_maxrss``)
  and, when CUDA is available, ``torch.cuda.max_memory_allocated``.
* :func:`proc_status_kib` / :func:`reset_peak_rss` (Linux): a ``/proc/self/status`` field (``VmRSS``,
  ``VmHWM``, ``RssAnon``) and resetting ``VmHWM`` to the current RSS, so a benchmark can read the peak
  of one phase of a process;
* :func:`measure_resources`: run a callable and report its wall time, its peak RSS (sampled every
  ``poll_s`` and at the end, so it is the peak *during* the call, not since process start) and the
  CUDA max allocated memory reset before the call.
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ResourceUsage", "rss_bytes", "peak_memory", "measure_resources", "proc_status_kib", "reset_peak_rss"]


@dataclass
class ResourceUsage:
    wall_s: float
    peak_rss_bytes: int
    rss_before_bytes: int
    cuda_max_allocated_bytes: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    import psutil

    return psutil.Process().memory_info().rss


def _cuda() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return torch.cuda.is_available()


def peak_memory() -> dict[str, int | None]:
    """Peak RSS of this process since it started (bytes; ``ru_maxrss`` is KiB on Linux) and CUDA max
    allocated (``None`` without CUDA)."""
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cuda = None
    if _cuda():
        import torch

        cuda = int(torch.cuda.max_memory_allocated())
    return {"peak_rss_bytes": int(peak_rss), "cuda_max_allocated_bytes": cuda}


def measure_resources(fn: Callable[[], Any], poll_s: float = 0.01) -> tuple[Any, ResourceUsage]:
    """Run ``fn()``; return its result and its :class:`ResourceUsage`."""
    cuda = _cuda()
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = rss_bytes()
    peak = [before]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            stop.wait(poll_s)

    thread = threading.Thread(target=poll, daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        result = fn()
        if cuda:
            torch.cuda.synchronize()
    finally:
        wall = time.perf_counter() - start
        stop.set()
        thread.join()
    peak[0] = max(peak[0], rss_bytes())
    usage = ResourceUsage(wall, peak[0], before, torch.cuda.max_memory_allocated() if cuda else None)
    return result, usage


def proc_status_kib(field: str) -> int:
    """A field of ``/proc/self/status`` in KiB (e.g. ``"VmHWM"``, the peak RSS); raises when absent."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (``echo 5 > /proc/self/clear_refs``); ``False``
    where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
