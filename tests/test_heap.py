"""qvlm_modifiers.heap: the setting really fixes glibc's mmap threshold, it is applied at import only
on request, and the opt-outs are honoured.

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
import ctypes
import qvlm_modifiers
from qvlm_modifiers import heap
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
a = bytearray(4 << 20)
del a
before = libc.mallinfo2().hblkhd
b = bytearray(1 << 20)
print(int(heap._applied is not None), libc.mallinfo2().hblkhd - before)
"""


def _probe(**env) -> tuple[bool, int]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "QVLM_MALLOC_TUNING"}
    environment.update(env)
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=environment,
                         check=True).stdout.strip().splitlines()[-1].split()
    return bool(int(out[0])), int(out[1])


def test_requested_at_import_it_fixes_the_threshold_and_by_default_glibc_stays_dynamic():
    applied, grown = _probe(QVLM_MALLOC_TUNING="1")
    assert applied and grown >= 1 << 20
    applied, grown = _probe()  # the default import leaves glibc alone: the probe tells the two apart
    assert not applied and grown < 1 << 20


@pytest.mark.parametrize("env", [{"MALLOC_MMAP_THRESHOLD_": "1048576"}, {"MALLOC_TOP_PAD_": "0"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}])
def test_user_malloc_settings_win(env):
    applied, _ = _probe(QVLM_MALLOC_TUNING="1", **env)
    assert not applied


def test_explicit_opt_out(monkeypatch):
    monkeypatch.setattr(heap, "_applied", None)
    monkeypatch.setenv("QVLM_MALLOC_TUNING", "off")
    assert heap.fix_malloc_mmap_threshold() is False
    assert heap.apply_if_requested() is False


def test_off_glibc_is_a_quiet_no_op(monkeypatch):
    monkeypatch.setattr(heap, "_applied", None)
    monkeypatch.delenv("QVLM_MALLOC_TUNING", raising=False)
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    assert heap.fix_malloc_mmap_threshold() is False  # no glibc: nothing applied, nothing raised


def test_no_glibc_handle_off_linux(monkeypatch):
    monkeypatch.setattr(heap.sys, "platform", "darwin")
    assert heap._glibc() is None  # noqa: SLF001


def test_quantize_command_applies_it_before_anything_else(monkeypatch, capsys):
    from qvlm_modifiers.cli import main

    calls = []
    monkeypatch.setattr(heap, "fix_malloc_mmap_threshold", lambda: calls.append(1) or True)
    code = main(["quantize", "/nonexistent-model", "--recipe", "w8a8", "--dataset", "/nonexistent-data",
                 "--num-samples", "0", "--output", "/nonexistent-out"])
    assert code == 2 and calls == [1]
    assert "num-samples" in capsys.readouterr().err
