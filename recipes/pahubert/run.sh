#!/usr/bin/env bash
# Pac-HuBERT recipe (Kaldi/ESPnet style). Stages:
#   0  manifest   audio folder -> $data_dir/{train,valid}.tsv (+ .meta.tsv, skipped.tsv)
#   1  features   mfcc|primitive per frame, $nj shards per split (fairseq dump_feature + our reader)
#   2  k-means    fairseq learn_kmeans.py on the train features -> $km_path
#   3  labels     fairseq's dump_km_label per shard (model loaded safely) -> $label_dir/{split}.$label_name + dict, checked
#   4  pretrain   fairseq-hydra-train (conf/pretrain/$pretrain_config.yaml) on those labels -> $iter1_dir
#   5  relabel    layer $hubert_layer of iteration 1 (dump_features --feature hubert), k-means, labels
#   6  pretrain   iteration 2 on the stage-5 labels -> $iter2_dir
#
# Usage:
#   bash recipes/pahubert/run.sh --audio-dir DIR --exp-dir DIR [--sample-rate 44100] [--nj 4] \
#        [--feature mfcc] [--n-clusters 100] [--pretrain-config base] [--stage 0] [--stop-stage 6] \
#        [-- HYDRA_OVERRIDES...]    (stages 4 and 6; e.g. distributed_training.distributed_world_size=8)
#   (defaults shown; on a CPU: --sample-rate 16000 --nj 2 --pretrain-config tiny)
# Every option below is --name-with-dashes VALUE. Logs: $exp_dir/logs/stage*.log.
# A rerun skips every stage that finished with the same inputs and options (stamps in $exp_dir/.stages);
# one run at a time per --exp-dir (a lock, $exp_dir/.pahubert.lock, holds the running one's PID).
set -euo pipefail

# ---- options (--audio-dir sets audio_dir, and so on) ------------------------------------------
audio_dir=              # unlabelled audio (wav/flac/mp3/ogg), walked recursively (stage 0)
exp_dir=exp/pahubert    # everything this recipe writes goes under here
data_dir=               # manifests; default $exp_dir/data
sample_rate=44100       # target rate (multiple of 100); labels are 100 Hz, hop = sample_rate/100
valid_percent=0.01      # fraction of files held out for valid.tsv
min_seconds=1.0         # shorter files are skipped (skipped.tsv, reason too_short)
exts=wav,flac,mp3,ogg   # audio extensions the manifest picks up
seed=0                  # train/valid split and k-means seed
nj=4                    # parallel jobs: shards per split for features and labels, scan workers
feature=mfcc            # clustering feature: mfcc (39-d Kaldi MFCC+D+DD) | primitive (47-d, + Bregman cues)
n_clusters=100          # k-means clusters (HuBERT iteration 1 uses 100)
percent=-1              # fraction of train files sampled per shard to fit k-means; -1 = all
km_args=""              # extra options for fairseq's learn_kmeans.py, e.g. "--n_init 5 --batch_size 10000"
label_name=km           # label set written by stages 3 and 5: {split}.<label_name> + dict.<label_name>.txt
label_rate=100          # label frames per second (the frame rule: 100; other rates need labels made elsewhere)
pretrain_labels=        # stages 4 and 6: comma-separated label sets in the label folder (task.labels),
                        #   default $label_name; several sets train one head each (criterion.pred_masked_weight
                        #   and the per-set loss weights apply)
# stages 4-6 (pretraining); hydra overrides after `--` go to both fairseq-hydra-train runs
pretrain_config=base    # conf/pretrain/<name>.yaml: base (GPUs, 44.1 kHz) | tiny (CPU minutes)
hubert_layer=6          # stage 5: transformer layer (1-based) clustered for iteration 2 (HuBERT: 6 of 12)
n_clusters_iter2=500    # stage 5: k-means clusters of iteration 2 (HuBERT Base: 500)
hubert_device=cpu       # stage 5: cpu | cuda, for the feature-reading model
hubert_max_chunk=60     # stage 5: seconds of audio per forward pass (long files are chunked)
stage=0
stop_stage=6
PYTHON=${PYTHON:-python}  # the Makefile puts .venv/bin first on PATH; else the repo's .venv is used

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; echo; options_help "$0"; }

