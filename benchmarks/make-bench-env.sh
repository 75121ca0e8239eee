#!/usr/bin/env bash
# Separate environment for benchmarks/bench_sae_step.py: it needs the `overcomplete` package,
# which imports torchvision and OpenCV at import time. PyPI's torchvision does not import beside
# the project's torch 2.13.0, so this environment pins a matching torch/torchvision pair. It is
# kept out of the test set-up on purpose; the folder ignores itself for git (its own .gitignore).
# The benchmark reports the torch of this environment (all its contenders run in one process)
# beside the project's own (.venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV_BENCH:-.venv-bench}"
test -x "$VENV/bin/python" || python3 -m venv "$VENV"
echo "*" > "$VENV/.gitignore"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/pip" install --quiet opencv-python-headless "matplotlib<3.9" overcomplete
"$VENV/bin/pip" install --quiet numpy safetensors tqdm huggingface-hub pillow
"$VENV/bin/pip" install --quiet --no-deps -e .
"$VENV/bin/python" -c "import overcomplete, torch, visae; print('bench env ok: torch', torch.__version__, '/ overcomplete', overcomplete.__version__)"
