"""Shared scaffolding of the calibration-cost benchmarks (``bench_recipe_cost``, ``bench_mbq_calibration``).

Both measure one calibration per fresh subprocess, so that no import, cache or allocator state of one
method helps or hurts the next, and compare methods by medians over alternating repeats:

- :func:`measure`: wall time, process CPU time and peak memory *above the loaded model* of the code in
  its ``with`` block (peak RSS on CPU: ``/proc/self/clear_refs`` resets the high-water mark after
  loading; on CUDA also ``torch.cuda.max_memory_allocated``);
- :func:`spawn`: runs a child command that writes its measurement as JSON, with the child's output
  on failure;
- :func:`summarize` / :func:`ratio`: medians over repeats and method/baseline ratios.

CPU time is the figure to trust on a shared machine (it does not count time spent waiting for a core);
wall time is what a user waits for on an idle one.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from qvlm_modifiers.resources import proc_status_kib, reset_peak_rss

__all__ = ["measure", "spawn", "summarize", "ratio"]


@contextlib.contextmanager
def measure(device: str = "cpu") -> Iterator[dict]:
    """Fills the yielded dict, when the block ends, with ``seconds``, ``cpu_seconds``,
    ``peak_rss_delta_mib`` / ``peak_rss_total_mib`` (None where the kernel cannot reset the peak),
    ``device`` and, on CUDA, ``peak_gpu_delta_mib`` / ``peak_gpu_total_mib``."""
    import torch

    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_base = torch.cuda.memory_allocated()
    peak_reset = reset_peak_rss()
    rss_base = proc_status_kib("VmRSS")
    result: dict = {}
    start, cpu_start = time.perf_counter(), time.process_time()
    yield result
    if cuda:
        torch.cuda.synchronize()
    result["seconds"] = time.perf_counter() - start
    result["cpu_seconds"] = time.process_time() - cpu_start
    peak = proc_status_kib("VmHWM") if peak_reset else None
    result["peak_rss_delta_mib"] = (peak - rss_base) / 1024 if peak is not None else None
    result["peak_rss_total_mib"] = peak / 1024 if peak is not None else None
    if cuda:
        result["peak_gpu_delta_mib"] = (torch.cuda.max_memory_allocated() - gpu_base) / 2**20
        result["peak_gpu_total_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["device"] = torch.cuda.get_device_name()
    else:
        result["device"] = "cpu"


def page_in(tensors, copy: bool = False) -> None:
    """Make memory-mapped weights resident before a baseline is taken. transformers 5 maps the
    safetensors files, so a weight is paged in when first read; without this the first pass that
    reads it (MBQ's sensitivity pass up front, a pipeline layer by layer) is charged for it as working
    memory. ``copy=False`` reads each tensor once (file pages stay mapped); ``copy=True`` replaces
    each one's data by an anonymous copy (as a dtype conversion at load does)."""
    import torch

    with torch.no_grad():
        for tensor in tensors:
            if copy:
                tensor.data = tensor.data.clone()
            else:
                tensor.sum()


def spawn(cmd: Sequence[str], out: Path, label: str) -> dict:
    """Run ``cmd`` (a child that writes its measurement dict as JSON to ``out``) and return that dict;
    a failed child exits this process with its label and the tail of its output."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{label}: calibration failed (exit {proc.returncode})")
    return json.loads(Path(out).read_text())


def _max_or_none(values) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def summarize(results: Sequence[dict]) -> dict:
    """One method's repeats: median wall and CPU time, the largest peak memory, its device."""
    if not results:
        raise ValueError("no runs to summarize")
    return {
        "seconds_median": statistics.median(r["seconds"] for r in results),
        "seconds_all": [round(r["seconds"], 3) for r in results],
        "cpu_seconds_median": statistics.median(r["cpu_seconds"] for r in results),
        "peak_rss_delta_mib": _max_or_none(r.get("peak_rss_delta_mib") for r in results),
        "peak_rss_total_mib": _max_or_none(r.get("peak_rss_total_mib") for r in results),
        "peak_gpu_delta_mib": _max_or_none(r.get("peak_gpu_delta_mib") for r in results),
        "peak_gpu_total_mib": _max_or_none(r.get("peak_gpu_total_mib") for r in results),
        "device": results[0].get("device", "cpu"),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is unknown or ``b`` is 0."""
    return None if a is None or b in (None, 0) else a / b
