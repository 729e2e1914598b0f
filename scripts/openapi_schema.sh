#!/usr/bin/env bash
# Write Cog's OpenAPI schema for predict.py to stdout (or to the file given as $1).
# coglet 0.23.1 validates inputs against .cog/openapi_schema.json (422 on bad input); the cog
# CLI writes that file at build time, and here cog==0.16.12's schema tool does, in a venv of its
# own (.venv-schema/) since it conflicts with cog 0.23.1.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-schema/bin/python ]; then
  python3 -m venv .venv-schema
  .venv-schema/bin/python -m pip install -q --disable-pip-version-check cog==0.16.12 \
    2> >(grep -v '^WARNING: Location' >&2)
fi
# That old tool reads the predictor from cog.yaml's deprecated `predict:` key; ours uses `run:`,
# so it is handed over the way coglet takes it too (COG_PREDICT_TYPE_STUB).
stub=$(sed -n 's/^run: *"\(.*\)"/\1/p' cog.yaml)
out=$(COG_PREDICT_TYPE_STUB="$stub" .venv-schema/bin/python -m cog.command.openapi_schema)
if [ -n "${1:-}" ]; then mkdir -p "$(dirname "$1")"; printf '%s\n' "$out" > "$1"; else printf '%s\n' "$out"; fi