. "$(dirname "${BASH_SOURCE[0]}")/../utils/parse_options.sh"

# ---- the Python that has the project: $PYTHON, else the repo's .venv (relative to this script) ------
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
has_project() { "$1" -c 'import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ("omegaconf", "fairseq", "pahubert_plugin")))' >/dev/null 2>&1; }
if ! has_project "$PYTHON"; then
  if [ -x "$repo_root/.venv/bin/python" ] && has_project "$repo_root/.venv/bin/python"; then
    PYTHON=$repo_root/.venv/bin/python
  else
    echo "run.sh: '$PYTHON' cannot import the project (omegaconf, fairseq, pahubert_plugin): run" \
         "'source $repo_root/.venv/bin/activate' first (made by 'make setup'), or set PYTHON=/path/to/python" >&2
    exit 1
  fi
fi

# ---- derived paths ----------------------------------------------------------------------------
# the stage stamps hash these folders' names: one spelling per folder (absolute, no "." or ".."), so a rerun that
# names a folder relative to another directory, or absolute, still finds its finished stages
canonical() { [ -z "$1" ] || realpath -m -s -- "$1"; }
audio_dir=$(canonical "$audio_dir"); exp_dir=$(canonical "$exp_dir"); data_dir=$(canonical "$data_dir")
data_dir=${data_dir:-$exp_dir/data}
tag=${feature}_k${n_clusters}
feat_dir=$exp_dir/feat/$feature                 # {split}_{rank}_{nshard}.npy/.len
km_path=$exp_dir/km/$tag.km                     # joblib-saved MiniBatchKMeans
label_dir=$exp_dir/labels/$tag                  # {split}.km + dict.km.txt (what pretraining reads)
log_dir=$exp_dir/logs
iter1_dir=$exp_dir/pretrain/iter1_$tag          # stage 4: checkpoints/, hydra logs
iter2_tag=${tag}_l${hubert_layer}_k${n_clusters_iter2}   # iteration-1 features, layer, clusters
feat2_dir=$exp_dir/feat/$iter2_tag              # stage 5: hidden features of iteration 1
km2_path=$exp_dir/km/$iter2_tag.km
label2_dir=$exp_dir/labels/$iter2_tag
iter2_dir=$exp_dir/pretrain/iter2_$iter2_tag    # stage 6
mkdir -p "$exp_dir" "$log_dir"

log() { echo "[$(date '+%H:%M:%S')] $*"; }

# ---- one run per --exp-dir: flock on $exp_dir/.pahubert.lock (held by this shell and its children) ---
. "$(dirname "${BASH_SOURCE[0]}")/../utils/lock_exp_dir.sh"

