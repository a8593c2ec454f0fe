#!/usr/bin/env bash
# Speech in machine noise with a few labelled clips, both arms trained to convergence (docs/RESULTS.md):
#
#   1 corpus, MFCC k-means (100) and the full pretraining schedule (3000 updates) on 1 h of unlabelled mixtures
#   2 seed 1 of scratch and of the fused design (model.fuse_pretrained=true: a full scratch path plus the frozen
#     pretrained features); the fused seed-1 model, chosen before any test clip is scored, is the teacher
#   3 the teacher separates the unlabelled mixtures (pahubert-separate): pseudo-labelled clips
#   4 seeds 2.. of scratch and fused at every label budget (--labels: 4, 12, 24 clips = 40 s, 2 and 4 minutes),
#     then the students (2 minutes): the fused design fine-tuned on the labelled clips plus the teacher's
#     estimates remixed across clips (task.pseudo_data, half of the examples), scratch reused
#   5 more designs at 2 minutes against the same scratch runs: fused with the pretrained encoder trained at 0.1x
#     the learning rate (model.fused_lr_scale=0.1; also at 8 minutes, 48 clips, with scratch), and its control, the same network with the side encoder
#     randomly initialised (the "scratch" arm of fused_lr01_ctrl, paired with the same pretrained runs); fused
#     with a learned softmax-weighted sum of the pretrained encoder's layers (model.layer_weights=true); fused
#     with mixture invariant training on the unlabelled mixtures (task.mixit_data, two outputs per source, half
#     of the examples mixtures of two unlabelled mixtures); and fused on a second pretraining iteration (k-means
#     100 of iteration 1's layer 3, then 3000 more updates; run.sh --iteration 2)
#   6 the convergence check of the best design: scratch and the fused design at 0.1x, both fine-tuned for twice the
#     updates (4000 by default, a new learning-rate schedule, not a resumed one), 40 s and 2 minutes of labels
#   7 the SNR loss: scratch and the fused design at 0.1x, both trained on the thresholded SNR loss in place of
#     L1 (--ft-args "criterion.wave_weight=0 criterion.snr_weight=1", its own scratch runs), 2 minutes of labels
#   8 each setting is scored on the 20 test clips (SI-SDR(i), PESQ, STOI) with paired per-clip differences
#     against scratch (RESULTS/<tag>/summary.md); validation SI-SDR curves show where each arm stops gaining
#
# Usage: bash examples/demo/speech_convergence.sh [--work DIR] [--results DIR] [--finetune-updates N]
#          [--pretrain-updates N] [--seeds K] [--labels N,N,..] [--pseudo-prob P] [--stage 1|2|3]
#   --stage 3 skips the corpus and clustering steps of run.sh (a work folder that has them)
# Every step reuses what an earlier run of the same settings finished (run.sh's done markers).
set -euo pipefail
cd "$(dirname "$0")/../.."
work=exp/conv/speech
results=results/conv_speech
finetune_updates=2000
pretrain_updates=3000
seeds=3
labels=4,12,24
pseudo_prob=0.5
first_stage=1
while [ $# -gt 0 ]; do
  case "$1" in
    --work) work=$2; shift 2 ;;
    --results) results=$2; shift 2 ;;
    --finetune-updates) finetune_updates=$2; shift 2 ;;
    --pretrain-updates) pretrain_updates=$2; shift 2 ;;
    --seeds) seeds=$2; shift 2 ;;
    --labels) labels=$2; shift 2 ;;
    --pseudo-prob) pseudo_prob=$2; shift 2 ;;
    --stage) first_stage=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "speech_convergence.sh: unknown option $1 (see --help)" >&2; exit 1 ;;
  esac
done
PYTHON=${PYTHON:-python}
demo() {
  bash examples/demo/run.sh --corpus speech --work "$work" --results "$results" \
    --pretrain-updates "$pretrain_updates" --finetune-updates "$finetune_updates" "$@"
}
fused=(--tag fused --pretrained-args model.fuse_pretrained=true)
abs() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }

demo --stage "$first_stage" --stop-stage 3
demo --stage 4 --stop-stage 4 --seeds 1 "${fused[@]}"

teacher=$work/finetune/fused/pretrained_n12_s1/checkpoints/checkpoint_best.pt
pseudo=$(abs "$work/pseudo/fused_s1")
if [ ! -f "$pseudo/done" ]; then
  echo "==== teacher $teacher separates $work/corpus/unlabelled -> $pseudo ($(date +%H:%M:%S))"
  rm -rf "$pseudo"
  "$PYTHON" -m pahubert_plugin.separate "$teacher" "$work/corpus/unlabelled" -o "$pseudo" --float32 \
    --clip-mode none --jobs 2
  touch "$pseudo/done"
fi

demo --stage 4 --seeds "$seeds" --train-tracks "$labels" "${fused[@]}"
demo --stage 4 --seeds "$seeds" --tag student --reuse-scratch fused --parallel 3 \
  --pretrained-args "model.fuse_pretrained=true task.pseudo_data=$pseudo task.pseudo_prob=$pseudo_prob"
demo --stage 4 --seeds "$seeds" --tag fused_lw --reuse-scratch fused \
  --pretrained-args "model.fuse_pretrained=true model.layer_weights=true"
lr01_args="model.fuse_pretrained=true model.fused_lr_scale=0.1"
lr01=(--pretrained-args "$lr01_args")
demo --stage 4 --seeds "$seeds" --tag fused_lr01 --reuse-scratch fused --parallel 3 "${lr01[@]}"
# 8 minutes of labels (48 clips): its own scratch runs under the same tag (the fused tag has none at 48)
demo --stage 4 --seeds "$seeds" --train-tracks 48 --tag fused_lr01 --parallel 3 --results "$results"_n48 "${lr01[@]}"
mkdir -p "$work/finetune/fused_lr01_ctrl"
for s in $(seq 1 "$seeds"); do  # the control's pretrained arm is fused_lr01's, run above
  run=$(abs "$work/finetune/fused_lr01/pretrained_n12_s$s")
  [ -e "$work/finetune/fused_lr01_ctrl/pretrained_n12_s$s" ] || ln -s "$run" "$work/finetune/fused_lr01_ctrl/pretrained_n12_s$s"
done
demo --stage 4 --seeds "$seeds" --tag fused_lr01_ctrl --parallel 3 "${lr01[@]}" --scratch-args "$lr01_args"
unlabelled=$(abs "$work/corpus/unlabelled")
demo --stage 4 --seeds "$seeds" --tag fused_mixit --reuse-scratch fused --parallel 3 \
  --pretrained-args "model.fuse_pretrained=true model.slots_per_source=2 task.mixit_data=$unlabelled task.mixit_prob=0.5"
demo --stage 3 --seeds "$seeds" --iteration 2 --tag fused_it2 --reuse-scratch fused "${fused[@]:2}"
demo --stage 4 --seeds "$seeds" --train-tracks 4,12 --tag fused_lr01_4k --parallel 3 \
  --finetune-updates $((2 * finetune_updates)) \
  "${lr01[@]}"
demo --stage 4 --seeds "$seeds" --tag fused_lr01_snr --parallel 3 "${lr01[@]}" \
  --ft-args "criterion.wave_weight=0 criterion.snr_weight=1"
