#!/usr/bin/env bash
# Everything steadytune needs on a fresh Debian/Ubuntu machine or Mac (idempotent): OpenBLAS for fast
# CPU matmuls on Linux, Chromium for the report test (CI only), and a virtualenv in .venv with
# steadytune and its dev tools installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname)" = Linux ]; then
  need=()
  [ -e "/usr/lib/$(uname -m)-linux-gnu/libopenblas.so.0" ] || need+=(libopenblas0-pthread)
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  if [ ${#need[@]} -gt 0 ]; then
    $sudo apt-get update -qq && $sudo apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  # Chromium only renders the report in one test (skipped without it); GitHub's Ubuntu images
  # have google-chrome, and Ubuntu has no chromium package: never fail the set-up for it.
  if [ "${STEADYTUNE_SETUP_CHROMIUM:-${CI:-}}" ] && ! command -v chromium >/dev/null \
      && ! command -v chromium-browser >/dev/null && ! command -v google-chrome >/dev/null; then
    { $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium; } >/dev/null 2>&1 \
      || echo "note: no Chromium (the browser test will be skipped)"
  fi
fi
# macOS: no apt, nothing to install first (MLX uses Metal and Accelerate); Apple's own python3 is
# 3.9, too old: PYTHON=python3.12 bash scripts/setup.sh picks another.
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
    echo "steadytune needs Python 3.10 or newer; $py is $("$py" --version 2>&1). Install one (macOS: brew install python@3.12) and run: PYTHON=python3.12 bash scripts/setup.sh" >&2
    exit 1
  }
  "$py" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import steadytune, mlx.core as mx; from steadytune.backend import fast_blas; print('steadytune ready: mlx', mx.__version__, mx.default_device(), '| fast BLAS:', fast_blas() or 'none')"
