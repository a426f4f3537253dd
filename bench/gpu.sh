#!/usr/bin/env bash
# Run the library comparison on one CUDA GPU in under 10 minutes, then write the report.
#
# Needs a Python with a CUDA build of torch 2.13.0 and the packages of bench/setup_env.sh. By default the
# script builds that venv with setup_env.sh (on a machine whose pip serves the CUDA wheel of
# torch 2.13.0, as PyPI does on Linux x86_64). Set BENCH_PYTHON to use another interpreter, and
# CUDA_VISIBLE_DEVICES to pick the GPU. Extra arguments go to run.py, for example --repeats 2.
#
# The time budget stops starting new configurations after 9 minutes; the rest are recorded as
# skipped. The models run in the order llama-128m, bert-base, minilm, so a cut loses MiniLM first.
set -euo pipefail

BENCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "${BENCH_PYTHON:-}" ]]; then
    bash "$BENCH/setup_env.sh"
    BENCH_PYTHON="${BENCH_VENV:-/work/venv-bench}/bin/python"
fi

"$BENCH_PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else
    f"torch {torch.__version__} sees no CUDA device; install a CUDA build of torch or run bench/run.py on the CPU")'

stamp="$(date -u +%Y%m%dT%H%M%SZ)"
results="$BENCH/results/${stamp}-gpu.json"
# More warm-up than on the CPU, because the first CUDA steps include cuBLAS algorithm selection and
# allocator growth. More timed forward passes, because each takes only milliseconds.
"$BENCH_PYTHON" "$BENCH/run.py" --device cuda --threads 4 --warmup 5 --steps 30 --inference-steps 50 \
    --models llama-128m bert-base minilm --time-budget-s 540 --config-timeout-s 240 --output "$results" "$@"
"$BENCH_PYTHON" "$BENCH/report.py" "$results" --output "$BENCH/RESULTS-gpu.md" --plot "$BENCH/ratios-gpu.png"
