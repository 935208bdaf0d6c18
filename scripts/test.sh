#!/usr/bin/env bash
# Install what the tests need (.venv, and .venv-vllm for the vLLM engine's tests), then run the whole suite
# (arguments go to pytest). tests/e2e/test_engines.py runs the engine-dependent tests on both engines.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh" --dev
bash "$root/scripts/bootstrap_vllm.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
