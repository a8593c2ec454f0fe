#!/usr/bin/env bash
# The embedded default (`make demo`): the whole Pac-HuBERT method end to end, scratch vs pretrained.
#
#   1 corpus      pahubert-midi-corpus: procedurally composed songs rendered stem by stem with sampled
#                 General MIDI instruments (fluidsynth + TimGM6mb): unlabelled mixtures + a few songs with
#                 stems (MUSDB18-HQ layout); rendered once, then cached. --corpus toy: the numpy toy synthesiser
#   2 clustering  recipes/pahubert/run.sh stages 0-3: manifest, MFCC features, fairseq k-means, labels
#   3 pretrain    recipes/pahubert/run.sh stage 4: tiny Pac-HuBERT on the unlabelled mixtures
#   4 fine-tune   pahubert_resunet on the same few labelled songs, twice per setting: from scratch
#                 (same architecture, random init) and from the pretrained encoder; same updates, same seed
#   5 evaluate    pahubert-evaluate (museval) on the test songs, then examples/demo/report.py:
#                 RESULTS/summary.md (+ .json) and sdr.png: per-source tables, the mixture-as-estimate
#                 baseline, paired per-song differences with a 95 % bootstrap interval, validation curves
#
# Usage: bash examples/demo/run.sh [--quick] [--train-tracks 2,4] [--seeds K] [--stage N] [--work DIR]
#   --quick             the same path, smaller (CI: a few minutes)
#   --corpus midi|toy|speech   development corpus (default midi; toy = numpy synthesiser, unit-test grade;
#                       speech = pahubert-speech-corpus: recorded and synthetic speech in recorded and
#                       procedural machine noise, sources speech + noise, 16 kHz mono 10 s clips, scored with
#                       SI-SDR(i), PESQ and STOI, checkpoints selected on validation SI-SDR; `make demo DEMO=speech`)
#   --train-tracks L    comma list of labelled-song (clip) counts (the low-resource table); default 4
#                       (speech: 12 clips = 2 minutes of labels)
#   --seeds K           repeat both fine-tuning arms for seeds 1..K (mean ± spread); default 1
#   --stage N           start at step N (earlier outputs are reused); finished recipe stages, fine-tuning
#                       runs and scored songs are skipped
#   --stop-stage N      stop after step N (e.g. 3: corpus, clustering and pretraining only)
#   --work DIR          work folder (default exp/demo/<corpus>, exp/demo/<corpus>_quick with --quick)
#   --results DIR       results folder (default results/demo, results/demo_speech for speech; _quick with
#                       --quick); a --tag other than main appends /NAME to it, --select last appends _last
#   --tag NAME          name of this fine-tuning setting (folders finetune/NAME, RESULTS/NAME when not
#                       "main"): variants share the corpus and the pretraining (default main)
#   --pretrain-updates N, --finetune-updates N, --unlabelled-hours H   override the sizes below
#   --pretrain-args "K=V ..."   extra hydra overrides for pretraining (stage 4)
#   --ft-args "K=V ..."         extra hydra overrides for both fine-tuning arms
#   --pretrained-args "K=V ..." / --scratch-args "K=V ..."   extra overrides for one arm only
#   --reuse-scratch TAG         take the scratch arm of setting TAG (same scratch settings) instead of
#                               training it again; a path (with a /) names another work folder's
#                               finetune/TAG
#   --parallel P                fine-tuning runs at a time, one thread each (default 2: the two arms of a seed;
#                               with --reuse-scratch, the pretrained arms of P seeds)
#   --select best|last          checkpoint to score: best validation SDR (speech: SI-SDR; default) or the last
#                               update
#   --iteration 1|2             fine-tune from HuBERT iteration 1 (MFCC clusters, default) or iteration 2
#                               (recipe stages 5-6: k-means of iteration 1's layer --iter2-layer into
#                               --iter2-clusters clusters, then a second pretraining of the same size)
#   --iter2-layer L, --iter2-clusters K   defaults 3 and 100
#   --feature mfcc|primitive    clustering feature of iteration 1 (default mfcc; primitive adds the
#                               Bregman grouping cues, recipes/pahubert/run.sh --feature)
#   --n-clusters K              k-means clusters of iteration 1 (default 50, speech 100; 16 with --quick)
#   --finetune-config NAME      fine-tuning YAML of recipes/musdb/conf (default pahubert_tiny; e.g.
#                               demucs_v2_hubert_tiny, the time-domain variant)
#   --pretrained-checkpoint F   fine-tune the pretrained arm from F (a pretraining checkpoint or a
#                               pahubert-port-hubert output) instead of this demo's own pretraining:
#                               steps 2-3 are skipped; the scratch arm is the same network, random init
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
orig_args=("$@")

