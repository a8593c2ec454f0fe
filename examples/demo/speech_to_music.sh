#!/usr/bin/env bash
# The paper's porting experiment at a size that runs here: a speech HuBERT inside Demucs V2, fine-tuned on music
# against the same network from scratch (docs/RESULTS.md, "A speech HuBERT in Demucs V2"):
#
#   1 speech corpus and its MFCC k-means units (100 clusters, 100 Hz): examples/demo/run.sh --corpus speech, steps 1-2
#   2 stock fairseq HuBERT (model hubert, nothing from this plugin) pretrained on the 1 h of unlabelled speech in
#     machine noise: recipes/pahubert/conf/pretrain/hubert_speech_tiny.yaml
#   3 pahubert-port-hubert copies its transformer into demucs_hubert_tiny, as it would a fairseq or Hugging Face
#     speech HuBERT (the waveform front end stays behind; the Demucs encoder and decoder start random)
#   4 the MIDI music corpus (labelled songs and test songs only: nothing musical is pretrained on)
#   5 demucs_v2_hubert_tiny fine-tuned on a few labelled songs, ported vs scratch, several seeds; museval SDR on the
#     test songs, paired per-song differences (RESULTS/summary.md), validation SDR along fine-tuning
#
# Usage: bash examples/demo/speech_to_music.sh [--quick] [--speech-work DIR] [--work DIR] [--results DIR]
#          [--pretrain-updates N] [--finetune-updates N] [--train-tracks L] [--seeds K]
#   --quick               the same path, smaller (CI: a few minutes); default folders get a _quick suffix
#   --speech-work DIR     speech corpus and units (default exp/conv/speech, shared with speech_convergence.sh)
#   --work DIR            this experiment's folder (default exp/port): hubert/, ported.pt, music/
#   --results DIR         default results/port
#   --pretrain-updates N  stock HuBERT updates (default 3000, the speech pretraining's schedule)
#   --finetune-updates N  updates per fine-tuning arm (default 1500; run.sh's with --quick)
#   --train-tracks L      labelled songs, a comma list (default 4); --seeds K (default 3)
# Every step reuses what an earlier run with the same settings finished.
set -euo pipefail
cd "$(dirname "$0")/../.."
speech_work=
work=
results=
pretrain_updates=
finetune_updates=
train_tracks=4
seeds=
quick=false
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=true; shift ;;
    --speech-work) speech_work=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --results) results=$2; shift 2 ;;
    --pretrain-updates) pretrain_updates=$2; shift 2 ;;
    --finetune-updates) finetune_updates=$2; shift 2 ;;
    --train-tracks) train_tracks=$2; shift 2 ;;
    --seeds) seeds=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "speech_to_music.sh: unknown option $1 (see --help)" >&2; exit 1 ;;
  esac
done
if $quick; then
  q=(--quick); speech_work=${speech_work:-exp/demo/speech_quick}; work=${work:-exp/port_quick}
  results=${results:-results/port_quick}; pretrain_updates=${pretrain_updates:-20}; seeds=${seeds:-1}
else
  q=(); speech_work=${speech_work:-exp/conv/speech}; work=${work:-exp/port}; results=${results:-results/port}
  pretrain_updates=${pretrain_updates:-3000}; finetune_updates=${finetune_updates:-1500}; seeds=${seeds:-3}
fi
ft_updates=(); [ -z "$finetune_updates" ] || ft_updates=(--finetune-updates "$finetune_updates")
[[ $pretrain_updates =~ ^[1-9][0-9]*$ ]] \
  || { echo "speech_to_music.sh: --pretrain-updates must be a positive integer, got $pretrain_updates" >&2; exit 1; }
PYTHON=${PYTHON:-python}
abs() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
indent() { { grep -v '^$\|^==== \[\|%|' || true; } | sed 's/^/  /'; }  # a sub-step's output, without its headers
step() { echo; echo "==== [port $1/5] $2  ($(date +%H:%M:%S))"; }

