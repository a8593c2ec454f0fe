#!/usr/bin/env bash
# The embedded default (`make demo`): the whole Pac-HuBERT method end to end on a synthetic corpus.
#
#   1 corpus      pahubert-toy-corpus: unlabelled mixtures + a few songs with stems (MUSDB18-HQ layout)
#   2 clustering  recipes/pahubert/run.sh stages 0-3: manifest, MFCC features, fairseq k-means, labels
#   3 pretrain    recipes/pahubert/run.sh stage 4: tiny Pac-HuBERT on the unlabelled mixtures
#   4 fine-tune   pahubert_resunet on the same few labelled songs, twice per setting: from scratch
#                 (same architecture, random init) and from the pretrained encoder; same updates, same seed
#   5 evaluate    pahubert-evaluate (museval) on the test songs, then examples/toy/report.py:
#                 results/demo/summary.md (+ .json) and sdr.png, with the mixture-as-estimate baseline
#
# Usage: bash examples/toy/run.sh [--quick] [--train-tracks 2,4,8] [--seeds K] [--stage N] [--work DIR]
#   --quick            the same path, smaller (CI: a few minutes)
#   --train-tracks L   comma list of labelled-song counts (the low-resource table); default 4
#   --seeds K          repeat both fine-tuning arms for K seeds (mean ± spread); default 1
#   --stage N          start at step N (earlier outputs are reused); finished fine-tuning runs and
#                      scored songs are skipped, clustering stages 0-3 run again
#   --work DIR         work folder (default exp/toy/demo, exp/toy/demo_quick with --quick)
#   --results DIR      results folder (default results/demo, results/demo_quick with --quick)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}

quick=false
train_tracks=4
seeds=1
stage=1
work=
results=
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=true; shift ;;
    --train-tracks) train_tracks=$2; shift 2 ;;
    --seeds) seeds=$2; shift 2 ;;
    --stage) stage=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --results) results=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 1 ;;
  esac
done

# ---- sizes: everything the demo does is here ---------------------------------------------------
sample_rate=16000
if $quick; then
  tag=demo_quick; unlabelled=12; n_test=2; seconds=6; n_clusters=16
  pretrain_updates=40; finetune_updates=24; samples_per_track=8
else
  tag=demo; unlabelled=48; n_test=6; seconds=12; n_clusters=50
  pretrain_updates=400; finetune_updates=300; samples_per_track=16
fi
work=${work:-exp/toy/$tag}
results=${results:-results/$tag}
corpus=$work/corpus
max_n=$(tr ',' '\n' <<< "$train_tracks" | sort -n | tail -n 1)
n_train=$((max_n + 1))          # the last training song is held out for validation
mkdir -p "$work" "$results"
abs() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
plugin_dir=$(abs pahubert_plugin)
step() { echo; echo "==== [$1/5] $2  ($(date +%H:%M:%S))"; }
t0=$SECONDS

# ---- 1: corpus ---------------------------------------------------------------------------------
if [ $stage -le 1 ]; then
  step 1 "toy corpus: $unlabelled unlabelled, $n_train train, $n_test test songs of ${seconds}s at $sample_rate Hz"
  "$PYTHON" -m pahubert_plugin.data.toy_corpus "$corpus" --unlabelled $unlabelled --train $n_train \
    --test $n_test --seconds $seconds --sample-rate $sample_rate --seed 0 --jobs 2
fi

# ---- 2-3: clustering + pretraining (recipes/pahubert/run.sh) -----------------------------------
pre=$work/pahubert
ckpt=$pre/pretrain/iter1_mfcc_k${n_clusters}/checkpoints/checkpoint_last.pt
recipe() {
  bash recipes/pahubert/run.sh --audio-dir "$corpus/unlabelled" --exp-dir "$pre" --sample-rate $sample_rate \
    --nj 2 --feature mfcc --n-clusters $n_clusters --valid-percent 0.1 --min-seconds 1 \
    --pretrain-config tiny "$@"
}
if [ $stage -le 2 ]; then
  step 2 "clustering: manifest, MFCC, fairseq k-means ($n_clusters clusters), labels"
  recipe --stage 0 --stop-stage 3
