#!/usr/bin/env bash
# Everything steadytune needs on a fresh Debian/Ubuntu machine (idempotent): OpenBLAS for fast
# CPU matmuls on Linux, Chromium for the report test (CI only), and a virtualenv in .venv with
# steadytune and its dev tools installed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname)" = Linux ]; then
  need=()
  [ -e "/usr/lib/$(uname -m)-linux-gnu/libopenblas.so.0" ] || need+=(libopenblas0-pthread)
  if [ "${STEADYTUNE_SETUP_CHROMIUM:-${CI:-}}" ] && ! command -v chromium >/dev/null; then need+=(chromium); fi
  if [ ${#need[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq && $sudo apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import steadytune, mlx.core as mx; from steadytune.backend import fast_blas; print('steadytune ready: mlx', mx.__version__, mx.default_device(), '| fast BLAS:', fast_blas() or 'none')"
