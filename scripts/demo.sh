#!/usr/bin/env bash
# Install what is needed, write a small offline checkpoint, and start the server on it at
# http://127.0.0.1:8000 (override with HOST/PORT). Ctrl+C stops it.
#
#   ./scripts/demo.sh              the transformers engine (.venv)
#   ENGINE=vllm ./scripts/demo.sh  the vLLM engine (.venv-vllm, made by scripts/bootstrap_vllm.sh; on a CPU
#                                  vLLM starts in about a minute, with ENFORCE_EAGER=true unless you set it)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
engine="${ENGINE:-transformers}"
bash "$root/scripts/bootstrap.sh"
python="$root/.venv/bin/python"
model="$root/.cache/tiny-vl"
size=tiny
if [[ "$engine" == vllm ]]; then
  bash "$root/scripts/bootstrap_vllm.sh"
  # vLLM's CPU attention needs a head size of 64 or more: the `small` checkpoint has it, `tiny` has 16.
  model="$root/.cache/small-vl"
  size=small
  export ENFORCE_EAGER="${ENFORCE_EAGER:-true}" MAX_MODEL_LEN="${MAX_MODEL_LEN:-8192}"
fi

stamp="$model/.made-by.sha256"
wanted="$(sha256sum "$root/scripts/make_tiny_model.py" | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$wanted" ]]; then
  "$python" "$root/scripts/make_tiny_model.py" --out "$model" --size "$size"
  echo "$wanted" > "$stamp"
fi

cd "$root"
export MODEL_ID="$model" ENGINE="$engine"
export SERVED_MODEL_NAME="${SERVED_MODEL_NAME:-shizhengpt-tiny}"
export HF_HUB_OFFLINE=1
if [[ "$engine" == vllm ]]; then
  exec "$root/.venv-vllm/bin/python" -m backend
fi
exec "$python" -m backend
