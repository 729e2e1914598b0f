#!/usr/bin/env bash
# Prepared commands for a session that has a GPU: GPU tests and benchmark modes, output in $OUT
# (default out/gpu): device.txt, log.txt and one bench-<mode>.json per mode (at most 7 files).
#   bash scripts/gpu_session.sh                     # everything
#   bash scripts/gpu_session.sh tests kernels       # or in two calls, each within 10 minutes:
#   bash scripts/gpu_session.sh e2e lora
# On the lent machines (torch and triton present, diffusers absent) carry the wheels that
# ../shared/gpu/wheels.sh downloads and install them first, as that script prints. Afterwards copy
# bench-*.json to docs/benchmarks/<date>-<device>-<mode>.json and record the figures, device named,
# in docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:-}:$PWD"
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(tests kernels e2e lora)
{ nvidia-smi || true; python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"; } \
  >> "$OUT/device.txt" 2>&1
status=0
for part in "${parts[@]}"; do
  echo "=== $part $(date -u +%FT%TZ)" >> "$OUT/log.txt"
  case "$part" in
    tests) python -m pytest -q -p no:cacheprovider tests/test_kernels_reference.py tests/test_kernels_triton.py \
             tests/test_kernels_cuda.py >> "$OUT/log.txt" 2>&1 || status=1 ;;
    kernels|e2e|lora) python scripts/bench.py --mode "$part" --json "$OUT/bench-$part.json" >> "$OUT/log.txt" 2>&1 \
             || status=1 ;;
    *) echo "unknown part $part (tests, kernels, e2e, lora)" >&2; exit 2 ;;
  esac
done
tail -n 40 "$OUT/log.txt"
echo "files in $OUT: $(ls "$OUT" | tr '\n' ' ')(status $status)"
exit $status
