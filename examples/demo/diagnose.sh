#!/usr/bin/env bash
# The diagnosis of why pretraining does not win on music: one fine-tuning setting per tag (examples/demo/diagnose.tsv says what each
# changes), scratch vs pretrained on the same labelled songs, sharing the demo's corpus and pretraining.
# Two lanes run side by side (one thread each). Then examples/demo/collect.py prints the table.
#
#   bash examples/demo/diagnose.sh [--train-tracks 2] [--seeds 1] [--results results/diagnosis] [TAG...]
# Needs the demo's corpus and pretraining (a finished `bash examples/demo/run.sh`) and, for gn_* tags, a
# GroupNorm pretraining: bash examples/demo/run.sh --work exp/demo/midi_gn --pretrain-args model.stem_norm=group
# and, for fgm0_*, one with a frozen (randomly initialised) stem: ... --work exp/demo/midi_fgm0 \
#   --pretrain-args model.feature_grad_mult=0.0
set -euo pipefail
cd "$(dirname "$0")/../.."
train_tracks=2; seeds=1; results=results/diagnosis
while [ $# -gt 0 ]; do
  case "$1" in
    --train-tracks) train_tracks=$2; shift 2 ;;
    --seeds) seeds=$2; shift 2 ;;
    --results) results=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) break ;;
  esac
