#!/usr/bin/env bash
# The main job: install everything, then run the quantization report on an outlier layer.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
python scripts/quant_report.py "$@"