fi
if [ $stage -le 3 ]; then
  step 3 "pretraining tiny Pac-HuBERT for $pretrain_updates updates (log $pre/logs/stage4_pretrain.log)"
  recipe --stage 4 --stop-stage 4 -- optimization.max_update=$pretrain_updates common.cpu=true \
    dataset.validate_interval=100000 dataset.validate_interval_updates=$(( pretrain_updates / 2 )) \
    checkpoint.save_interval=100000 \
    checkpoint.save_interval_updates=$(( pretrain_updates / 4 > 0 ? pretrain_updates / 4 : 1 )) \
    lr_scheduler.warmup_updates=$(( pretrain_updates / 10 + 1 ))
  [ -f "$ckpt" ] || { echo "run.sh: pretraining left no $ckpt" >&2; exit 1; }
fi

# ---- 4-5: fine-tune both arms, evaluate ----------------------------------------------------------
finetune() {  # ARM N SEED
  local arm=$1 n=$2 seed=$3 out
  out=$(abs "$work/finetune/${arm}_n${n}_s${seed}")
  if [ -f "$out/done" ]; then echo "  $arm, $n songs, seed $seed: done before, reused"; return; fi
  mkdir -p "$out"
  echo "  $arm, $n labelled songs, seed $seed: $finetune_updates updates (log $out/train.log)"
  local scratch=false; [ $arm = scratch ] && scratch=true
  "$PYTHON" -m fairseq_cli.hydra_train --config-dir recipes/musdb/conf --config-name pahubert_tiny \
    common.user_dir="$plugin_dir" common.log_format=json common.log_interval=10 common.seed=$seed \
    task.data="$(abs "$corpus/musdb")" task.sample_rate=$sample_rate ++task.train_tracks=$n \
    ++task.samples_per_track=$samples_per_track \
    model.pretrained_checkpoint="$(abs "$ckpt")" model.no_pretrained_weights=$scratch \
    optimization.max_update=$finetune_updates checkpoint.save_dir="$out/checkpoints" \
    hydra.run.dir="$out/hydra" > "$out/train.log" 2>&1 \
    || { echo "run.sh: fine-tuning failed; tail of $out/train.log:" >&2; tail -n 20 "$out/train.log" >&2; exit 1; }
  grep -o '"valid_sdr": "[^"]*", "valid_sdr_[^}]*"valid_num_updates": "[0-9]*"' "$out/train.log" | tail -n 1 \
    | sed 's/^/    last validation: /' || true
  touch "$out/done"
}
evaluate() {  # ARM N SEED
  local arm=$1 n=$2 seed=$3
  "$PYTHON" -m pahubert_plugin.evaluate "$work/finetune/${arm}_n${n}_s${seed}/checkpoints/checkpoint_best.pt" \
    --musdb-root "$corpus/musdb" --is-wav --subset test --jobs 2 \
    --out "$results/eval/${arm}_n${n}_s${seed}" > "$results/eval_${arm}_n${n}_s${seed}.log" 2>&1 \
    || { echo "run.sh: evaluation failed; see $results/eval_${arm}_n${n}_s${seed}.log" >&2; exit 1; }
  echo "  $arm, $n songs, seed $seed:"
  grep -h '^| metric\|^| SDR' "$results/eval/${arm}_n${n}_s${seed}/summary.md" | sed 's/^/    /'

}
if [ $stage -le 4 ]; then
  step 4 "fine-tuning pahubert_resunet: scratch vs pretrained, labelled songs {$train_tracks}, $seeds seed(s)"
  for n in ${train_tracks//,/ }; do for seed in $(seq 1 $seeds); do
    finetune scratch $n $seed; finetune pretrained $n $seed
  done; done
fi
step 5 "evaluating on $n_test test songs with museval (SDR in dB, median over 1 s frames, then songs)"
for n in ${train_tracks//,/ }; do for seed in $(seq 1 $seeds); do
  evaluate scratch $n $seed; evaluate pretrained $n $seed
done; done
"$PYTHON" examples/toy/report.py --results "$results" --musdb-root "$corpus/musdb" --logs "$work/finetune"
echo "demo finished in $(( (SECONDS - t0) / 60 )) min $(( (SECONDS - t0) % 60 )) s: $results/summary.md, $results/sdr.png"
