#!/usr/bin/env bash
# Start the Cog HTTP server (coglet) without Docker, serving predict.py:Predictor.
#   bash scripts/serve.sh [PORT]        (default 5000; HOST defaults to 127.0.0.1)
# Then: GET /health-check, POST /predictions, GET /openapi.json. Needs `bash scripts/install.sh` first.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export PORT="${1:-${PORT:-5000}}" COG_PREDICT_TYPE_STUB=predict.py:Predictor
# cog.yaml's concurrency.max, as `cog build` bakes it into the image (predict.py says why it is 2).
COG_MAX_CONCURRENCY="${COG_MAX_CONCURRENCY:-$(sed -n '/^concurrency:/,/^[^ #]/s/^ *max: *\([0-9][0-9]*\).*/\1/p' cog.yaml)}"
export COG_MAX_CONCURRENCY="${COG_MAX_CONCURRENCY:-1}"
exec python -m cog.server.http --host "${HOST:-127.0.0.1}"
