#!/usr/bin/env bash
# Create the project's virtual environment (.venv) and install what the server needs; `--dev` adds what
# the tests need. Safe to run again: it only installs when a requirements file changed.
#
#   TORCH_SPEC       the torch to install when none is importable (default torch==2.13.0)
#   TORCH_INDEX_URL  where to get it, e.g. https://download.pytorch.org/whl/cpu for a small CPU-only build
#   PYTHON           the interpreter to build the venv from (default: python3.11, else python3)
#   SYSTEM_SITE_PACKAGES=1  let the venv see the interpreter's packages (reuse a GPU image's CUDA torch)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
requirements=("$root/requirements.txt")
if [[ "${1:-}" == "--dev" ]]; then
  requirements=("$root/requirements-dev.txt")
fi

python="${PYTHON:-$(command -v python3.11 || command -v python3 || true)}"
if [[ -z "$python" ]]; then
  echo "bootstrap: Python 3.11 or newer is needed (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "bootstrap: $python is $("$python" --version 2>&1); Python 3.11 or newer is needed" >&2
  exit 1
fi

if [[ ! -x "$venv/bin/python" ]]; then
  echo "bootstrap: creating $venv" >&2
  if [[ "${SYSTEM_SITE_PACKAGES:-0}" == 1 ]]; then
    "$python" -m venv --system-site-packages "$venv"
  else
    "$python" -m venv "$venv"
  fi
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

# Marker files named after the requirements' digest: nothing to do when they have not changed.
digest="$(cat "$root/requirements-server.txt" "$root/requirements.txt" "$root/requirements-dev.txt" | sha256sum | cut -c1-16)"
dev_marker="$venv/.installed-dev-$digest"
marker="$venv/.installed-$digest"
if [[ -f "$dev_marker" || ( "${requirements[0]}" == "$root/requirements.txt" && -f "$marker" ) ]]; then
  exit 0
fi

if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  spec="${TORCH_SPEC:-torch==2.13.0}"
  echo "bootstrap: installing $spec" >&2
  if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    "${pip[@]}" install --quiet --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple "$spec"
  else
    "${pip[@]}" install --quiet "$spec"
  fi
fi
echo "bootstrap: installing ${requirements[*]##*/}" >&2
"${pip[@]}" install --quiet -r "${requirements[0]}"
rm -f "$venv"/.installed-*
if [[ "${requirements[0]}" == "$root/requirements-dev.txt" ]]; then touch "$dev_marker"; else touch "$marker"; fi
