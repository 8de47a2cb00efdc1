#!/usr/bin/env bash
# One lent-GPU session's measurements of the packed kernels, in one run of under 8 minutes:
#   1. the kernel tests on CUDA (compressed-tensors layout, interleaved layout, whole-model repack);
#   2. kernels/bench.py on Llama-7B/13B layer shapes: fp16 (cuBLAS), ours on the interleaved layout,
#      tinygemm (torch.ops.aten._weight_int4pack_mm), gemlite / vLLM Marlin when importable;
#      eager and CUDA-graph timings, GB/s and % of peak, MET / NOT MET per target;
#   3. end to end: greedy decode on a LLaVA with a Llama-7B-shaped LM, bf16 against W4A16 through
#      the interleaved layout and through the compressed-tensors layout, eager and CUDA graph.
# Logs: kernels/results/<gpu>_<step>_<date>.log, and <gpu>_summary_<date>.log (the verdict lines).
# Each step has its own timeout, so a hang costs that step only; the steps' budgets add up to
# 450 s (override: STEP_BUDGETS="tests bench e2e", in seconds), plus about 10 s of setup.
#
#   bash kernels/gpu_check.sh               # from the repository root, with a python that has
#                                           # torch (CUDA), triton, transformers, compressed-tensors,
#                                           # llmcompressor; PYTHON=... picks another interpreter
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python}
read -r T_TESTS T_BENCH T_E2E <<<"${STEP_BUDGETS:-120 210 120}"
# DRY_RUN=1: the same steps on tiny shapes, on whatever device there is (CPU: Triton interpreter),
# to check the script itself; its logs go to kernels/results/dryrun/ and mean nothing.
DRY=${DRY_RUN:-0}
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 TQDM_DISABLE=1
[ "$DRY" = 1 ] || unset TRITON_INTERPRET

# qvlm_modifiers.kernels is the repository's kernels/ folder (pyproject's package-dir). A symlink
# farm on PYTHONPATH maps it without installing anything (the lent machine has no network).
SHIM=$(mktemp -d)
mkdir -p "$SHIM/qvlm_modifiers"
for f in "$ROOT"/src/qvlm_modifiers/*; do ln -s "$f" "$SHIM/qvlm_modifiers/$(basename "$f")"; done
ln -sfn "$ROOT/kernels" "$SHIM/qvlm_modifiers/kernels"
[ -d "$ROOT/recipes" ] && ln -sfn "$ROOT/recipes" "$SHIM/qvlm_modifiers/recipes"
export PYTHONPATH="$SHIM:$ROOT/src:${PYTHONPATH:-}"

GPU=$($PY -c "import torch; n = torch.cuda.get_device_name(0); print(next((t for t in ('H200', 'H100', 'A100', 'L40S') if t in n), n.split()[-1]).lower())" 2>/dev/null || echo nogpu)
DATE=$(date -u +%Y-%m-%d)
OUT="$ROOT/kernels/results"
[ "$DRY" = 1 ] && OUT="$ROOT/kernels/results/dryrun"
mkdir -p "$OUT"
LOG() { echo "$OUT/${GPU}_$1_${DATE}.log"; }
SUMMARY=$(LOG summary)
START=$(date +%s)

{
  echo "# gpu_check $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') ($(git status --porcelain -- kernels tests | wc -l) uncommitted kernel/test files)"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.memory,driver_version --format=csv,noheader 2>&1 | head -2
  $PY -c "import torch, triton, transformers, compressed_tensors as ct; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, transformers {transformers.__version__}, compressed-tensors {ct.__version__}')" 2>&1 | tail -1
  $PY -c "import qvlm_modifiers.kernels.il_decode as m; print('kernels from', m.__file__)" 2>&1 | tail -1
} | tee "$SUMMARY"

step() {  # step NAME BUDGET_S CMD...: run with a timeout, log, record the exit status
  local name=$1 budget=$2; shift 2
  local log; log=$(LOG "$name")
  local t0; t0=$(date +%s)
  echo "## $name: timeout ${budget}s -> $log" | tee -a "$SUMMARY"
  timeout --signal=INT --kill-after=10 "$budget" "$@" >"$log" 2>&1
  local rc=$?
  echo "## $name: exit $rc after $(( $(date +%s) - t0 ))s$([ $rc = 124 ] && echo ' (TIMED OUT)')" | tee -a "$SUMMARY"
}

# 1. the interleaved kernels' tests on CUDA: every plain-PyTorch repack test, the decode kernel on
#    the g128 and per-channel cases, split-K, dequantize (bf16 bit-exact on a GPU), the direct launch
#    against the JIT launch, CUDA-graph capture, and the whole-model tests. Each new constexpr
#    combination is a Triton compile, which is what this selection keeps under the budget. The
#    compressed-tensors-layout tests (tests/test_kernels.py) passed on an H200 on 2026-11-26 and
#    are unchanged, so they are left out.
TESTS=(tests/test_kernels_interleaved.py tests/test_kernels_il_model.py)
SELECT="(not decode_kernel_matches_reference or g128 or gch) and not fused_path"
[ "$DRY" = 1 ] && TESTS=(tests/test_kernels_interleaved.py) && SELECT="geometry or direct_launch"
step tests "$T_TESTS" env QVLM_KERNEL_TUNE=0 $PY -m pytest -q -p no:xdist -p no:cacheprovider --maxfail=5 -rfEs \
  "${TESTS[@]}" -k "$SELECT"
tail -3 "$(LOG tests)" | tee -a "$SUMMARY"

# 2. layer benchmark: W4 / W3 g128 on the five 7B/13B shapes, decode and prefill M
SHAPES=(--ms 1 16 256 1024 --reps 30)
[ "$DRY" = 1 ] && SHAPES=(--shapes 128x96 --ms 1 --reps 1)
step bench "$T_BENCH" $PY kernels/bench.py --schemes w4g128 w3g128 --impls il tinygemm gemlite marlin \
  "${SHAPES[@]}" --e2e off
grep -E "^# (correctness|targets|  )|unavailable|FAILED|layer table took" "$(LOG bench)" | tee -a "$SUMMARY"

# 3. end to end: bf16, then the interleaved layout (tuned, small space: its bf16 kernels compile
#    here), then the compressed-tensors layout with its default configs (QVLM_KERNEL_TUNE=0: tuning
#    it takes minutes of compiles; its tuned eager figure, 80 tok/s on an H200, is in the README)
WORK=$(mktemp -d)
step e2e "$T_E2E" env QVLM_KERNEL_TUNE=0 QVLM_IL_TUNE=small $PY -m qvlm_modifiers.kernels.e2e --layers 8 \
  --tokens 64 --workdir "$WORK"
grep -E "^(e2e|# )" "$(LOG e2e)" | tee -a "$SUMMARY"
rm -rf "$WORK" "$SHIM"

echo "# gpu_check done in $(( $(date +%s) - START ))s" | tee -a "$SUMMARY"
