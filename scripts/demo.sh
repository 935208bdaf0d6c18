#!/usr/bin/env bash
# Install what is needed, write the tiny offline checkpoint, and start the server on it at
# http://127.0.0.1:8000 (override with HOST/PORT). Ctrl+C stops it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
python="$root/.venv/bin/python"

model="$root/.cache/tiny-vl"
stamp="$model/.made-by.sha256"
wanted="$(sha256sum "$root/scripts/make_tiny_model.py" | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$wanted" ]]; then
  "$python" "$root/scripts/make_tiny_model.py" --out "$model"
  echo "$wanted" > "$stamp"
fi

cd "$root"
export MODEL_ID="$model"
export SERVED_MODEL_NAME="${SERVED_MODEL_NAME:-shizhengpt-tiny}"
export HF_HUB_OFFLINE=1
exec "$python" -m backend
