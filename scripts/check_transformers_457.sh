#!/usr/bin/env bash
# Run adapterkit's non-slow tests under transformers 4.57.6, the oldest version pyproject.toml allows.
#
# The tests normally run in .venv on transformers 5.x. This script keeps a second venv at
# $VENV (default /work/venv457), builds it when missing and runs the suite there.
# Extra arguments go to pytest, for example a test file or -k EXPR; the default is the whole tests/ folder.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-/work/venv457}"
PYTHON="$VENV/bin/python"

if [[ ! -x "$PYTHON" ]]; then
    echo "Building $VENV (torch 2.13.0, transformers 4.57.6)"
    python3.11 -m venv "$VENV"
    # torch first and pinned: this version is installed from local disk, any other downloads gigabytes.
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" install -q transformers==4.57.6 safetensors datasets pandas pyarrow tqdm matplotlib pytest
    "$VENV/bin/pip" install -q --no-deps -e "$REPO"
fi

# The tests also need the [samples,test] extras. The constraints keep pip from replacing torch or
# transformers while it resolves them. When all is installed, pip only reinstalls the editable adapterkit.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
printf 'torch==2.13.0\ntransformers==4.57.6\n' > "$constraints"
"$VENV/bin/pip" install -q -e "$REPO[samples,test]" -c "$constraints" 2>&1 | grep -v "is ignored" || true

"$PYTHON" -c 'import sys, torch, transformers; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")'

if [[ $# -eq 0 ]]; then
    set -- "$REPO/tests"
fi
"$PYTHON" -m pytest -m "not slow" -q -p no:cacheprovider "$@"
