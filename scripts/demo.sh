#!/usr/bin/env bash
# The main job: install everything, start the Cog HTTP server (tiny model without a GPU), send a
# real prediction, write the returned images under out/ and print their paths.
#   bash scripts/demo.sh [--prompt "..."] [--seed N] [--out DIR] [name=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
python scripts/demo_predict.py "$@"