quick=false
corpus_kind=midi
train_tracks=4
seeds=1
stage=1
stop_stage=5
work=
results=
tag=main
pretrain_updates=
finetune_updates=
unlabelled_hours=
pretrain_args=
ft_args=
pretrained_args=
scratch_args=
reuse_scratch=
parallel=2
select=best
iteration=1
iter2_layer=3
iter2_clusters=100
feature=mfcc
clusters=
finetune_config=pahubert_tiny
external_ckpt=
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=true; shift ;;
    --corpus) corpus_kind=$2; shift 2 ;;
    --train-tracks) train_tracks=$2; shift 2 ;;
    --seeds) seeds=$2; shift 2 ;;
    --stage) stage=$2; shift 2 ;;
    --stop-stage) stop_stage=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --results) results=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --pretrain-updates) pretrain_updates=$2; shift 2 ;;
    --finetune-updates) finetune_updates=$2; shift 2 ;;
    --unlabelled-hours) unlabelled_hours=$2; shift 2 ;;
    --pretrain-args) pretrain_args=$2; shift 2 ;;
    --ft-args) ft_args=$2; shift 2 ;;
    --pretrained-args) pretrained_args=$2; shift 2 ;;
    --scratch-args) scratch_args=$2; shift 2 ;;
    --reuse-scratch) reuse_scratch=$2; shift 2 ;;
    --parallel) parallel=$2; shift 2 ;;
    --select) select=$2; shift 2 ;;
    --iteration) iteration=$2; shift 2 ;;
    --iter2-layer) iter2_layer=$2; shift 2 ;;
    --iter2-clusters) iter2_clusters=$2; shift 2 ;;
    --feature) feature=$2; shift 2 ;;
    --n-clusters) clusters=$2; shift 2 ;;
    --finetune-config) finetune_config=$2; shift 2 ;;
    --pretrained-checkpoint) external_ckpt=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 1 ;;
  esac
