#!/usr/bin/env bash
# Install what the tests need and run them (GPU tests skip without a CUDA device; tests marked slow,
# which run the real model for minutes, are left out: run them with `bash scripts/test.sh -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
python3 -m pytest -q -m "not slow" tests "$@"
