#!/usr/bin/env bash
# The whole GPU check of issue 28 in one run: the GPU tests, the Triton kernel tests and the GPU benchmarks,
# every figure and log written under $OUT. Made for a lent GPU machine (an H100/H200) that starts bare and
# is held for minutes, so every step has a time limit and the run as a whole has a budget: a hung step
# costs its own limit, never the steps after it.
#
#   bash benchmarks/gpu_check.sh                  # on the GPU machine, from the repository root; OUT=... set
#   bash benchmarks/gpu_check.sh --steps linear   # only some steps (a re-run after a failure), comma-separated
#   bash benchmarks/gpu_check.sh --dry-run        # here, on the CPU: the same steps at tiny shapes, no GPU
#
# Options: --out DIR (default $OUT; a new temporary folder in a dry run), --budget SECONDS (the whole run,
# default 450 on a GPU, 300 in a dry run; give the whole command a wall limit about a minute above it, e.g.
# 540 s, so the summary is written before it), --steps a,b,... (default: all, in this order):
#   env         card, driver, CUDA, torch, cuSPARSELt, Triton, transformers, PEFT versions; carried wheels installed
#   gpu_tests   pytest -m gpu on the test files that hold GPU tests (tests/kernels apart)
#   triton      pytest tests/kernels: the Triton permuted norm and its gather (interpreter and GPU)
#   linear      bench_linear.py: LLaMA-2-7B shapes (4096x4096, 4096->11008, 11008->4096), 1..8192 tokens,
#               dense vs 2:4 vs 2:4 + permutation, the per-shape threshold sweep and the dispatch table
#   e2e         bench_e2e.py: LLaMA-7B-shaped random model, prefill 2048 tokens, decode at batch 1 and 32,
#               dense vs 2:4, GPU weight memory
#   layer_time  bench_learned_layer_time.py: seconds per 7B-shaped decoder layer of the learned permutation,
#               the Gram mask and the lsq refit, and seconds per step of the joint training (scope="model",
#               8 steps of 16 windows) (one process; each JSON line is written as it finishes)
#
# What comes back (8 files, all directly under $OUT; the device tool returns at most 8, 2 folders deep):
#   summary.md      each step's status, seconds and limit; the versions; the dispatch table; the e2e table
#   env.txt         nvidia-smi, versions of the card's driver, CUDA, torch, cuSPARSELt and the Python packages
#   gpu_tests.log   triton.log   linear.md   e2e.md   layer_time.jsonl   stderr.log (every step's stderr)
#
# Setting the dispatch threshold from a run: linear.md ends with "Dispatch table", a Python block with
# MIN_TOKENS_BY_SHAPE (per weight shape (out_features, in_features): the token count from which the 2:4
# kernel beat dense at that count and every larger one swept, for fp16 and bf16; None where it never did)
# and KERNEL_MIN_MACS (the call size from which unlisted shapes use the kernel). Paste both into
# optimum_permllm/nn/cuda_sparse.py with the
# card and the date in a comment, then check e2e.md: the 2:4 model must not be slower than dense anywhere.
# Record the figures in BENCHMARKS.md ("GPU check") with the card, driver, CUDA and torch versions.
#
# Missing Python packages: the GPU machine reaches no registry. Its image (Python 3.12) has torch, Triton,
# transformers, PEFT, accelerate, safetensors, scipy and pytest; these steps need nothing else (datasets,
# optimum, gguf are not imported by them). To bring another package or version, download its wheels on a
# machine with pip into .whl/ (git-ignored), carry .whl with the working tree, and this script installs
# them into /tmp/site (--no-deps: name every dependency too) before anything runs:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl NAME==VERSION
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
DRY_RUN=0
OUT_DIR=""
BUDGET=""
ALL_STEPS="env,gpu_tests,triton,linear,e2e,layer_time"
STEPS="$ALL_STEPS"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) OUT_DIR="$2"; shift ;;
        --budget) BUDGET="$2"; shift ;;
        --steps) STEPS="$2"; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
for step in ${STEPS//,/ }; do
    case ",$ALL_STEPS," in
        *",$step,"*) ;;
        *) echo "gpu_check.sh: unknown step '$step'; the steps are $ALL_STEPS" >&2; exit 2 ;;
    esac
done
if [ "$DRY_RUN" = 1 ]; then
    OUT_DIR="${OUT_DIR:-$(mktemp -d -t gpu_check.XXXXXX)}"  # never the device tool's $OUT
    BUDGET="${BUDGET:-300}"
    DEVICE=cpu
else
    OUT_DIR="${OUT_DIR:-${OUT:-}}"
    if [ -z "$OUT_DIR" ]; then
        echo "gpu_check.sh: set OUT or pass --out DIR (or --dry-run to try it on the CPU)" >&2
        exit 2
    fi
    BUDGET="${BUDGET:-450}"
    DEVICE=cuda