step 1 "speech corpus and MFCC k-means units ($speech_work)"
k=100; $quick && k=16  # MFCC k-means clusters (the speech demo's own)
bash examples/demo/run.sh "${q[@]}" --corpus speech --work "$speech_work" --n-clusters $k --stop-stage 2 2>&1 | indent
data=$(abs "$speech_work/pahubert/data")
labels=$(abs "$speech_work/pahubert/labels/mfcc_k$k")
[ -f "$labels/train.km" ] || { echo "speech_to_music.sh: no units in $labels" >&2; exit 1; }

hubert=$(abs "$work/hubert")
ckpt=$hubert/checkpoints/checkpoint_last.pt
config=recipes/pahubert/conf/pretrain/hubert_speech_tiny.yaml
# what the pretraining depends on: its updates, its config, the manifests and units (not where they lie)
mark="$pretrain_updates $(cat "$config" "$data"/{train,valid}.tsv "$labels"/{train,valid}.km | sha256sum | cut -c1-16)"
if [ -f "$hubert/done" ] && [ "$(cat "$hubert/done")" = "$mark" ] && [ -f "$ckpt" ]; then
  step 2 "stock fairseq HuBERT: $ckpt done before, reused"
else
  step 2 "stock fairseq HuBERT on the unlabelled speech, $pretrain_updates updates (log $hubert/train.log)"
  # a run of other settings starts afresh; one of these settings resumes from its checkpoint_last.pt
  if [ -f "$hubert/recipe" ] && [ "$(cat "$hubert/recipe")" != "$mark" ]; then rm -rf "$hubert"; fi
  mkdir -p "$hubert"; echo "$mark" > "$hubert/recipe"; rm -f "$hubert/done"
  v=$(( pretrain_updates / 6 > 0 ? pretrain_updates / 6 : 1 ))
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$PYTHON" -m fairseq_cli.hydra_train --config-dir "$(dirname "$config")" \
    --config-name hubert_speech_tiny task.data="$data" task.label_dir="$labels" \
    optimization.max_update="$pretrain_updates" lr_scheduler.warmup_updates=$(( pretrain_updates / 10 > 0 ? pretrain_updates / 10 : 1 )) \
    dataset.validate_interval_updates=$v checkpoint.save_interval_updates=$v \
    checkpoint.save_dir="$hubert/checkpoints" hydra.run.dir="$hubert" >> "$hubert/train.log" 2>&1 \
    || { echo "speech_to_music.sh: pretraining failed; tail of $hubert/train.log:" >&2; tail -n 20 "$hubert/train.log" >&2; exit 1; }
  echo "$mark" > "$hubert/done"
fi
acc=$({ grep -o '"valid_correct_m_0": "[^"]*"' "$hubert/train.log" || true; } | tail -n 1 | cut -d'"' -f4)
echo "  masked-frame accuracy on its validation clips: ${acc:-not logged} (chance: 1/$k)"

ported=$(abs "$work/ported_demucs_hubert_tiny.pt")
step 3 "pahubert-port-hubert: its transformer into demucs_hubert_tiny -> $ported"
if [ ! -f "$ported" ] || [ "$ported" -ot "$ckpt" ]; then
  PYTHONWARNINGS=ignore "$PYTHON" -m pahubert_plugin.port_hubert "$ckpt" "$ported" --target demucs_hubert \
    --config recipes/pahubert/conf/pretrain/demucs_hubert_tiny.yaml --quiet | sed 's/^/  /'
else
  echo "  done before, reused"
fi

music() {
  bash examples/demo/run.sh "${q[@]}" --corpus midi --work "$work/music" --results "$results" --unlabelled-hours 0.01 \
    --train-tracks "$train_tracks" "$@"
}
step 4 "music corpus: labelled and test songs ($work/music/corpus)"
music --stop-stage 1 2>&1 | indent
step 5 "demucs_v2_hubert_tiny on {$train_tracks} labelled songs, ported speech HuBERT vs scratch, $seeds seed(s):
  fine-tuning and scoring, examples/demo/run.sh steps 4-5"
music --stage 4 --seeds "$seeds" "${ft_updates[@]}" --finetune-config demucs_v2_hubert_tiny \
  --pretrained-checkpoint "$ported" --tag speech_hubert
