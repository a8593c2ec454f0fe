#!/usr/bin/env bash
# GPU check (run on a GPU machine with the packages installed, or via the device tool with .whl carried):
# real fairseq-hydra-train runs of the base separation configs (resunet, pahubert_resunet)
# on a 44.1 kHz toy corpus; prints updates/s from fairseq's logs. LOCAL=1 runs tiny configs on CPU.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
if [ -z "${LOCAL:-}" ]; then
  PY=${PYTHON:-python3}
  if [ -d .whl ]; then  # wheels carried to a machine without internet (see benchmarks/gpu_check.sh)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
  fi
  SR=44100; SEP=base; PSEP=pahubert_base; PRE=base; UPD=40; DEV=""
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
else
  PY=.venv/bin/python; SR=16000; SEP=tiny; PSEP=pahubert_tiny; PRE=tiny; UPD=3; DEV="common.cpu=true"
fi
W=/tmp/w_sep; rm -rf $W; mkdir -p $W
PLUG=$PWD/pahubert_plugin
$PY -m pahubert_plugin.corpora.toy $W/corpus --unlabelled 8 --train 4 --test 1 --seconds 12 --sample-rate $SR --seed 0 --jobs 8 2>&1 | tail -n 1
common="common.user_dir=$PLUG common.log_format=json common.log_interval=5 common.tensorboard_logdir=null $DEV
  task.data=$W/corpus/musdb task.sample_rate=$SR ++task.num_valid_tracks=1 task.valid_seconds=10 dataset.num_workers=4
  optimization.max_update=$UPD dataset.validate_interval_updates=$UPD checkpoint.save_interval_updates=0"
report() { echo "--- $1 rc=$2"; grep -E '"train_inner"|\[train_inner\]|\[valid\]|Error|error' $OUT/$1.log | cut -c1-330 | tail -n 4; grep -h "num. model params\|model params" $OUT/$1.log | head -n 1 | cut -c1-200; }
echo "=== resunet $SEP fine-tuning ==="
timeout 170 $PY -m fairseq_cli.hydra_train --config-dir recipes/musdb/conf --config-name $SEP $common lr_scheduler.warmup_updates=5 \
  checkpoint.save_dir=$W/resunet hydra.run.dir=$W/resunet_h > $OUT/resunet.log 2>&1; report resunet $?
echo "=== pahubert $PRE pretraining (3 updates, random labels) for the encoder checkpoint ==="
$PY - $W $SR <<'PY'
import sys, glob, os, numpy as np, soundfile as sf
w, sr = sys.argv[1], int(sys.argv[2]); d = f"{w}/pt"; os.makedirs(d, exist_ok=True)
files = sorted(glob.glob(f"{w}/corpus/unlabelled/*.wav")); rng = np.random.default_rng(0)
for split, fs in (("train", files[:-1]), ("valid", files[-1:])):
    rows = [f"{f}\t{sf.info(f).frames}" for f in fs]
    open(f"{d}/{split}.tsv", "w").write("/\n" + "\n".join(r.lstrip("/") for r in rows) + "\n")
    open(f"{d}/{split}.km", "w").write("\n".join(" ".join(map(str, rng.integers(0, 100, sf.info(f).frames // (sr // 100)))) for f in fs) + "\n")
open(f"{d}/dict.km.txt", "w").write("".join(f"{k} 1\n" for k in range(100)))
PY
timeout 150 $PY -m fairseq_cli.hydra_train --config-dir recipes/pahubert/conf/pretrain --config-name $PRE $DEV \
  common.user_dir=$PLUG task.data=$W/pt task.label_dir=$W/pt task.sample_rate=$SR common.tensorboard_logdir=null \
  distributed_training.distributed_world_size=1 'optimization.update_freq=[1]' optimization.max_update=3 \
  lr_scheduler.warmup_updates=1 dataset.num_workers=2 checkpoint.save_dir=$W/pt_ckpt hydra.run.dir=$W/pt_h > $OUT/pretrain.log 2>&1
report pretrain $?
echo "=== pahubert_resunet $PSEP fine-tuning from it ==="
timeout 200 $PY -m fairseq_cli.hydra_train --config-dir recipes/musdb/conf --config-name $PSEP $common \
  model.pretrained_checkpoint=$W/pt_ckpt/checkpoint_last.pt checkpoint.save_dir=$W/pahubert hydra.run.dir=$W/pahubert_h > $OUT/pahubert_resunet.log 2>&1
report pahubert_resunet $?
