#!/usr/bin/env bash
# Create .venv/ and install the pinned requirements into it; idempotent and quiet when done.
#   bash scripts/install.sh            runtime packages
#   bash scripts/install.sh --dev      runtime + test tools
# torch: TORCH_SPEC (default torch==2.13.0, the CPU wheel on these machines). On a GPU machine
# install the CUDA build first, e.g. `pip install torch==2.13.0 --index-url <pytorch cu index>`,
# and the already-installed torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=".venv/.installed-$(cat requirements.txt requirements-dev.txt requirements-dev-nodeps.txt pyproject.toml cog.yaml | sha256sum | cut -c1-16)-${1:-run}"
# pip's exit status is kept; only this machine's noise about absent local index folders is dropped.
pipq() { python -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v '^WARNING: Location' >&2); }
if [ ! -f "$stamp" ]; then
  python -c "import torch" 2>/dev/null || pipq "${TORCH_SPEC:-torch==2.13.0}"
  # requirements.txt is the image's: its torch is the CUDA 12.8 build from PyTorch's index and
  # its kernel package needs nvcc. Here torch is the one above and the kernels build just in
  # time (engine/kernels/cuda), so those lines are left out.
  grep -v -E '^(--extra-index-url|torch==|\./)' requirements.txt > .venv/requirements-local.txt
  # The Cog SDK: the version cog.yaml pins for the image (build.sdk_version).
  echo "cog==$(sed -n 's/^ *sdk_version: *"\(.*\)"/\1/p' cog.yaml)" >> .venv/requirements-local.txt
  pipq -r .venv/requirements-local.txt
  if [ "${1:-}" = "--dev" ]; then
    pipq -r requirements-dev.txt
    pipq --no-deps -r requirements-dev-nodeps.txt
  fi
  pipq --no-deps -e .
  python -c "import torch, diffusers, transformers, safetensors, PIL, cog" || { echo "install failed" >&2; exit 1; }
  touch "$stamp"
fi
# The ingress test (tests/test_ingress.py) runs Debian's nginx in front of the server: installed
# here where that is possible (root and apt-get); otherwise that test is skipped, saying why.
# (On a host with systemd, Debian's package also starts an nginx service on port 80.)
if [ "${1:-}" = "--dev" ] && ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -q --no-install-recommends nginx-light \
      || { apt-get update -q && apt-get install -y -q --no-install-recommends nginx-light; }; } >/dev/null 2>&1 \
      || echo "nginx could not be installed with apt-get: tests/test_ingress.py will be skipped" >&2
  else
    echo "nginx is not installed (needs root and apt-get here): tests/test_ingress.py will be skipped" >&2
  fi
fi
