#!/usr/bin/env bash
# Install everything (with test tools) and run the linter and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
. .venv/bin/activate
ruff check .
python -m pytest -q -n auto "$@"