fi
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]]; then
    echo "gpu_check.sh: --budget takes whole seconds, got '$BUDGET'" >&2
    exit 2
fi
mkdir -p "$OUT_DIR"
export REPO DRY_RUN DEVICE OUT_DIR
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
START=$(date +%s)
DEADLINE=$((START + BUDGET))
STATUS=()
: > "$OUT_DIR/stderr.log"

note() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT_DIR/stderr.log" >&2; }

write_summary() {
    {
        echo "# GPU check ($([ "$DRY_RUN" = 1 ] && echo "DRY RUN on the CPU: no figure here is a GPU measurement" || echo "on the GPU"))"
        echo
        echo "Started $(date -u -d "@$START" '+%Y-%m-%d %H:%M:%S UTC' 2>/dev/null || date -u), budget ${BUDGET} s, steps: $STEPS"
        echo
        [ -s "$OUT_DIR/env.txt" ] && sed -n '/^## Versions/,/^$/p' "$OUT_DIR/env.txt"
        echo
        echo "| step | status | seconds | limit (s) | output |"
        echo "|---|---|---|---|---|"
        for line in "${STATUS[@]}"; do echo "$line"; done
    } > "$OUT_DIR/summary.md"
}

# run_step NAME LIMIT OUTPUT_FILE COMMAND...: run with the smaller of its limit and what is left of the budget.
run_step() {
    local name="$1" limit="$2" output="$3"
    shift 3
    case ",$STEPS," in *",$name,"*) ;; *) return 0 ;; esac
    local now left status began rc
    now=$(date +%s)
    left=$((DEADLINE - now - 5))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 15 ]; then
        STATUS+=("| $name | skipped: the budget is spent | 0 | 0 | - |")
        note "$name: skipped, ${left} s left of the budget"
        write_summary
        return 0
    fi
    if declare -F "$1" > /dev/null; then  # a function of this script: run it in a child bash
        export -f "$1"
        set -- bash -c "$1"
    fi
    note "$name: starting (limit ${limit} s)"
    echo "===== $name: $*" >> "$OUT_DIR/stderr.log"
    began=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$OUT_DIR/$output" 2>> "$OUT_DIR/stderr.log"
    rc=$?
    local took=$(( $(date +%s) - began ))
    case $rc in
        0) status="ok" ;;
        124|137) status="TIMED OUT" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    STATUS+=("| $name | $status | $took | $limit | $output |")
    note "$name: $status after ${took} s"
    write_summary
}

install_carried_wheels() {
    # Wheels brought in .whl/ (see the header) go to /tmp/site, ahead of the image's packages.
    if compgen -G "$REPO/.whl/*.whl" > /dev/null; then
        note "installing $(ls "$REPO"/.whl/*.whl | wc -l) carried wheels into /tmp/site"
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$REPO"/.whl/*.whl >> "$OUT_DIR/stderr.log" 2>&1 || note "installing the carried wheels FAILED"
        export PYTHONPATH="/tmp/site:$PYTHONPATH"
    fi
}