done
case $corpus_kind in midi|toy|speech) ;; *) echo "run.sh: --corpus must be midi, toy or speech, got $corpus_kind" >&2; exit 1 ;; esac
train_tracks_given=false; for a in "${orig_args[@]}"; do [ "$a" = --train-tracks ] && train_tracks_given=true; done
if [ $corpus_kind = speech ] && ! $train_tracks_given; then $quick && train_tracks=4 || train_tracks=12; fi
case $select in best|last) ;; *) echo "run.sh: --select must be best or last, got $select" >&2; exit 1 ;; esac
case $iteration in 1|2) ;; *) echo "run.sh: --iteration must be 1 or 2, got $iteration" >&2; exit 1 ;; esac
case $feature in mfcc|primitive) ;; *) echo "run.sh: --feature must be mfcc or primitive, got $feature" >&2; exit 1 ;; esac
[[ $parallel =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --parallel must be a positive integer, got $parallel" >&2; exit 1; }
[[ $stop_stage =~ ^[1-5]$ ]] || { echo "run.sh: --stop-stage must be 1 to 5, got $stop_stage" >&2; exit 1; }
[ -f "recipes/musdb/conf/$finetune_config.yaml" ] \
  || { echo "run.sh: --finetune-config: no recipes/musdb/conf/$finetune_config.yaml" >&2; exit 1; }
[ -z "$external_ckpt" ] || [ -f "$external_ckpt" ] \
  || { echo "run.sh: --pretrained-checkpoint: no file $external_ckpt" >&2; exit 1; }
[[ -z $clusters || $clusters =~ ^[1-9][0-9]*$ ]] \
  || { echo "run.sh: --n-clusters must be a positive integer, got $clusters" >&2; exit 1; }

# ---- sizes: everything the demo does is here ---------------------------------------------------
sample_rate=16000
if $quick; then
  suffix=_quick; hours=0.05; n_test=2; seconds=8; n_clusters=16
  p_updates=40; f_updates=24
  size_args="dataset.validate_interval_updates=10 checkpoint.save_interval_updates=10"
else
  size_args=
  suffix=; hours=1.0; n_test=8; seconds=20; n_clusters=50
  p_updates=600; f_updates=400
fi
if [ $corpus_kind = speech ]; then  # 10 s clips (4 s with --quick), MFCC k-means 100 as HuBERT's speech recipe
  if $quick; then seconds=4; n_valid=2; else seconds=10; n_valid=8; n_test=20; n_clusters=100; fi
fi
hours=${unlabelled_hours:-$hours}
n_clusters=${clusters:-$n_clusters}
pretrain_updates=${pretrain_updates:-$p_updates}
finetune_updates=${finetune_updates:-$f_updates}
work=${work:-exp/demo/${corpus_kind}$suffix}
if [ $corpus_kind = speech ]; then results=${results:-results/demo_speech$suffix}; else results=${results:-results/demo$suffix}; fi
[ "$tag" = main ] || results=$results/$tag
[ "$select" = best ] || results=${results}_$select
corpus=$work/corpus
max_n=$(tr ',' '\n' <<< "$train_tracks" | sort -n | tail -n 1)
n_train=$(( max_n + 1 > 9 ? max_n + 1 : 9 ))  # the last training song is held out for validation
# per corpus: where the labelled clips are, what fine-tuning and evaluation add
if [ $corpus_kind = speech ]; then
  # a valid/ folder of its own (the same clips for both arms, not taken from the training budget); the corpus
  # size does not follow --train-tracks, so every low-resource setting shares one cached corpus
  n_train=$(( max_n > 48 ? max_n : 48 )); $quick && n_train=$(( max_n > 4 ? max_n : 4 ))
  labelled=$corpus
  corpus_pre_args="task.audio_channels=1"
  corpus_ft_args="task.sources=[speech,noise] task.audio_channels=1 checkpoint.best_checkpoint_metric=si_sdr
    checkpoint.maximize_best_checkpoint_metric=true"
  eval_metrics=si_sdr,pesq,stoi; report_metric=SI-SDR; valid_key=valid_si_sdr; items=clips
else
  items=songs
  labelled=$corpus/musdb; corpus_pre_args=; corpus_ft_args=
  eval_metrics=sdr; report_metric=SDR; valid_key=valid_sdr
fi
mkdir -p "$work" "$results"
abs() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
plugin_dir=$(abs pahubert_plugin)
step() { echo; echo "==== [$1/5] $2  ($(date +%H:%M:%S))"; }
t0=$SECONDS
stop_after() { [ $stop_stage -gt $1 ] || { echo "stopped after step $1 (--stop-stage $stop_stage)"; exit 0; }; }

# ---- 1: corpus ---------------------------------------------------------------------------------
n_unlabelled=$("$PYTHON" -c "import math; print(max(1, math.ceil($hours * 3600 / $seconds)))")
if [ $stage -le 1 ]; then
  step 1 "$corpus_kind corpus: $n_unlabelled unlabelled (${hours} h), $n_train train, $n_test test $items of ${seconds}s at $sample_rate Hz"
  if [ $corpus_kind = speech ]; then
    "$PYTHON" -m pahubert_plugin.corpora.speech_noise "$corpus" --train-clips $n_train --valid-clips $n_valid \
      --test-clips $n_test --unlabelled-minutes "$("$PYTHON" -c "print($hours * 60)")" --clip-seconds $seconds \
      --seed 0 --jobs 2 --no-progress
  elif [ $corpus_kind = midi ]; then
    "$PYTHON" -m pahubert_plugin.corpora.midi "$corpus" --unlabelled $n_unlabelled --train $n_train \
      --test $n_test --seconds $seconds --sample-rate $sample_rate --seed 0 --jobs 2
  else
    "$PYTHON" -m pahubert_plugin.corpora.toy "$corpus" --unlabelled $n_unlabelled --train $n_train \
      --test $n_test --seconds $seconds --sample-rate $sample_rate --seed 0 --jobs 2
  fi
fi

stop_after 1

# ---- 2-3: clustering + pretraining (recipes/pahubert/run.sh) -----------------------------------
pre=$work/pahubert
ckpt1=$pre/pretrain/iter1_${feature}_k${n_clusters}/checkpoints/checkpoint_last.pt
ckpt2=$pre/pretrain/iter2_${feature}_k${n_clusters}_l${iter2_layer}_k${iter2_clusters}/checkpoints/checkpoint_last.pt
if [ -n "$external_ckpt" ]; then ckpt=$external_ckpt; elif [ $iteration = 1 ]; then ckpt=$ckpt1; else ckpt=$ckpt2; fi
recipe() {
  bash recipes/pahubert/run.sh --audio-dir "$corpus/unlabelled" --exp-dir "$pre" --sample-rate $sample_rate \
    --nj 2 --feature $feature --n-clusters $n_clusters --valid-percent 0.02 --min-seconds 1 \
    --pretrain-config tiny --hubert-layer $iter2_layer --n-clusters-iter2 $iter2_clusters "$@"
}
pretrain_overrides() {  # the hydra overrides of both pretraining iterations
  local v=$(( pretrain_updates / 4 > 0 ? pretrain_updates / 4 : 1 ))
  echo "optimization.max_update=$pretrain_updates common.cpu=true dataset.validate_interval=100000" \
    "dataset.validate_interval_updates=$v checkpoint.save_interval=100000 checkpoint.save_interval_updates=$v" \
    "lr_scheduler.warmup_updates=$(( pretrain_updates / 10 + 1 )) $corpus_pre_args $pretrain_args"
}
# what a run depends on besides the corpus: the composed pretraining config and the overrides, and for
# fine-tuning runs also the iteration, the fine-tuning config and an outside checkpoint. Each pretraining
# iteration is marked with what it depends on only, so `--iteration 2` or another `--finetune-config` on a
# work folder reuses iteration 1 instead of training it again.
pretrain_mark=; [ $feature = mfcc ] || pretrain_mark=" feature=$feature"  # mfcc runs keep their old fingerprints
finetune_mark=; [ "$finetune_config" = pahubert_tiny ] || finetune_mark+=" finetune_config=$finetune_config"
[ -z "$external_ckpt" ] || finetune_mark+=" pretrained=$(sha256sum < "$external_ckpt" | cut -c1-16)"
# Written into the done markers of pretraining and fine-tuning runs: a run made with another config is
# not reused (a changed recipe is trained again, not silently mixed with old results).
fingerprints=$("$PYTHON" -c 'import hashlib, sys; from omegaconf import OmegaConf
from pahubert_plugin.configs import load_recipe_config
base = OmegaConf.to_yaml(load_recipe_config(sys.argv[1]))
for mark in sys.argv[2:]: print(hashlib.sha256((base + mark).encode()).hexdigest()[:16])' \
  recipes/pahubert/conf/pretrain/tiny.yaml "$(pretrain_overrides) k=$n_clusters iteration=1$pretrain_mark" \
  "$(pretrain_overrides) k=$n_clusters iteration=2$pretrain_mark" \
  "$(pretrain_overrides) k=$n_clusters iteration=$iteration$pretrain_mark$finetune_mark") \
  || { echo "run.sh: cannot read recipes/pahubert/conf/pretrain/tiny.yaml" >&2; exit 1; }
{ read -r fingerprint1; read -r fingerprint2; read -r fingerprint; } <<< "$fingerprints"  # iteration 1, 2, runs
same_run() { [ -f "$1" ] && [ "$(cat "$1")" = "${2:-$fingerprint}" ]; }  # MARKER [FINGERPRINT]: made with this recipe
if [ -n "$external_ckpt" ] && [ $stage -le 3 ]; then
  step 3 "clustering and pretraining skipped: the pretrained arm starts from $external_ckpt"
  stage=4
fi
if [ $stage -le 2 ]; then
  step 2 "clustering: manifest, $feature features, fairseq k-means ($n_clusters clusters), labels"
  recipe --stage 0 --stop-stage 3
fi
stop_after 2
if [ $stage -le 3 ]; then
  if [ -f "$ckpt1" ] && same_run "$pre/pretrain/done_$pretrain_updates" "$fingerprint1"; then
    step 3 "pretraining: $ckpt1 done before ($pretrain_updates updates), reused"
  else
    step 3 "pretraining tiny Pac-HuBERT for $pretrain_updates updates (log $pre/logs/stage4_pretrain.log)"
    [ ! -f "$ckpt1" ] || rm -rf "$(dirname "$(dirname "$ckpt1")")"  # made with another recipe: start afresh
    # shellcheck disable=SC2046
    recipe --stage 4 --stop-stage 4 -- $(pretrain_overrides)
    [ -f "$ckpt1" ] || { echo "run.sh: pretraining left no $ckpt1" >&2; exit 1; }
    echo "$fingerprint1" > "$pre/pretrain/done_$pretrain_updates"
  fi
  done2=$pre/pretrain/done2_l${iter2_layer}_k${iter2_clusters}_$pretrain_updates
  if [ $iteration = 2 ] && [ -f "$ckpt2" ] && same_run "$done2" "$fingerprint2"; then
    echo "  iteration 2: $ckpt2 done before, reused"
  elif [ $iteration = 2 ]; then
    echo "  iteration 2: layer $iter2_layer of iteration 1 -> $iter2_clusters clusters -> $pretrain_updates updates" \
      "(logs $pre/logs/stage5_*.log, stage6_pretrain.log)"
    # shellcheck disable=SC2046
    recipe --stage 5 --stop-stage 6 -- $(pretrain_overrides)
    [ -f "$ckpt2" ] || { echo "run.sh: iteration 2 left no $ckpt2" >&2; exit 1; }
    echo "$fingerprint2" > "$done2"
  fi
fi

stop_after 3

# ---- 4-5: fine-tune both arms, evaluate ----------------------------------------------------------
ft_root=$work/finetune/$tag
finetune() {  # ARM N SEED
  local arm=$1 n=$2 seed=$3 out arm_args
  out=$(abs "$ft_root/${arm}_n${n}_s${seed}")
  if [ $arm = scratch ] && [ -n "$reuse_scratch" ] && [ ! -e "$out" ]; then
    local src  # a setting of this work folder, or a finetune/<setting> folder of another
    case $reuse_scratch in */*) src=$(abs "$reuse_scratch/${arm}_n${n}_s${seed}") ;;
                           *) src=$(abs "$work/finetune/$reuse_scratch/${arm}_n${n}_s${seed}") ;; esac
    [ -f "$src/done" ] || { echo "run.sh: --reuse-scratch $reuse_scratch: $src is not finished" >&2; exit 1; }
    mkdir -p "$ft_root"; ln -s "$src" "$out"
  fi
  # a --reuse-scratch link is the user's choice; a run of this folder is reused (or resumed from its
  # checkpoint_last.pt) only if it was started with this recipe
  if [ -f "$out/done" ] && { [ -L "$out" ] || same_run "$out/done"; }; then
    echo "  $arm, $n $items, seed $seed: done before, reused"; return
  elif [ -d "$out" ] && [ ! -L "$out" ] && ! same_run "$out/recipe"; then
    echo "  $arm, $n $items, seed $seed: made with another recipe; training again"; rm -rf "$out"
  fi
  mkdir -p "$out"; echo "$fingerprint" > "$out/recipe"
  # appended: a run resumed from its checkpoint_last.pt keeps the validation curve of its first part
  echo "run.sh: fine-tuning started $(date '+%F %T')" >> "$out/train.log"
  echo "  $arm, $n labelled $items, seed $seed: $finetune_updates updates (log $out/train.log)"
  local scratch=false; [ $arm = scratch ] && scratch=true
  if [ $arm = scratch ]; then arm_args=$scratch_args; else arm_args=$pretrained_args; fi
  # shellcheck disable=SC2086
  "$PYTHON" -m fairseq_cli.hydra_train --config-dir recipes/musdb/conf --config-name "$finetune_config" \
    common.user_dir="$plugin_dir" common.log_format=json common.log_interval=20 common.seed=$seed \
    task.data="$(abs "$labelled")" task.sample_rate=$sample_rate task.train_tracks=$n $corpus_ft_args \
    model.pretrained_checkpoint="$(abs "$ckpt")" model.no_pretrained_weights=$scratch \
    optimization.max_update=$finetune_updates checkpoint.save_dir="$out/checkpoints" \
    hydra.run.dir="$out/hydra" $size_args $ft_args $arm_args >> "$out/train.log" 2>&1 \
    || { echo "run.sh: fine-tuning failed; tail of $out/train.log:" >&2; tail -n 20 "$out/train.log" >&2; exit 1; }
  # runs finish in any order (--parallel): the line names its run
  grep -o "\"$valid_key\": \"[^\"]*\"" "$out/train.log" | tail -n 1 \
    | sed "s/^/    $arm, $n $items, seed $seed, finished: last validation /" || true
  echo "$fingerprint" > "$out/done"
}
evaluate() {  # ARM N SEED
  local arm=$1 n=$2 seed=$3
  "$PYTHON" -m pahubert_plugin.evaluate "$ft_root/${arm}_n${n}_s${seed}/checkpoints/checkpoint_$select.pt" \
    --root "$labelled" --subset test --metrics $eval_metrics --jobs 2 \
    --out "$results/eval/${arm}_n${n}_s${seed}" > "$results/eval_${arm}_n${n}_s${seed}.log" 2>&1 \
    || { echo "run.sh: evaluation failed; see $results/eval_${arm}_n${n}_s${seed}.log" >&2; exit 1; }
  echo "  $arm, $n $items, seed $seed:"
  grep -h '^| metric\|^| SDR\|^| SI-SDR\|^| PESQ\|^| STOI\|^| mixture SI-SDR' \
    "$results/eval/${arm}_n${n}_s${seed}/summary.md" | sed 's/^/    /'
}
if [ $stage -le 4 ]; then
  step 4 "fine-tuning $finetune_config ($tag): scratch vs pretrained, labelled $items {$train_tracks}, $seeds seed(s)"
  # fine-tuning runs train side by side, --parallel at a time (default 2), one thread each: on 2 cores that is
  # faster than one after the other with 2 threads, and it is how docs/RESULTS.md's figures were measured.
  # Without --reuse-scratch the two arms of a seed run together; with it, the pretrained arms of several seeds.
  pids=()
  launch() {  # ARM N SEED: in the background, waiting first for whichever run ends first when --parallel are running
    if [ ${#pids[@]} -ge $parallel ]; then
      local ended kept=() pid
      wait -n -p ended "${pids[@]}" || exit 1
      for pid in "${pids[@]}"; do [ "$pid" = "$ended" ] || kept+=("$pid"); done
      pids=("${kept[@]}")
    fi
    OMP_NUM_THREADS=1 finetune "$@" & pids+=($!)
  }
  for n in ${train_tracks//,/ }; do for seed in $(seq 1 $seeds); do
    if [ -n "$reuse_scratch" ]; then finetune scratch $n $seed; else launch scratch $n $seed; fi
    launch pretrained $n $seed
  done; done
  for pid in "${pids[@]}"; do wait "$pid" || exit 1; done
fi
stop_after 4
if [ $corpus_kind = speech ]; then
  step 5 "evaluating on $n_test test clips: SI-SDR(i) of whole clips, PESQ (wide band) and STOI of speech"
else
  step 5 "evaluating on $n_test test songs with museval (SDR in dB, median over 1 s frames, then songs)"
fi
for n in ${train_tracks//,/ }; do for seed in $(seq 1 $seeds); do
  evaluate scratch $n $seed; evaluate pretrained $n $seed
done; done
{
  echo "# command"
  echo "bash examples/demo/run.sh ${orig_args[*]:-}"
  if [ -n "$external_ckpt" ]; then echo "# pretrained arm from $external_ckpt; fine-tuning ($finetune_config): $finetune_updates updates per arm; scored: checkpoint_$select.pt"
  else echo "# pretraining: iteration $iteration ($(basename "$(dirname "$(dirname "$ckpt")")")), $pretrain_updates updates on $hours h; fine-tuning: $finetune_updates updates per arm; scored: checkpoint_$select.pt"; fi
  echo "# ft-args: $ft_args | pretrained-args: $pretrained_args | scratch-args: $scratch_args | pretrain-args: $pretrain_args"
} > "$results/settings.txt"
"$PYTHON" examples/demo/report.py --results "$results" --musdb-root "$labelled" --logs "$ft_root" \
  --settings "$results/settings.txt" --metric $report_metric
echo "demo finished in $(( (SECONDS - t0) / 60 )) min $(( (SECONDS - t0) % 60 )) s: $results/summary.md, $results/sdr.png"
