#!/usr/bin/env bash
# Install what the tests need and run them (GPU tests skip without a CUDA device).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
python3 -m pytest -q tests "$@"
