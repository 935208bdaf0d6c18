#!/usr/bin/env bash
# Run the ShizhenGPT server on a RunPod pod, with the model cached on the persistent volume.
#
#   ./deploy_runpod.sh                 setup, download, start
#   ./deploy_runpod.sh setup           venv on the volume (the image's CUDA torch, or vLLM's); idempotent
#   ./deploy_runpod.sh download        fetch MODEL_ID into $HF_HOME with resume and retries; verify the files
#   ./deploy_runpod.sh start           checks, then the server in the background; waits for /health
#   ./deploy_runpod.sh stop | restart | status | logs [-f] | help
#
# Configured by the server's environment variables (see .env.example), read from the environment and from
# $WORKSPACE/.env (the environment wins). Script-only: WORKSPACE (/workspace), VENV ($WORKSPACE/venv, or
# $WORKSPACE/venv-vllm with ENGINE=vllm), MODEL_DISK_GB and MODEL_VRAM_GB (what the model needs; estimated
# from MODEL_ID when unset), HF_TOKEN, VLLM_SPEC (the vLLM that setup installs; default: vllm).
#
# ENGINE=vllm: setup installs vLLM (with its own CUDA torch) and the server into $WORKSPACE/venv-vllm, and the
# server runs on vLLM. TENSOR_PARALLEL_SIZE=N splits the model across N GPUs (vLLM only: ENGINE=auto then
# means vllm); start refuses when fewer than N GPUs are visible. WARMUP defaults to 1: one short generation
# runs before /health says ready, so the first user does not wait for compilation.
#
# HOST defaults to 0.0.0.0 so that RunPod's proxy reaches the server, which makes it public: without API_KEY
# the script refuses to start it on any address but loopback (127.0.0.1, localhost, ::1), before setup and
# download. ALLOW_NO_API_KEY=1 serves without a key anyway, on purpose (behind a gateway that checks keys).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORKSPACE="${WORKSPACE:-/workspace}"

load_env_file() {
  local file="$1" line key value
  [[ -f "$file" ]] || return 0
  while IFS= read -r line || [[ -n "$line" ]]; do
    [[ "$line" =~ ^[[:space:]]*([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] || continue
    key="${BASH_REMATCH[1]}"
    value="${BASH_REMATCH[2]}"
    if [[ -z "${!key+set}" ]]; then
      export "$key=$value"
    fi
  done < "$file"
}
load_env_file "$WORKSPACE/.env"

export MODEL_ID="${MODEL_ID:-FreedomIntelligence/ShizhenGPT-32B-VL}"
export HF_HOME="${HF_HOME:-$WORKSPACE/models}"
export HOST="${HOST:-0.0.0.0}"
export PORT="${PORT:-8000}"
export WARMUP="${WARMUP:-1}"
export ENGINE="${ENGINE:-auto}"
export TENSOR_PARALLEL_SIZE="${TENSOR_PARALLEL_SIZE:-1}"
# Only vLLM splits a model across GPUs (tensor parallelism): with more than one, `auto` can only mean vLLM.
ENGINE_NOTE=""
if [[ "$ENGINE" == auto && "$TENSOR_PARALLEL_SIZE" =~ ^[1-9][0-9]*$ ]] && ((TENSOR_PARALLEL_SIZE > 1)); then
  ENGINE=vllm
  ENGINE_NOTE="ENGINE=auto with TENSOR_PARALLEL_SIZE=$TENSOR_PARALLEL_SIZE: using vllm (the transformers engine has no tensor parallelism)"
fi
# Each engine has its own venv on the volume: vLLM pins its own torch, which must not replace the image's
# CUDA torch that the transformers venv reuses; switching ENGINE back and forth reinstalls nothing.
if [[ "$ENGINE" == vllm ]]; then VENV="${VENV:-$WORKSPACE/venv-vllm}"; else VENV="${VENV:-$WORKSPACE/venv}"; fi
STATE_DIR="$WORKSPACE/shizhen"
PID_FILE="$STATE_DIR/server.pid"
LOG_FILE="$STATE_DIR/server.log"
# Not PYTHON: that name, when exported, tells the bootstrap scripts which interpreter to build the venv from.
VENV_PYTHON="$VENV/bin/python"

say() { printf '==> %s\n' "$*"; }
fail() {
  printf 'ERROR: %s\n' "$1" >&2
  [[ -n "${2:-}" ]] && printf '       What to do: %s\n' "$2" >&2
  exit 1
}

# What the model needs, in GB (weights on disk; VRAM with room for activations).
model_needs() {
  local disk vram
  case "$MODEL_ID" in
    *32B* | *32b*) disk=66 vram=70 ;;
    *7B* | *7b*) disk=17 vram=20 ;;
    *) disk=1 vram=1 ;;
  esac
  if [[ -d "$MODEL_ID" ]]; then
    disk=$(($(du -sk "$MODEL_ID" | cut -f1) / 1048576 + 1))
  fi
  echo "${MODEL_DISK_GB:-$disk} ${MODEL_VRAM_GB:-$vram}"
}

