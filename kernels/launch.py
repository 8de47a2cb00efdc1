"""Cheap kernel launches and the decode kernel's persistent scratch memory.

``launch`` calls a Triton kernel. The first call for a *specialization key* goes through the JIT
launcher (``kernel[grid](...)``), which compiles and returns the ``CompiledKernel``. Later calls
with the same key call ``CompiledKernel.run`` directly. That skips the JIT launcher's per-call
Python work: binding the arguments, computing the specialization, and looking up the cache.
The key is what Triton specializes a compiled kernel on:
- the constexpr values;
- for each tensor argument, its dtype and whether ``data_ptr() % 16 == 0``;
- for each int argument, whether it equals 1, whether it is divisible by 16, and whether it fits in int32.
So a direct call never runs a binary compiled for other arguments.

The direct call uses the launcher signature that ``JITFunction.run`` uses in Triton 3.4 and later
(the versions with ``triton.knobs``):
``run(gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook,
*all_args)``. Older Tritons always go through the JIT launcher. If a direct call raises, the
module falls back to the JIT launcher for good. ``FAST_LAUNCH_OK`` says which mode is on, and
``QVLM_FAST_LAUNCH=0`` turns the direct call off. The GPU tests check that both launchers give
bit-identical results. In the interpreter (``TRITON_INTERPRET=1``)
every call goes through the JIT launcher: there is nothing compiled to call.

``Scratch`` holds, per device, the float32 split-K partials and the int32 tile counters of the
decode kernel (``il_decode.py``). The counters are zeroed once when allocated; each launch
leaves them at zero again. The prefill path's reused dense-weight buffer lives here too. All
three grow only. So after the first (warm-up) call at a given size, a call allocates nothing
and can be captured in a CUDA graph. They assume one stream per device, as a decode loop has:
two kernels that share the scratch must not run concurrently.
"""

from __future__ import annotations

import os

import torch

from ._unpack import interpreting

__all__ = ["launch", "specialization_key", "Scratch", "scratch", "FAST_LAUNCH_OK"]

def _triton_has_knobs() -> bool:
    try:
        from triton import knobs  # noqa: F401
    except ImportError:
        return False
    return True


FAST_LAUNCH_OK = {"enabled": os.environ.get("QVLM_FAST_LAUNCH", "1") != "0" and _triton_has_knobs(),
                  "direct_calls": 0, "error": None}
_COMPILED: dict = {}


def specialization_key(args: tuple) -> tuple:
    """What Triton's JIT specializes a compiled kernel on, for the runtime arguments ``args``."""
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or a is None:
            key.append(a)
        elif isinstance(a, int):
            key.append((a == 1, a % 16 == 0, -(2**31) <= a < 2**31))
        else:
            key.append(type(a))
    return tuple(key)


def _hooks():
    from triton import knobs

    return knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook


def _on_cuda(args: tuple) -> bool:
    return bool(args) and isinstance(args[0], torch.Tensor) and args[0].is_cuda


def _stream(device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def launch(kernel, grid: tuple, args: tuple, constexprs: dict, num_warps: int = 4, num_stages: int = 2) -> None:
    """``kernel[grid](*args, **constexprs, num_warps=..., num_stages=...)``, through the compiled
    kernel directly once it exists (see the module docstring). ``args`` are the kernel's runtime
    arguments in signature order; ``constexprs`` are its constexpr arguments, which must all come
    after them in the signature (else every call takes the JIT launcher)."""
    fast = FAST_LAUNCH_OK["enabled"] and not interpreting() and _on_cuda(args)
    if not fast:
        kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        return
    key = (kernel, tuple(sorted(constexprs.items())), num_warps, num_stages, args[0].device,
           specialization_key(args))
    hit = _COMPILED.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        names = list(getattr(kernel, "arg_names", []))
        # the direct call passes every argument in signature order: runtime ones first, then constexprs
        if (compiled is not None and all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata"))
                and len(names) == len(args) + len(constexprs) and set(names[len(args):]) == set(constexprs)):
            _COMPILED[key] = (compiled, tuple(names[len(args):]))
        return
    compiled, const_names = hit
    try:
        g = tuple(grid) + (1, 1)
        stream = _stream(args[0].device)
        all_args = args + tuple(constexprs[name] for name in const_names)
        meta = compiled.launch_metadata(g[:3], stream, *all_args)
        enter, exit_ = _hooks()
        compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, meta, enter, exit_,
                     *all_args)
        FAST_LAUNCH_OK["direct_calls"] += 1
    except Exception as e:  # another Triton launcher signature: fall back for good
        FAST_LAUNCH_OK.update(enabled=False, error=f"{type(e).__name__}: {e}")
        _COMPILED.clear()
        kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)


class Scratch:
    """Grow-only per-device buffers (see the module docstring)."""

    def __init__(self):
        self._bufs: dict = {}

    def _get(self, name, device, dtype, numel, zero):
        key = (name, torch.device(device), dtype)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            size = max(numel, 2 * buf.numel() if buf is not None else numel)
            buf = (torch.zeros if zero else torch.empty)(size, dtype=dtype, device=device)
            self._bufs[key] = buf
        return buf

    def partials(self, device, numel: int) -> torch.Tensor:
        """float32 split-K partials, at least ``numel`` elements."""
        return self._get("partials", device, torch.float32, numel, False)

    def counters(self, device, numel: int) -> torch.Tensor:
        """int32 tile counters, all zero between launches."""
        return self._get("counters", device, torch.int32, max(numel, 4096), True)

    def dense(self, device, dtype, numel: int) -> torch.Tensor:
        """The prefill path's dense-weight buffer (shared by all Linears on the device)."""
        return self._get("dense", device, dtype, numel, False)

    def clear(self) -> None:
        self._bufs.clear()


scratch = Scratch()