done
export OMP_NUM_THREADS=1
run() {  # TAG [run.sh options...]
  local tag=$1; shift
  bash examples/demo/run.sh --stage 4 --train-tracks "$train_tracks" --seeds "$seeds" --tag "$tag" \
    --results "$results" "$@" > "$results/log_$tag.txt" 2>&1 && echo "[$(date +%H:%M:%S)] $tag done" \
    || { echo "[$(date +%H:%M:%S)] $tag FAILED (see $results/log_$tag.txt)"; return 1; }
}
share() {  # DIR: a work folder for another pretraining on the demo's corpus, features, k-means and labels
  mkdir -p "$1/pahubert"; [ -e "$1/corpus" ] || ln -s ../midi/corpus "$1/corpus"
  local d; for d in data feat km labels; do [ -e "$1/pahubert/$d" ] || ln -s "../../midi/pahubert/$d" "$1/pahubert/$d"; done
}
corpus_of() {  # DIR: a work folder on the demo's corpus with its own manifest, features, k-means and labels
  mkdir -p "$1"; [ -e "$1/corpus" ] || ln -s ../midi/corpus "$1/corpus"
}
subset() {  # DIR N [FROM]: a work folder whose unlabelled audio is the first N unlabelled songs of the work
  # folder FROM (default midi, the demo's; its own manifest, features, k-means and labels: less unlabelled
  # music), labelled songs shared with FROM. Songs are composed from (seed, split, index), so the first N
  # are the same files in every corpus of seed 0
  local from=${3:-midi}
  mkdir -p "$1/corpus/unlabelled"; [ -e "$1/corpus/musdb" ] || ln -s "../../$from/corpus/musdb" "$1/corpus/musdb"
  local f; for f in $(ls "exp/demo/$from/corpus/unlabelled" | sort | head -n "$2"); do
    [ -e "$1/corpus/unlabelled/$f" ] || ln -s "../../../$from/corpus/unlabelled/$f" "$1/corpus/unlabelled/$f"
  done
}
setting() {  # TAG -> run.sh options of that setting
  case $1 in
    s0) run s0 ;;
    s0_last) run s0 --select last ;;
    gn_s0) run gn_s0 --work exp/demo/midi_gn ;;
    fgm0_s0) run fgm0_s0 --work exp/demo/midi_fgm0 ;;
    lrs03) run lrs03 --reuse-scratch s0 --pretrained-args "model.encoder_lr_scale=0.3" ;;
    lrs01) run lrs01 --reuse-scratch s0 --pretrained-args "model.encoder_lr_scale=0.1" ;;
    freeze) run freeze --reuse-scratch s0 --pretrained-args "model.freeze_encoder_updates=100" ;;
    skips1) run skips1 --ft-args "model.decoder_skips=1" ;;
    skips0) run skips0 --ft-args "model.decoder_skips=0" ;;
    lw) run lw --ft-args "model.layer_weights=true" ;;
    lr5e4) run lr5e4 --ft-args "optimizer.groups.default.lr_float=0.0005" ;;
    crop2) run crop2 --ft-args "task.segment=2.0" ;;
    bs8) run bs8 --ft-args "dataset.batch_size=8" ;;
    leaky) run leaky --ft-args "model.mask_magnitude=leaky" ;;
    ft1600) run ft1600 --finetune-updates 1600 ;;
    long3000) share exp/demo/midi_long; run long3000 --work exp/demo/midi_long --stage 3 --pretrain-updates 3000 \
                --reuse-scratch exp/demo/midi/finetune/s0 ;;
    long1500) run long1500 --work exp/demo/midi_long --reuse-scratch exp/demo/midi/finetune/s0 ;;
    long1500_probe) run long1500_probe --work exp/demo/midi_long --reuse-scratch exp/demo/midi/finetune/probe \
                --ft-args "model.freeze_encoder_updates=1000000 model.decoder_skips=0" ;;
    long3000_probe) run long3000_probe --work exp/demo/midi_long --pretrain-updates 3000 \
                --reuse-scratch exp/demo/midi/finetune/probe \
                --ft-args "model.freeze_encoder_updates=1000000 model.decoder_skips=0" ;;
    fgm0_ft1) run fgm0_ft1 --work exp/demo/midi_fgm0 --reuse-scratch exp/demo/midi/finetune/s0 \
                --ft-args "model.encoder_feature_grad_mult=1" ;;
    iter2) run iter2 --stage 3 --iteration 2 --reuse-scratch s0 ;;
    mask05) run mask05 --ft-args "model.mask_prob=0.5" ;;
    mask08) run mask08 --ft-args "model.mask_prob=0.8" ;;
    reinit1) run reinit1 --reuse-scratch s0 --pretrained-args "model.reinit_layers=1" ;;
    reinit2) run reinit2 --reuse-scratch s0 --pretrained-args "model.reinit_layers=2" ;;
    posconv) run posconv --reuse-scratch s0 --pretrained-args "model.reinit_pos_conv=true" ;;
    stemonly) run stemonly --reuse-scratch s0 --pretrained-args "model.reinit_layers=4 model.reinit_pos_conv=true" ;;
    fpen0_s0) share exp/demo/midi_fpen0; run fpen0_s0 --work exp/demo/midi_fpen0 --stage 3 --pretrain-args "criterion.loss_weights=[0]" \
                --reuse-scratch exp/demo/midi/finetune/s0 ;;
    fnorm_s0) share exp/demo/midi_fnorm; run fnorm_s0 --work exp/demo/midi_fnorm --stage 3 \
                --pretrain-args "model.input_norm=freq" ;;
    fnorm_bs8) run fnorm_bs8 --work exp/demo/midi_fnorm --ft-args "dataset.batch_size=8" ;;
    bs8_skips0) run bs8_skips0 --ft-args "dataset.batch_size=8 model.decoder_skips=0" ;;
    s0r) run s0r ;;
    probe_fn) run probe_fn --ft-args "model.freeze_encoder_updates=1000000 model.decoder_skips=0" ;;
    bs8_u200) run bs8_u200 --ft-args "dataset.batch_size=8" --finetune-updates 200 ;;
    h2) run h2 --work exp/demo/midi_h2 --stage 1 --unlabelled-hours 2 ;;  # own corpus (2 h), own scratch arm
    ft800) run ft800 --finetune-updates 800 ;;  # the demo's pretraining, its own scratch arm
    prim) corpus_of exp/demo/midi_prim; run prim --work exp/demo/midi_prim --stage 2 --feature primitive \
                --reuse-scratch exp/demo/midi/finetune/s0r ;;  # after s0r (its scratch arm)
    k200) corpus_of exp/demo/midi_k200; run k200 --work exp/demo/midi_k200 --stage 2 --n-clusters 200 \
                --reuse-scratch exp/demo/midi/finetune/s0r ;;  # after s0r (its scratch arm)
    h2_bs8) run h2_bs8 --work exp/demo/midi_h2 --ft-args "dataset.batch_size=8" ;;  # after h2 (its pretraining)
    h025) subset exp/demo/midi_h025 45 midi_h2; run h025 --work exp/demo/midi_h025 --stage 2 --unlabelled-hours 0.25 \
                --reuse-scratch exp/demo/midi_h2/finetune/h2 ;;  # after h2 (its corpus, its scratch arm)
    fast) share exp/demo/midi_fast; run fast --work exp/demo/midi_fast --stage 3 --pretrain-args "+preset=fast_tiny" ;;
    dec2) run dec2 --ft-args "model.decoder_units=2" ;;  # the demo's pretraining, its own scratch arm
    probe) run probe --ft-args "model.freeze_encoder_updates=1000000 model.decoder_skips=0" ;;
    *) echo "diagnose.sh: unknown setting $1 (see examples/demo/diagnose.tsv)" >&2; return 1 ;;
  esac
}
mkdir -p "$results"
tags=("$@")
[ ${#tags[@]} -gt 0 ] || tags=(s0 gn_s0 skips1 lw lrs03 probe freeze skips0 crop2 lr5e4 s0_last lrs01)
# the first two side by side (s0 first: later settings reuse its scratch arm), then two lanes
lane() { local i; for ((i = $1; i < ${#tags[@]}; i += 2)); do setting "${tags[$i]}" || true; done; }
lane 0 & lane 1 & wait
python examples/demo/collect.py "$results" --describe examples/demo/diagnose.tsv --out "$results/table.md"