server_pid() {
  [[ -f "$PID_FILE" ]] || return 1
  local pid
  pid="$(cat "$PID_FILE")"
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

health() { curl -s --max-time 5 "http://127.0.0.1:$PORT/health"; }

is_loopback() {
  case "$1" in
    127.* | localhost | ::1 | "[::1]") return 0 ;;
    *) return 1 ;;
  esac
}

# A keyless server on a public address lets anyone with the proxy URL spend the GPU and read the answers, and
# a warning ends up in a log nobody reads: refuse unless the operator opts in. Checked once, before setup and
# download, so that the refusal comes in seconds rather than after a 64 GB download.
API_KEY_CHECKED=""
check_api_key() {
  [[ -z "$API_KEY_CHECKED" ]] || return 0
  API_KEY_CHECKED=1
  [[ -n "${API_KEY:-}" ]] && return 0
  if is_loopback "$HOST"; then
    say "WARNING: API_KEY is not set: any process on this machine can use the server (HOST=$HOST)."
    return 0
  fi
  case "${ALLOW_NO_API_KEY:-}" in
    1 | [Tt]rue | TRUE | [Yy]es | YES)
      say "WARNING: API_KEY is not set and ALLOW_NO_API_KEY=$ALLOW_NO_API_KEY: anyone who reaches $HOST:$PORT (on RunPod: anyone with the proxy URL) can use this GPU."
      return 0
      ;;
  esac
  fail "API_KEY is not set and the server would listen on $HOST: anyone with the proxy URL could use this GPU." \
    "Set API_KEY in the pod's environment or in $WORKSPACE/.env (scripts/runpod.py create sets one), or HOST=127.0.0.1; to serve without a key on purpose, set ALLOW_NO_API_KEY=1."
}

public_url() {
  if [[ -n "${RUNPOD_POD_ID:-}" ]]; then
    echo "https://${RUNPOD_POD_ID}-${PORT}.proxy.runpod.net"
  else
    echo "http://127.0.0.1:$PORT"
  fi
}

# ENGINE and TENSOR_PARALLEL_SIZE make sense together, before anything is installed or started.
ENGINE_CHECKED=""
check_engine() {
  [[ -z "$ENGINE_CHECKED" ]] || return 0
  ENGINE_CHECKED=1
  case "$ENGINE" in
    auto | transformers | vllm) ;;
    *) fail "ENGINE=$ENGINE is not an engine." "Set ENGINE to auto, transformers or vllm." ;;
  esac
  [[ "$TENSOR_PARALLEL_SIZE" =~ ^[1-9][0-9]*$ ]] ||
    fail "TENSOR_PARALLEL_SIZE=$TENSOR_PARALLEL_SIZE is not a whole number of GPUs." "Set TENSOR_PARALLEL_SIZE=1, 2, 4 ..."
  if [[ "$ENGINE" == transformers ]] && ((TENSOR_PARALLEL_SIZE > 1)); then
    fail "TENSOR_PARALLEL_SIZE=$TENSOR_PARALLEL_SIZE needs ENGINE=vllm: the transformers engine cannot split a model across GPUs by tensor parallelism." \
      "Set ENGINE=vllm (or leave ENGINE unset), or TENSOR_PARALLEL_SIZE=1."
  fi
  [[ -z "$ENGINE_NOTE" ]] || say "$ENGINE_NOTE"
}

