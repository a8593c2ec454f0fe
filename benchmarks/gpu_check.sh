#!/usr/bin/env bash
# The base recipes on one GPU in one command: throughput, MFU, memory and bf16 numerics
# (benchmarks/gpu_check.py; every step under its own `timeout`, so one failure does not eat the
# budget; everything is written under $OUT, the summary table is printed last).
#
# Before the device run, on the CPU here (renders the MIDI corpus, MFCC k-means labels, ~20 MiB of
# FLAC in exp/gpu_carry/; and the wheels the device lacks into .whl/, see /work/.library/device/README.md):
#   PYTHONPATH=$PWD .venv/bin/python benchmarks/gpu_check.py prepare
# The device run (the `run` tool; at most 8 minutes of the card (BUDGET=470 s, the wheels'
# install included), timeout 600 s leaves room to see the table):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl", "exp/gpu_carry"], timeout_s=600)
# Results come back as $OUT/gpu_check.jsonl, $OUT/*.log, $OUT/numerics.tsv and $OUT/numerics.png.
#
# LOCAL=1: the tiny configs on the CPU, 1-3 updates per step, a few minutes (tests/test_gpu_check.py);
# numerics then needs `gpu_check.py prepare --local --carry exp/gpu_carry_local` (the test does it).
# PYTHON=... picks the interpreter (default python3 on the device, .venv/bin/python with LOCAL=1).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; rm -f "$OUT/gpu_check.jsonl"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$(date +%s)  # BUDGET counts from here, the wheels' install included
if [ -z "${LOCAL:-}" ]; then
  PY=${PYTHON:-python3}
  if [ -d .whl ]; then  # wheels carried to a machine without internet (see the header)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "gpu_check.sh: installing .whl/*.whl failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
  fi
  export PYTHONPATH=$PWD:${PYTHONPATH:-}
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw --format=csv,noheader
  L=""; DATA=${DATA:-exp/gpu_carry}
  # seconds per step (sum 475 s); BUDGET stops the run at 8 minutes whatever the steps take
  T_INFO=25; T_PRE=80; T_COMP=70; T_MAX=45; T_FT=75; T_SEP=50; T_NUM=130; BUDGET=${BUDGET:-470}
else
  PY=${PYTHON:-.venv/bin/python}
  export PYTHONPATH=$PWD:${PYTHONPATH:-}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  L="--local"; DATA=${DATA:-exp/gpu_carry_local}
  T_INFO=120; T_PRE=200; T_COMP=200; T_MAX=120; T_FT=200; T_SEP=200; T_NUM=240; BUDGET=${BUDGET:-1200}
  L="$L --batch 2"  # tiny batches: bf16 is emulated, slow, on most CPUs
fi
step() {  # step NAME TIMEOUT ARGS...: one gpu_check.py step, its log under $OUT, its exit status reported
  local name=$1 t=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - start) ))
  if [ $left -lt 15 ]; then echo "=== $name: skipped, ${left} s of the ${BUDGET} s budget left ==="; return; fi
  [ $t -le $left ] || t=$left
  echo "=== $name (timeout ${t} s, at $(( $(date +%s) - start )) s) ==="
  timeout --kill-after=10 "$t" $PY benchmarks/gpu_check.py "$@" $L --out "$OUT" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v -E "^\s*$|Warning|warn\(" "$OUT/$name.log" | cut -c1-400 | tail -n 25
  [ $rc = 0 ] || echo "--- $name: exit $rc$([ $rc = 124 ] && echo " (timed out after $t s)")"
}
# most wanted first: if the budget runs out, compilation and the batch search are what is left out
step info $T_INFO info
step pretrain $T_PRE pretrain --variants fp32,fp16,bf16,bf16-math
step numerics $T_NUM numerics --data "$DATA" --time-limit $(( (T_NUM - 40) / 2 ))
step finetune $T_FT finetune --variants fp32,bf16
step separate $T_SEP separate
step compile $T_COMP pretrain --variants bf16-compile
step maxbatch $T_MAX maxbatch --budget $(( T_MAX - 20 ))
$PY benchmarks/gpu_check.py table $L --out "$OUT" 2>&1 | grep -v -E "^\s*$|Warning|warn\(" | tee "$OUT/table.md"
echo "gpu_check.sh: $(( $(date +%s) - start )) s in all"
