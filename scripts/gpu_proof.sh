#!/usr/bin/env bash
# Measure the full-size ShizhenGPT-32B-VL architecture on this machine's GPU, on one engine or both: the one
# command to run the day a GPU is lent. Random weights (LOAD_FORMAT=dummy): nothing is downloaded, and the
# architecture, memory and speed are the real model's.
#
#   scripts/gpu_proof.sh [transformers|vllm|both]      (default both)
#
# Steps: the venvs (scripts/bootstrap.sh; scripts/bootstrap_vllm.sh for vllm), the full-size folder
# (scripts/make_tiny_model.py --size full: config and tokenizer, no weights), then per engine the server with
# MODEL_ID=that folder, LOAD_FORMAT=dummy, MAX_MODEL_LEN=4096 on a free port, measured by
# scripts/gpu_measure.py: GPU memory after load, its peak during a ~2,048-token + one-image request, latency
# and time to first token of 100-token text and image answers, and scripts/bench.py at 1, 8, 32 clients.
# Results: .cache/gpu-proof/<UTC time>/<engine>/ (result.json, server.log, bench.*) and summary.md.
#
# Environment (optional): MAX_MODEL_LEN (4096), CONCURRENCY (1,8,32), BENCH_DURATION (30 s per level),
# LOAD_TIMEOUT (1800 s), GPU_PROOF_MODEL_DIR (.cache/full-vl), GPU_PROOF_RESULTS (.cache/gpu-proof),
# VENV_VLLM (.venv-vllm); server settings such as TENSOR_PARALLEL_SIZE or DTYPE pass through to the servers.
# Without an NVIDIA GPU it refuses at once, with exit status 2.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { echo "usage: scripts/gpu_proof.sh [transformers|vllm|both]" >&2; }
if (($# > 1)); then
  usage
  exit 2
fi
case "${1:-both}" in
  transformers | vllm) engines=("$1") ;;
  both) engines=(transformers vllm) ;;
  -h | --help)
    sed -n '2,/^set -euo pipefail$/{/^set /d;s/^# \{0,1\}//;p;}' "${BASH_SOURCE[0]}"
    exit 0
    ;;
  *)
    usage
    exit 2
    ;;
esac

# Refuse before installing anything: on a machine without a GPU the 32B model would not fit, and the numbers
# would mean nothing.
gpus=""
if ! command -v nvidia-smi >/dev/null 2>&1 || ! gpus="$(nvidia-smi -L 2>&1)" || ! grep -q '^GPU [0-9]' <<<"$gpus"; then
  echo "gpu_proof: no NVIDIA GPU here (\`nvidia-smi -L\` is missing, failed or lists none): this measures the" \
    "full-size 32B model on a GPU and cannot run without one." >&2
  echo "  What to do: run it on a machine with an NVIDIA GPU (80 GB or more, or TENSOR_PARALLEL_SIZE=2 on two)." >&2
  exit 2
fi
echo "gpu_proof: engines: ${engines[*]}; GPUs:"
echo "$gpus"

# .venv serves the transformers engine, writes the folder and runs the measuring client; .venv-vllm serves vLLM.
bash "$root/scripts/bootstrap.sh"
python="$root/.venv/bin/python"
venv_vllm="${VENV_VLLM:-$root/.venv-vllm}"
for engine in "${engines[@]}"; do
  if [[ "$engine" == vllm ]]; then VENV_VLLM="$venv_vllm" bash "$root/scripts/bootstrap_vllm.sh"; fi
done

model_dir="${GPU_PROOF_MODEL_DIR:-$root/.cache/full-vl}"
if [[ ! -f "$model_dir/config.json" ]]; then
  echo "gpu_proof: writing the full-size folder $model_dir"
  "$python" "$root/scripts/make_tiny_model.py" --size full --out "$model_dir"
fi

results="${GPU_PROOF_RESULTS:-$root/.cache/gpu-proof}/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$results"
{
  echo "$gpus"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  echo "commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$root" diff --quiet 2>/dev/null || echo ' (with local changes)')"
  echo "started $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$results/machine.txt"

status=0
for engine in "${engines[@]}"; do
  if [[ "$engine" == vllm ]]; then server_python="$venv_vllm/bin/python"; else server_python="$python"; fi
  echo "gpu_proof: measuring $engine (server log: $results/$engine/server.log)"
  # One engine failing (out of memory, say) still lets the other be measured; the exit status says so.
  "$python" "$root/scripts/gpu_measure.py" run --engine "$engine" --server-python "$server_python" \
    --model-dir "$model_dir" --out "$results/$engine" --max-model-len "${MAX_MODEL_LEN:-4096}" \
    --concurrency "${CONCURRENCY:-1,8,32}" --duration "${BENCH_DURATION:-30}" \
    --load-timeout "${LOAD_TIMEOUT:-1800}" || status=1
done
"$python" "$root/scripts/gpu_measure.py" summary "$results"
echo "gpu_proof: results in $results (summary.md)"
exit "$status"