# vLLM puts one worker on each of TENSOR_PARALLEL_SIZE GPUs; with fewer it fails only once the server is
# starting, with a message about vLLM's internals. Counted here instead, in a second, before any install.
GPU_COUNT_CHECKED=""
check_gpu_count() {
  local need="$TENSOR_PARALLEL_SIZE" seen
  [[ -z "$GPU_COUNT_CHECKED" ]] || return 0
  GPU_COUNT_CHECKED=1
  ((need > 1)) || return 0
  command -v nvidia-smi >/dev/null || fail "no GPU: nvidia-smi is not found." "Start the pod with $need GPUs (scripts/runpod.py create --gpu-count $need)."
  seen="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU [0-9]' || true)"
  if ((seen < need)); then
    fail "TENSOR_PARALLEL_SIZE=$need splits the model across $need GPUs, but nvidia-smi -L lists ${seen:-0} on this pod." \
      "Create the pod with --gpu-count $need (scripts/runpod.py create --gpu-count $need), or set TENSOR_PARALLEL_SIZE to the GPUs there are."
  fi
  say "tensor parallelism: the model is split across $need of the $seen GPUs"
}

cmd_setup() {
  [[ -d "$WORKSPACE" ]] || fail "$WORKSPACE does not exist." "Attach a volume mounted at /workspace, or set WORKSPACE."
  check_engine
  say "setting up $VENV (engine: $ENGINE)"
  if [[ "$ENGINE" == vllm ]]; then
    # pip install vllm (which brings its CUDA torch and transformers), then requirements-vllm.txt; a marker
    # file in the venv makes a second run a no-op. VLLM_SPEC=vllm: a GPU build even if setup runs while the
    # GPU is not visible (the script would otherwise choose the CPU build).
    VENV_VLLM="$VENV" VLLM_SPEC="${VLLM_SPEC:-vllm}" bash "$ROOT/scripts/bootstrap_vllm.sh"
  else
    # The image's CUDA torch is reused (system site packages); only what is missing is installed.
    VENV="$VENV" SYSTEM_SITE_PACKAGES=1 bash "$ROOT/scripts/bootstrap.sh"
  fi
  command -v curl >/dev/null || fail "curl is missing." "apt-get install -y curl"
}

check_volume() {
  local need_disk="$1" free_gb
  mkdir -p "$HF_HOME"
  local home volume
  home="$(cd "$HF_HOME" && pwd -P)"
  volume="$(cd "$WORKSPACE" && pwd -P)"
  [[ "$home/" == "$volume/"* ]] ||
    fail "HF_HOME=$HF_HOME is not on the volume $WORKSPACE: the model would be lost at every stop." \
      "Set HF_HOME=$WORKSPACE/models."
  free_gb=$(($(df -Pk "$HF_HOME" | awk 'NR==2 {print $4}') / 1048576))
  if ((free_gb < need_disk + 5)); then
    fail "$WORKSPACE has ${free_gb} GB free; the model needs ${need_disk} GB plus 5 GB of margin." \
      "Grow the volume (pod settings) or remove old models from $HF_HOME."
  fi
}

cmd_download() {
  read -r need_disk _ <<<"$(model_needs)"
  [[ -d "$MODEL_ID" ]] || check_volume "$need_disk"
  say "fetching $MODEL_ID"
  "$VENV_PYTHON" "$ROOT/scripts/fetch_model.py" || fail "the model is not complete." \
    "Run ./deploy_runpod.sh download again (it resumes); for gated models set HF_TOKEN."
}