environment() {
    echo "# Environment of the GPU check"
    echo
    echo "## Versions"
    python3 - "$DEVICE" <<'PY'
import importlib.metadata as metadata
import platform
import sys

import torch

device = sys.argv[1]
print(f"- python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if device == "cuda" and torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    cusparselt = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else "unavailable"
    print(f"- card: {props.name}, compute capability {props.major}.{props.minor}, "
          f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs; cuSPARSELt {cusparselt}")
elif device == "cuda":
    print("- card: NONE VISIBLE (torch.cuda.is_available() is False): the GPU steps will fail")
else:
    print("- card: none (dry run on the CPU: every GPU code path is skipped)")
packages = ["transformers", "peft", "accelerate", "safetensors", "triton", "scipy", "huggingface_hub", "pytest"]
found, missing = [], []
for name in packages:
    try:
        found.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        missing.append(name)
print("- " + ", ".join(found))
if missing:
    print(f"- MISSING: {', '.join(missing)} (carry their wheels in .whl/, see the script's header)")
PY
    echo
    echo "## Driver"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.sm,clocks.max.sm,power.limit \
            --format=csv 2>&1
        echo
        nvidia-smi 2>&1
    else
        echo "nvidia-smi not found$([ "$DRY_RUN" = 1 ] && echo ' (dry run: skipped)')"
    fi
    echo
    echo "## Repository"
    git -C "$REPO" rev-parse HEAD 2>/dev/null || echo "commit unknown (no .git in this copy)"
    git -C "$REPO" status --short 2>/dev/null | head -20
}

dry_run_kernels() {
    # The dry run's triton step: what a GPU run would test, without running it (CI runs tests/kernels itself,
    # in Triton's CPU interpreter; the GPU cases skip without CUDA).
    local files
    files=$(ls tests/kernels/test_*.py) || return 1
    echo "dry run: not run here; on a GPU this step runs pytest on:"
    echo "$files"
}

gpu_test_files() {
    # Every test file with a GPU test, so that a module the GPU machine cannot import elsewhere in tests/
    # (an optional package it lacks) cannot stop the collection.
    grep -rlE "^ *@pytest\.mark\.gpu|^gpu = pytest\.mark\.gpu" tests --include='test_*.py' | grep -v '^tests/kernels/' | sort
}

summary_tail() {
    {
        echo
        if [ "$DRY_RUN" = 1 ]; then
            echo "Dry run: the GPU tests skipped without CUDA; the benchmarks ran at tiny shapes on the CPU with the"
            echo "dense masked weight standing in for the 2:4 kernel. Nothing here is a GPU figure."
        fi
        if [ -s "$OUT_DIR/gpu_tests.log" ]; then
            echo
            echo "## GPU tests"
            echo
            grep -E "^(FAILED|ERROR)|passed|failed|skipped" "$OUT_DIR/gpu_tests.log" | tail -15
            grep -E "passed|failed|dry run" "$OUT_DIR/triton.log" 2>/dev/null | tail -1 | sed 's/^/triton: /'
        fi
        if [ -s "$OUT_DIR/linear.md" ]; then
            echo
            grep -E "^2:4 module slower" "$OUT_DIR/linear.md"
            echo
            sed -n '/^## Dispatch table/,$p' "$OUT_DIR/linear.md"
        fi
        if [ -s "$OUT_DIR/e2e.md" ]; then
            echo
            sed -n '/^| model/,$p' "$OUT_DIR/e2e.md"
        fi
        if [ -s "$OUT_DIR/layer_time.jsonl" ]; then
            echo
            echo "## Seconds per decoder layer"
            echo
            python3 - "$OUT_DIR/layer_time.jsonl" <<'PY'
import json
import sys

for line in open(sys.argv[1]):
    if line.startswith("{"):
        r = json.loads(line)
        peak = f", peak {r['peak_gpu_memory_gb']} GiB" if "peak_gpu_memory_gb" in r else ""
        step = (f"; joint training {r['seconds_per_step_per_layer']} s per step per layer ({r['joint_batch']} windows)"
                if "seconds_per_step" in r else "")
        print(f"- {r['method']}: {r['seconds_per_layer']} s per layer ({r['shape']}, {r['calibration']}{peak}){step}")
PY
        fi
    } >> "$OUT_DIR/summary.md"
}

if [ "$DRY_RUN" = 1 ]; then
    note "DRY RUN on the CPU into $OUT_DIR: tiny shapes; GPU code paths are skipped (the GPU tests skip without CUDA)"
    TRITON=(dry_run_kernels)  # CI runs tests/kernels (Triton's interpreter); its GPU tests need CUDA
    LINEAR=(--device cpu --quick --tokens 1 16 --sweep-tokens 1 16)
    E2E=(--device cpu --layers 1 --hidden 128 --prefill 32 --decode 2 --repeats 1 --vocab 256 --decode-batch 1 2)
    LAYER_TIME=(--device cpu --hidden 64 --mlp 128 --heads 2 --layers 1 --num-samples 2 --seq-len 16 --steps 1
                --joint-steps 1 --joint-batch 1)
    export OMP_NUM_THREADS=1
else
    # The interpreter tests run in CI; the GPU image's numpy breaks Triton 3.6's interpreter (seen 2026-12-04).
    TRITON=(python3 -m pytest -p no:cacheprovider -q -rA tests/kernels -k "not interpreter")
    LINEAR=(--device cuda --repeats 20)
    E2E=(--device cuda --dtype fp16 --prefill 2048 --decode 32 --decode-batch 1 32)
    LAYER_TIME=(--device cuda --layers 1)  # default calibration (128 x 2048); CUDA warms up in the first method
fi

case ",$STEPS," in *",env,"*) install_carried_wheels ;; esac
run_step env 60 env.txt environment
mapfile -t GPU_TEST_FILES < <(gpu_test_files)
run_step gpu_tests 150 gpu_tests.log python3 -m pytest -p no:cacheprovider -q -rA -m gpu "${GPU_TEST_FILES[@]}"
run_step triton 90 triton.log "${TRITON[@]}"
run_step linear 150 linear.md python3 benchmarks/bench_linear.py "${LINEAR[@]}"
run_step e2e 150 e2e.md python3 benchmarks/bench_e2e.py "${E2E[@]}"
run_step layer_time 300 layer_time.jsonl python3 benchmarks/bench_learned_layer_time.py "${LAYER_TIME[@]}" \
    --methods learned gram lsq joint
summary_tail
note "done in $(( $(date +%s) - START )) s; results in $OUT_DIR"
cat "$OUT_DIR/summary.md"
case "${STATUS[*]}" in *FAILED*|*"TIMED OUT"*) exit 1 ;; esac
exit 0
