#!/usr/bin/env bash
# The prepared GPU session: ONE call of at most 8 minutes on a lent machine (torch 2.11 + CUDA 13,
# Triton 3.6), most valuable part first, each part a separate process under its own timeout that
# writes $OUT/<part>.json as it goes (scripts/gpu_session.py), so a crash or a timeout in one part
# leaves the others. Output in $OUT (default out/gpu): log.txt (device, every part's output and
# exit status) and one JSON per part. The device tool returns at most 8 files: 1 log + 5 parts
# here leaves 2 for the hooks below.
#   bash scripts/gpu_session.sh                 # every part
#   bash scripts/gpu_session.sh kernels step    # some parts
#   SIZE=tiny bash scripts/gpu_session.sh       # the same code at tiny sizes (tests/test_gpu_session.py, CPU)
# The machine lacks diffusers: carry the wheels ../shared/gpu/wheels.sh downloads (.whl/, about
# 5 MiB); they are installed below when present. Then copy the JSON to
# docs/benchmarks/<date>-<device>-<part>.json and record the figures, device named, in docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
SIZE=${SIZE:-full}
LIMIT_SCALE=${LIMIT_SCALE:-1}  # the CPU test's interpreter runs slower than a GPU: it scales the limits
mkdir -p "$OUT"
LOG="$OUT/log.txt"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$LOG" 2>&1 && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{ date -u +%FT%TZ; nvidia-smi 2>&1 | head -n 15 || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1; } >> "$LOG"

TINY=""; [ "$SIZE" = tiny ] && TINY="--tiny"
# name, timeout in seconds (sum <= 450 with the hooks), command line: evaluated when the part runs,
# so it may use $PY, $OUT, $SIZE and $TINY (--tiny at SIZE=tiny). Most valuable first.
PARTS=(
  'kernels 110 $PY scripts/gpu_session.py kernels --out $OUT --size $SIZE'
  'compile 70 $PY scripts/gpu_session.py compile --out $OUT --size $SIZE'
  'bench 60 $PY scripts/gpu_session.py bench --out $OUT --size $SIZE'
  'step 45 $PY scripts/gpu_session.py step --out $OUT --size $SIZE'
  'memory 60 $PY scripts/gpu_session.py memory --out $OUT --size $SIZE'
  'post 35 $PY scripts/gpu_session.py post --out $OUT --size $SIZE'
  'hopper_gemm 70 $PY scripts/gpu_hopper_gemm.py $TINY --out $OUT/hopper_gemm.json'
  # Not run on the lent machine: scripts/gpu_stages.py times one image stage by stage and needs the
  # real model folder (about 18 GB: neither carried nor downloadable there). On a GPU host with
  # the weights: python scripts/gpu_stages.py --model <folder> --checkpoint <file> --json stages.json
)
wanted=("$@")
status=0
for entry in "${PARTS[@]}"; do
  read -r name limit cmd <<< "$entry"
  if [ ${#wanted[@]} -gt 0 ] && [[ ! " ${wanted[*]} " == *" $name "* ]]; then continue; fi
  echo "=== $name (limit ${limit}s) $(date -u +%T)" >> "$LOG"
  start=$SECONDS
  eval "timeout -k 5 $((limit * LIMIT_SCALE)) $cmd" >> "$LOG" 2>&1
  rc=$?
  [ $rc -eq 124 ] && echo "=== $name: TIMED OUT after $((limit * LIMIT_SCALE))s (its JSON holds the cases it finished)" >> "$LOG"
  echo "=== $name: exit $rc in $((SECONDS - start))s" >> "$LOG"
  [ $rc -eq 0 ] || status=1
done
grep '^===' "$LOG"
echo "files in $OUT: $(ls "$OUT" | tr '\n' ' ')(status $status)"
exit $status