check_gpu() {
  local need_vram="$1" line name total used free
  check_gpu_count
  # With tensor parallelism each GPU holds its share of the weights and the cache.
  need_vram=$(((need_vram + TENSOR_PARALLEL_SIZE - 1) / TENSOR_PARALLEL_SIZE))
  command -v nvidia-smi >/dev/null || fail "no GPU: nvidia-smi is not found." "Start the pod with a GPU (A100 80GB for the 32B model)."
  # The first GPU's line, without `| head -n 1`: under pipefail, head closing the pipe early on a
  # multi-GPU machine can fail nvidia-smi with SIGPIPE.
  line="$(nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader,nounits --id=0)" ||
    fail "nvidia-smi cannot read the GPU." "Restart the pod; if it persists, recreate it on another host."
  IFS=',' read -r name total used <<<"$line"
  free=$(((${total// /} - ${used// /}) / 1024))
  say "GPU: ${name# } with $((${total// /} / 1024)) GB, ${free} GB free"
  if ((free < need_vram)); then
    fail "the GPU has ${free} GB free; $MODEL_ID needs about ${need_vram} GB." \
      "Use an 80 GB card (A100/H100), stop other GPU processes, or serve a smaller model (ShizhenGPT-7B-VL)."
  fi
}

check_port() {
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    fail "port $PORT is already in use." "Stop what listens there (./deploy_runpod.sh stop) or set PORT."
  fi
}

cmd_start() {
  if pid="$(server_pid)"; then
    say "already running (pid $pid)"
    return 0
  fi
  check_api_key
  check_engine
  read -r _ need_vram <<<"$(model_needs)"
  check_gpu "$need_vram"
  check_port
  [[ -x "$VENV_PYTHON" ]] || fail "$VENV is not set up." "Run ./deploy_runpod.sh setup"
  mkdir -p "$STATE_DIR"
  say "starting the server: ENGINE=$ENGINE, TENSOR_PARALLEL_SIZE=$TENSOR_PARALLEL_SIZE, WARMUP=$WARMUP (log: $LOG_FILE)"
  (
    cd "$ROOT" || exit 1
    # Only the server goes to the background (so $! is its pid), detached from this terminal's output.
    nohup "$VENV_PYTHON" -m backend >>"$LOG_FILE" 2>&1 </dev/null &
    echo $! >"$PID_FILE"
  )
  local deadline=$((SECONDS + ${START_TIMEOUT:-1800})) status=""
  while ((SECONDS < deadline)); do
    server_pid >/dev/null || {
      tail -n 30 "$LOG_FILE" >&2
      fail "the server exited while starting (log above)." "Fix the cause shown, then ./deploy_runpod.sh start"
    }
    status="$(health | sed -n 's/.*"status":"\([a-z]*\)".*/\1/p' || true)"  # not listening yet: keep waiting
    [[ "$status" == ready ]] && break
    [[ "$status" == error ]] && fail "the model failed to load: $(health || true)" "See $LOG_FILE"
    sleep 2
  done
  [[ "$status" == ready ]] || fail "the server did not become ready in time." "See $LOG_FILE"
  local url
  url="$(public_url)"
  say "ready: $url"
  local auth=""
  # shellcheck disable=SC2016 # printed for the user's shell to expand: the key itself is never shown
  [[ -n "${API_KEY:-}" ]] && auth='-H "Authorization: Bearer $API_KEY" '
  cat <<EOF

Try it:
  curl $url/v1/chat/completions -H 'Content-Type: application/json' ${auth}\\
    -d '{"messages":[{"role":"user","content":"舌苔薄白是什么意思？"}],"max_tokens":128}'
  curl $url/v1/vision/analyze ${auth}-F image=@tongue.jpg -F task=tongue
Web chat: $url/
EOF
}

cmd_stop() {
  local pid grace
  if ! pid="$(server_pid)"; then
    say "not running"
    rm -f "$PID_FILE"
    return 0
  fi
  grace="${SHUTDOWN_GRACE_SECONDS:-30}"
  say "stopping pid $pid (running requests get ${grace%.*} s to finish)"
  kill -TERM "$pid"
  local deadline=$((SECONDS + ${grace%.*} + 15))
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  rm -f "$PID_FILE"
  say "stopped"
}

cmd_status() {
  local pid
  if pid="$(server_pid)"; then say "process: running (pid $pid)"; else say "process: not running"; fi
  say "health: $(health || echo unreachable)"
  if command -v nvidia-smi >/dev/null; then
    say "GPU memory (MiB used / total): $(nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader,nounits --id=0)"
  fi
  say "url: $(public_url)"
}

cmd_logs() {
  [[ -f "$LOG_FILE" ]] || fail "no log yet at $LOG_FILE." "Start the server first."
  if [[ "${1:-}" == "-f" ]]; then tail -n 100 -f "$LOG_FILE"; else tail -n "${LINES_SHOWN:-100}" "$LOG_FILE"; fi
}

cmd_help() {
  # The comment at the top of this file, up to `set -euo pipefail`, is the help.
  sed -n '2,/^set -euo pipefail$/{/^set /d;s/^# \{0,1\}//;p;}' "${BASH_SOURCE[0]}"
}

case "${1:-all}" in
  all) check_api_key && check_engine && check_gpu_count && cmd_setup && cmd_download && cmd_start ;;
  setup) cmd_setup ;;
  download) cmd_download ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  restart) check_api_key && check_engine && check_gpu_count && cmd_stop && cmd_start ;; # refuse before stopping the running server
  status) cmd_status ;;
  logs) cmd_logs "${2:-}" ;;
  help | -h | --help) cmd_help ;;
  *)
    echo "usage: $0 [setup|download|start|stop|restart|status|logs [-f]|help]" >&2
    exit 2
    ;;
esac
