"""qvlm_modifiers.heap: the mmap threshold is really fixed (glibc), and the opt-outs are honoured.

Checked by behaviour, in fresh processes: after a 4 MiB block is freed, glibc's dynamic threshold
rises to 4 MiB, so a new 1 MiB block comes from the heap (mmapped bytes ``hblkhd`` do not grow);
with the threshold fixed at 64 KiB the 1 MiB block is mmapped (``hblkhd`` grows by >= 1 MiB)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qvlm_modifiers import heap

pytestmark = pytest.mark.skipif(heap._glibc() is None or not hasattr(heap._glibc(), "mallinfo2"),  # noqa: SLF001
                                reason="glibc >= 2.33 only")

_PROBE = """
import ctypes, sys
from qvlm_modifiers.heap import fix_malloc_mmap_threshold
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
applied = fix_malloc_mmap_threshold() if sys.argv[1] == "fix" else False
a = bytearray(4 << 20)
del a
before = libc.mallinfo2().hblkhd
b = bytearray(1 << 20)
print(int(applied), libc.mallinfo2().hblkhd - before)
"""


def _probe(mode: str, **env) -> tuple[bool, int]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "QVLM_MALLOC_TUNING"}
    environment.update(env)
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=environment,
                         check=True).stdout.strip().splitlines()[-1].split()
    return bool(int(out[0])), int(out[1])


def test_fixed_threshold_mmaps_a_block_the_dynamic_threshold_keeps_on_the_heap():
    applied, grown = _probe("fix")
    assert applied and grown >= 1 << 20
    applied, grown = _probe("dynamic")  # the probe can tell the two apart
    assert not applied and grown < 1 << 20


@pytest.mark.parametrize("env", [{"QVLM_MALLOC_TUNING": "0"}, {"MALLOC_MMAP_THRESHOLD_": "1048576"}])
def test_opt_outs_leave_glibc_alone(env):
    applied, grown = _probe("fix", **env)
    assert not applied
    if "QVLM_MALLOC_TUNING" in env:
        assert grown < 1 << 20  # still glibc's dynamic behaviour


def test_idempotent_in_process():
    first = heap.fix_malloc_mmap_threshold()
    assert heap.fix_malloc_mmap_threshold() == first
