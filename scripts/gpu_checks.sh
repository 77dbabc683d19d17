#!/usr/bin/env bash
# The GPU checks, each stage meant for one call on a GPU machine (README: "On a GPU"):
#
#   bash scripts/gpu_checks.sh kernels    # Triton scan + CUDA model tests, scan and training-step benchmarks
#   bash scripts/gpu_checks.sh zero       # DeepSpeed ZeRO-2/3 runs (scripts/run_zero.sh, world size = #GPUs)
#   bash scripts/gpu_checks.sh headline   # the headline experiment at T = 2048 (scripts/headline.py)
#   bash scripts/gpu_checks.sh tests      # only the tests (kernels, CUDA model paths, soft/flex)
#   bash scripts/gpu_checks.sh bench-train [smollm2|mistral-7b] [suffix]
#   bash scripts/gpu_checks.sh bench-decode # inference: Mistral-7B shape, 2k/8k/32k, full vs TOVA/window-512, batch 1 and 8
#   bash scripts/gpu_checks.sh all        # kernels + zero
#
# Results go to $OUT (default outputs/gpu): logs, results JSON/Markdown. Uses the python on PATH
# ($PY to override), which must be a CUDA build of torch with triton; deepspeed for `zero`.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-outputs/gpu}
WORK=${MSRNN_WORK:-outputs/gpu-work}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled HF_HUB_OFFLINE=1
status=0
step() { echo; echo "=== $* ($(date +%T))"; "$@" || { echo "=== FAILED: $*"; status=1; }; }

versions() {
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
}

tests() { step "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_cuda.py tests/test_soft.py \
  tests/test_inference.py; }

kernels() {
  versions
  tests
  step "$PY" scripts/bench_scan.py --out "$OUT/bench_scan.json"
  step "$PY" scripts/bench_train.py --shape smollm2 --out "$OUT/bench_train.json"
}

zero() {
  MSRNN_VENV=$("$PY" -c "import sys; print(sys.prefix)") step bash scripts/run_zero.sh "$WORK/zero"
  cp "$WORK/zero/zero_report.md" "$WORK/zero/zero_report.json" "$OUT/" 2>/dev/null || true
}

headline() {
  # the GPU protocol: T = 2048, K = 64/128/256, plain LoRA vs the chosen objective, 3 seeds,
  # 16 held-out windows (32,752 predicted tokens)
  MSRNN_ATTN=${MSRNN_ATTN:-dense} step "$PY" scripts/headline.py --split test --seq-len 2048 \
    --budgets 64,128,256 --arms "${HEADLINE_ARMS:-plain,hard-full-self-multi}" --seeds 0,1,2 \
    --steps "${HEADLINE_STEPS:-40}" --train-batch-size 4 --batch-size 4 --eval-windows 16 \
    --work-dir "$WORK/headline" --out "$OUT/headline"
}

case "${1:-all}" in
  kernels) kernels ;;
  tests) versions; tests ;;
  bench-train) step "$PY" scripts/bench_train.py --shape "${2:-smollm2}" --out "$OUT/bench_train${3:-}.json" ;;
  bench-decode) versions
    step "$PY" scripts/bench_decode.py --device cuda --lengths 2048 --chunks 128,256,512,1024,2048 \
      --out "$OUT/bench_decode_chunks"
    step "$PY" scripts/bench_decode.py --device cuda --out "$OUT/bench_decode" ;;
  zero) zero ;;
  headline) headline ;;
  all) kernels; zero ;;
  *) echo "usage: $0 kernels|tests|bench-train|bench-decode|zero|headline|all" >&2; exit 2 ;;
esac
echo "=== done ($(date +%T)), status $status"
exit $status
