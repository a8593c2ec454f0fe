#!/usr/bin/env bash
# The base recipes on one GPU in one command: throughput, MFU, memory and bf16 numerics
# (benchmarks/gpu_check.py; every step under its own `timeout`, so one failure does not eat the
# budget; everything is written under $OUT, the summary table is printed last).
#
# Before the device run, on the CPU, in the checkout the device run sends (both paths are gitignored):
# 1. the corpus: MIDI songs + MFCC k-means labels (recipes/pahubert/run.sh stages 0-3), 17 MiB of FLAC:
#      PYTHONPATH=$PWD .venv/bin/python benchmarks/gpu_check.py prepare          # -> exp/gpu_carry/
# 2. the wheels the device lacks (it has torch, torchaudio, numpy, scikit-learn, matplotlib, pyyaml), 22 MiB:
#      .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#        fairseq-fixed==0.12.3.1 omegaconf==2.3.0 hydra-core==1.3.2 bitarray==3.12.3 soundfile==0.13.1 \
#        cffi==2.1.1 pycparser==3.12 julius==0.2.8 dora_search==0.1.13 lameenc==1.9.0 openunmix==1.3.0 \
#        treetable==0.2.6 retrying==1.4.2 submitit==1.5.4
#      .venv/bin/python -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3 demucs==4.0.1  # sdists only
# The device run (the `run` tool): at most 8 minutes of the card (BUDGET=470 s, the wheels' install included):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl", "exp/gpu_carry"], timeout_s=600)
# A partial rerun: STEPS="numerics separate" bash benchmarks/gpu_check.sh (steps: info pretrain numerics
# finetune separate compile maxbatch). Results come back as 5 files (the tool returns 8 at most):
# $OUT/gpu_check.jsonl, $OUT/steps.log (every step's whole log), $OUT/numerics.tsv, $OUT/numerics.png and
# $OUT/table.md; the table is also printed last.
#
# LOCAL=1: the tiny configs on the CPU, 1-3 updates per step, a few minutes (tests/test_gpu_check.py);
# numerics then reads exp/gpu_carry_local (`gpu_check.py prepare --local --carry exp/gpu_carry_local`;
# DATA=... points elsewhere). PYTHON=... picks the interpreter (default python3 on the device,
# .venv/bin/python with LOCAL=1).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; rm -f "$OUT/gpu_check.jsonl" "$OUT/steps.log"
LOGS=$(mktemp -d)
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
step() {  # step NAME TIMEOUT ARGS...: one gpu_check.py step, its log appended to $OUT/steps.log, its exit status reported
  local name=$1 t=$2; shift 2
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return; fi
  local left=$(( BUDGET - ($(date +%s) - start) ))
  if [ $left -lt 15 ]; then echo "=== $name: skipped, ${left} s of the ${BUDGET} s budget left ==="; return; fi
  [ $t -le $left ] || t=$left
  echo "=== $name (timeout ${t} s, at $(( $(date +%s) - start )) s) ==="
  timeout --kill-after=10 "$t" $PY benchmarks/gpu_check.py "$@" $L --out "$OUT" > "$LOGS/$name.log" 2>&1
  local rc=$?
  { echo "=== $name: exit $rc"; cat "$LOGS/$name.log"; } >> "$OUT/steps.log"
  grep -v -E "^\s*$|Warning|warn\(" "$LOGS/$name.log" | cut -c1-400 | tail -n 25
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
