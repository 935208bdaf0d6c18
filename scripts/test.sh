#!/usr/bin/env bash
# Install what the tests need, then run the whole suite (arguments go to pytest).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh" --dev
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
