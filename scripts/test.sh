#!/usr/bin/env bash
# Set up ./.venv at the tested versions (constraints.txt) and run the whole CPU test suite
# (CUDA-only tests skip without a GPU). Extra arguments go to pytest, e.g. `-m "not slow"`.
#
#   bash scripts/test.sh --latest [PYTEST ARGS]
#       builds a second venv (.venv-latest) with the newest releases of every dependency (torch
#       stays at the pinned CPU build: the newest torch on PyPI is a multi-GB CUDA build) and runs
#       the cache, fidelity and inference tests there (or PYTEST ARGS). Run it before moving
#       constraints.txt to newer versions.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = "--latest" ]; then
  shift
  only_torch=$(mktemp)
  grep "^torch==" constraints.txt > "$only_torch"
  MSRNN_VENV=.venv-latest MSRNN_CONSTRAINTS="$only_torch" MSRNN_UPGRADE=1 MSRNN_NO_DEEPSPEED=1 bash scripts/setup.sh
  rm -f "$only_torch"
  .venv-latest/bin/python -m pip list --disable-pip-version-check 2>/dev/null \
    | grep -iE "^(torch|transformers|peft|accelerate|datasets|numba|triton|wandb|gguf) " || true
  if [ "$#" -eq 0 ]; then
    set -- tests/test_compat.py tests/test_inference.py tests/test_fidelity.py tests/test_schedule.py tests/test_kernels.py
  fi
  VENV_PY=.venv-latest/bin/python
else
  bash scripts/setup.sh
  VENV_PY=.venv/bin/python
fi
set +e
"$VENV_PY" -m pytest -q -rs --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "no tests collected"; exit 1; fi
exit "$rc"