# ---- temporaries of an interrupted feature dump (dump_features writes each shard in feat/*/.<split>_<rank>_<n>.*/):
# removed when a stage starts and when this script fails
clean_temporaries() {
  local d
  for d in "$exp_dir"/feat/*/; do
    [ -d "$d" ] && find "$d" -mindepth 1 -maxdepth 1 -type d -name '.*_*_*.*' -exec rm -rf {} +
  done
  return 0
}
trap 'rc=$?; [ $rc = 0 ] || clean_temporaries; exit $rc' EXIT

# ---- stage stamps: a stage whose inputs, options and outputs are as its last success left them is skipped
stamp_dir=$exp_dir/.stages
# signature ITEMS...: a hash of the items (options, paths) and of the name, size and mtime of every file
# under those that are paths
signature() {
  local a
  for a in "$@"; do
    echo "$a"  # then its files, but not the hidden ones (locks, temporaries) below it
    [ ! -e "$a" ] || find "$a" -type f -printf '%P %s %T@\n' | { grep -Ev '(^|/)\.' || true; } | LC_ALL=C sort
  done | sha256sum | cut -d' ' -f1
}
# begin_stage N INPUTS -- OUTPUTS: 1 (skip, logged) if stage N's stamp says it finished with these inputs
# and left these outputs; else 0 (run it) and its stamp is removed until end_stage N
declare -A stage_inputs=() stage_outputs=()
begin_stage() {
  local n=$1 inputs=() outputs=(); shift
  while [ $# -gt 0 ] && [ "$1" != -- ]; do inputs+=("$1"); shift; done
  [ $# -gt 0 ] && shift; outputs=("$@")
  stage_inputs[$n]=$(signature "${inputs[@]}"); stage_outputs[$n]=$(printf '%s\n' "${outputs[@]}")
  local stamp=$stamp_dir/stage$n out
  if [ -f "$stamp" ] && [ "$(head -n 1 "$stamp")" = "${stage_inputs[$n]}" ]; then
    for out in "${outputs[@]}"; do [ -e "$out" ] || { rm -f "$stamp"; return 0; }; done
    if [ "$(sed -n 2p "$stamp")" = "$(signature "${outputs[@]}")" ]; then
      log "stage $n: skipped: done, and its inputs, options and outputs have not changed since (remove $stamp to run it again)"
      return 1
    fi
  fi
  rm -f "$stamp"; clean_temporaries; return 0
}
end_stage() {
  local n=$1 outputs=()
  mapfile -t outputs <<< "${stage_outputs[$n]}"
  mkdir -p "$stamp_dir"
  printf '%s\n%s\n' "${stage_inputs[$n]}" "$(signature "${outputs[@]}")" > "$stamp_dir/stage$n"
}
# hydra override value: 'VALUE' quoted for hydra's lexer (spaces, commas, brackets), quotes escaped
hq() { printf "'%s'" "${1//\'/\\\'}"; }

# run LOG CMD...: run CMD with its output in LOG; on failure show the log's tail and stop.
run() {
  local logfile=$1; shift
  echo "# $*" > "$logfile"
  if ! "$@" >> "$logfile" 2>&1; then
    echo "FAILED: $*" >&2; echo "---- tail of $logfile ----" >&2; tail -n 20 "$logfile" >&2; exit 1
  fi
}

# run_parallel: runs the queued commands in the background and waits; fails if any fails.
declare -a queued_logs=() queued_cmds=()
queue() { queued_logs+=("$1"); shift; queued_cmds+=("$(printf '%q ' "$@")"); }
run_parallel() {
  local pids=() i failed=0
  for i in "${!queued_cmds[@]}"; do
    ( run "${queued_logs[$i]}" bash -c "${queued_cmds[$i]}" ) & pids+=($!)
  done
  for i in "${!pids[@]}"; do wait "${pids[$i]}" || failed=1; done
  queued_logs=(); queued_cmds=()
  [ $failed = 0 ] || { echo "run.sh: a parallel job failed (logs above)" >&2; exit 1; }
}

# rows SPLIT: number of files in $data_dir/SPLIT.tsv (0 if absent)
rows() { local tsv=$data_dir/$1.tsv; [ -f "$tsv" ] && echo $(( $(wc -l < "$tsv") - 1 )) || echo 0; }
# nshard SPLIT: fairseq's get_shard_range needs at least one file per shard
nshard() { local n; n=$(rows "$1"); echo $(( n < nj ? n : nj )); }
splits() { local s; for s in train valid; do [ "$(rows $s)" -gt 0 ] && echo $s; done; return 0; }

# fairseq's examples/hubert/simple_kmeans (inside the installed fairseq-fixed package); looked up once
kmeans_dir=
find_kmeans_dir() {
  [ -n "$kmeans_dir" ] && return 0
  kmeans_dir=$("$PYTHON" -m pahubert_plugin.clustering.simple_kmeans) \
    || { echo "run.sh: fairseq's simple_kmeans scripts not found (is fairseq installed for $PYTHON?)" >&2; exit 1; }
}

# ---- stage 0: manifest ------------------------------------------------------------------------
if [ $stage -le 0 ] && [ $stop_stage -ge 0 ]; then
  [ -n "$audio_dir" ] || { echo "run.sh: stage 0 needs --audio-dir" >&2; exit 1; }
fi
if [ $stage -le 0 ] && [ $stop_stage -ge 0 ] && begin_stage 0 "$audio_dir" "$sample_rate" "$valid_percent" \
     "$min_seconds" "$exts" "$seed" -- "$data_dir/train.tsv" "$data_dir/valid.tsv" "$data_dir/skipped.tsv"; then
  log "stage 0: manifest of $audio_dir -> $data_dir (log $log_dir/stage0_manifest.log)"
  # the manifest exits 1 when it skipped files (listed in skipped.tsv) and 2 when nothing is usable
  mlog=$log_dir/stage0_manifest.log; rc=0
  echo "# $PYTHON -m pahubert_plugin.data.manifest $audio_dir $data_dir" > "$mlog"
  "$PYTHON" -m pahubert_plugin.data.manifest "$audio_dir" "$data_dir" \
    --sample-rate "$sample_rate" --valid-percent "$valid_percent" --exts "$exts" \
    --min-seconds "$min_seconds" --seed "$seed" --jobs "$nj" >> "$mlog" 2>&1 || rc=$?
  # its summary line ("kept N ...") is the sign it finished: a crash (a full disk, ...) exits 1 without it
  kept=$(grep -h "^kept " "$mlog" | tail -n 1 || true)
  if [ $rc -gt 1 ] || [ -z "$kept" ] || [ "$(rows train)" -le 0 ]; then
    if [ -n "$kept" ] && [ "$(rows train)" -le 0 ] && [ -f "$data_dir/skipped.tsv" ]; then
      echo "run.sh: no usable audio in $audio_dir (train.tsv is empty; skipped files and reasons: $data_dir/skipped.tsv)" >&2
    else
      error=$(grep -hE "\| ERROR \||^[A-Za-z.]*(Error|Exception): " "$mlog" | tail -n 1 || true)
      echo "run.sh: stage 0: pahubert-manifest failed (exit $rc): ${error:-no error message; see the log below}" >&2
    fi
    echo "FAILED: stage 0 manifest of $audio_dir (exit $rc)" >&2; echo "---- tail of $mlog ----" >&2
    tail -n 20 "$mlog" >&2; exit 1
  fi
  echo "$kept"
  [ $rc = 0 ] || log "  $(wc -l < "$data_dir/skipped.tsv") file(s) skipped: reasons in $data_dir/skipped.tsv"
  end_stage 0
fi

# ---- "features -> k-means -> labels": one function each, used by stages 1-3 and by stage 5 ---------
# features FEAT_DIR LOGTAG DUMP_OPTIONS...: per split, $nj shards of dump_features in parallel
features() {
  local feat=$1 logtag=$2 split ns rank; shift 2
  for split in $(splits); do
    ns=$(nshard $split)
    for rank in $(seq 0 $((ns - 1))); do
      queue "$log_dir/${logtag}_features.$split.$rank.log" \
        "$PYTHON" -m pahubert_plugin.clustering.dump_features "$data_dir" $split $ns $rank "$feat" "$@"
    done
    run_parallel
    log "  $split: $ns shard(s) done"
  done
}

# kmeans FEAT_DIR KM_PATH K LOGTAG: fairseq's learn_kmeans.py on the train features (model file written atomically)
kmeans() {
  find_kmeans_dir
  mkdir -p "$(dirname "$2")"
  # shellcheck disable=SC2086  # km_args is a list of options
  run "$log_dir/${4}_kmeans.log" "$PYTHON" -m pahubert_plugin.clustering.kmeans learn \
    "$1" train "$(nshard train)" "$2" "$3" --seed "$seed" --percent "$percent" $km_args
  grep -h "intertia\|inertia" "$log_dir/${4}_kmeans.log" | tail -n 1 || true
}

# labels FEAT_DIR KM_PATH K LABEL_DIR LOGTAG: per shard (model loaded safely), concatenated in manifest
# order -> LABEL_DIR/{split}.$label_name + dict.$label_name.txt, then checked against the manifest
labels() {
  local feat=$1 km=$2 k=$3 out=$4 logtag=$5 split ns rank i
  find_kmeans_dir
  mkdir -p "$out/shards"
  for split in $(splits); do
    ns=$(nshard $split)
    for rank in $(seq 0 $((ns - 1))); do
      queue "$log_dir/${logtag}_labels.$split.$rank.log" \
        "$PYTHON" -m pahubert_plugin.clustering.kmeans "$feat" $split "$km" $ns $rank "$out/shards"
    done
    run_parallel
    # fairseq's shards are contiguous slices of the manifest: concatenating them keeps its order
    for rank in $(seq 0 $((ns - 1))); do cat "$out/shards/${split}_${rank}_${ns}.km"; done > "$out/$split.$label_name"
  done
  for i in $(seq 0 $((k - 1))); do echo "$i 1"; done > "$out/dict.$label_name.txt"
  for split in $(splits); do
    run "$log_dir/${logtag}_check.$split.log" "$PYTHON" -m pahubert_plugin.clustering.check_labels \
      "$data_dir/$split.tsv" "$out/$split.$label_name" --sample-rate "$sample_rate" --dict "$out/dict.$label_name.txt"
    tail -n 1 "$log_dir/${logtag}_check.$split.log"
  done
}

manifests=("$data_dir/train.tsv" "$data_dir/valid.tsv")
if [ $stage -le 1 ] && [ $stop_stage -ge 1 ] && begin_stage 1 "${manifests[@]}" "$feature" "$sample_rate" "$nj" \
     -- "$feat_dir"; then
  log "stage 1: $feature features -> $feat_dir"
  features "$feat_dir" stage1 --feature "$feature" --sample-rate "$sample_rate"
  end_stage 1
fi
if [ $stage -le 2 ] && [ $stop_stage -ge 2 ] && begin_stage 2 "$feat_dir" "$n_clusters" "$percent" "$km_args" \
     "$seed" -- "$km_path"; then
  log "stage 2: k-means ($n_clusters clusters, percent $percent) -> $km_path"
  kmeans "$feat_dir" "$km_path" "$n_clusters" stage2
  end_stage 2
fi
if [ $stage -le 3 ] && [ $stop_stage -ge 3 ] && begin_stage 3 "${manifests[@]}" "$feat_dir" "$km_path" "$label_name" \
     -- "$label_dir/train.$label_name" "$label_dir/dict.$label_name.txt"; then
  log "stage 3: labels -> $label_dir"
  labels "$feat_dir" "$km_path" "$n_clusters" "$label_dir" stage3
  end_stage 3
fi

# ---- stages 4-6: pretraining ------------------------------------------------------------------
recipe_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
abspath() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }

# pretrain LABEL_DIR OUT_DIR LOG: fairseq-hydra-train on LABEL_DIR/{split}.<label set> (hydra changes into
# OUT_DIR, so every path is absolute); extra overrides after `--` on the command line come last.
pretrain() {
  local labels out logfile plugin_dir
  labels=$(abspath "$1"); out=$(abspath "$2"); logfile=$3
  plugin_dir=$("$PYTHON" -c 'import importlib.util as u, os; print(os.path.dirname(u.find_spec("pahubert_plugin").origin))')
  mkdir -p "$out"
  # paths are quoted for hydra's override lexer (a space in --exp-dir)
  run "$logfile" "$PYTHON" -m fairseq_cli.hydra_train \
    --config-dir "$recipe_dir/conf/pretrain" --config-name "$pretrain_config" \
    common.user_dir="$(hq "$plugin_dir")" task.data="$(hq "$(abspath "$data_dir")")" task.label_dir="$(hq "$labels")" \
    "task.labels=[${pretrain_labels:-$label_name}]" task.sample_rate="$sample_rate" \
    task.label_rate="$label_rate" model.label_rate="$label_rate" \
    checkpoint.save_dir="$(hq "$out/checkpoints")" hydra.run.dir="$(hq "$out")" ${train_overrides[@]+"${train_overrides[@]}"}
  grep -h "already finished: " "$logfile" | tail -n 1 | sed 's/.* - //' || true
  grep -h '\[train\]\|\[valid\]' "$logfile" | tail -n 2 || true
}

# pretrain_inputs LABEL_DIR: what a pretraining stage reads, and its options
pretrain_inputs() {
  echo "$1"; printf '%s\n' "${manifests[@]}" "$recipe_dir/conf/pretrain/$pretrain_config.yaml" "$pretrain_config" \
    "${pretrain_labels:-$label_name}" "$sample_rate" "$label_rate" ${train_overrides[@]+"${train_overrides[@]}"}
}
if [ $stage -le 4 ] && [ $stop_stage -ge 4 ] && mapfile -t inputs < <(pretrain_inputs "$label_dir") \
   && begin_stage 4 "${inputs[@]}" -- "$iter1_dir/checkpoints/checkpoint_best.pt" "$iter1_dir/checkpoints/checkpoint_last.pt"; then
  log "stage 4: pretrain iteration 1 ($pretrain_config) on $label_dir -> $iter1_dir (log $log_dir/stage4_pretrain.log)"
  pretrain "$label_dir" "$iter1_dir" "$log_dir/stage4_pretrain.log"
  end_stage 4
fi

ckpt1=$iter1_dir/checkpoints/checkpoint_last.pt  # the end of the schedule, as fine-tuning uses
if [ $stage -le 5 ] && [ $stop_stage -ge 5 ]; then
  [ -f "$ckpt1" ] || { echo "run.sh: stage 5 needs $ckpt1 (run stage 4)" >&2; exit 1; }
fi
if [ $stage -le 5 ] && [ $stop_stage -ge 5 ] && begin_stage 5 "${manifests[@]}" "$ckpt1" "$hubert_layer" \
     "$n_clusters_iter2" "$percent" "$km_args" "$seed" "$label_name" "$sample_rate" "$hubert_max_chunk" \
     -- "$feat2_dir" "$km2_path" "$label2_dir/train.$label_name" "$label2_dir/dict.$label_name.txt"; then
  log "stage 5: layer $hubert_layer features of $ckpt1 -> k-means $n_clusters_iter2 -> $label2_dir"
  features "$feat2_dir" stage5 --feature hubert --ckpt "$ckpt1" --layer "$hubert_layer" \
    --device "$hubert_device" --max-chunk "$hubert_max_chunk" --sample-rate "$sample_rate"
  kmeans "$feat2_dir" "$km2_path" "$n_clusters_iter2" stage5
  labels "$feat2_dir" "$km2_path" "$n_clusters_iter2" "$label2_dir" stage5
  end_stage 5
fi

if [ $stage -le 6 ] && [ $stop_stage -ge 6 ] && mapfile -t inputs < <(pretrain_inputs "$label2_dir") \
   && begin_stage 6 "${inputs[@]}" -- "$iter2_dir/checkpoints/checkpoint_best.pt" "$iter2_dir/checkpoints/checkpoint_last.pt"; then
  log "stage 6: pretrain iteration 2 ($pretrain_config) on $label2_dir -> $iter2_dir (log $log_dir/stage6_pretrain.log)"
  pretrain "$label2_dir" "$iter2_dir" "$log_dir/stage6_pretrain.log"
  end_stage 6
fi

log "done (stages $stage-$stop_stage); outputs under $exp_dir"
