#!/usr/bin/env bash
# Set up ./.venv, then train the real SmolLM2-135M under a TOVA budget on Gutenberg books with a
# before/after evaluation against the full-state model (table + plot). Extra arguments go to
# `python -m msrnn_train.demo` (e.g. --training.max_steps 10).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m msrnn_train.demo "$@"
