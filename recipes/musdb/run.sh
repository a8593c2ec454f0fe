#!/usr/bin/env bash
# MUSDB18 fine-tuning and evaluation recipe (Kaldi/ESPnet style). Stages:
#   1  fine-tune  fairseq-hydra-train (conf/$config.yaml), task=music_separation -> $exp_dir/checkpoints
#   2  evaluate   museval BSSEval v4 on $eval_subset -> $exp_dir/eval/{<subset>/<track>.json,summary.md}
#   3  separate   (optional) separate the files of $separate_dir -> $exp_dir/separated
#
# Usage:
#   bash recipes/musdb/run.sh --musdb-root DIR --exp-dir DIR [--config base] \
#        [--pretrained CKPT] [--stage 1] [--stop-stage 2] [-- HYDRA_OVERRIDES...]   (on a CPU: --config tiny)
# Configs: tiny | base (resunet from scratch), pahubert_tiny | pahubert_base (need --pretrained, a
# pahubert pretraining checkpoint; for the scratch arm add model.no_pretrained_weights=true after `--`, and
# with pahubert_base also model.freeze_encoder_updates=0 model.encoder_lr_scale=1.0),
# demucs_v2_{tiny,base}, demucs_v2_hubert_{tiny,base} (--pretrained: its pretraining or ported checkpoint).
# Every option below is --name-with-dashes VALUE. Logs: $exp_dir/logs/stage*.log.
# A rerun of a finished fine-tuning exits at once ("already finished"); evaluation skips scored tracks.
# One run at a time per --exp-dir (a lock, $exp_dir/.pahubert.lock, holds the running one's PID).
set -euo pipefail

# ---- options -----------------------------------------------------------------------------------
musdb_root=             # MUSDB18-HQ root with train/ and test/ (or .stem.mp4 files with --is-wav false)
exp_dir=exp/musdb       # everything this recipe writes goes under here
config=base             # conf/<name>.yaml
pretrained=             # pahubert pretraining checkpoint (pahubert_* configs)
is_wav=true             # wav folders (MUSDB18-HQ layout) | false: MUSDB18 .stem.mp4 through musdb
eval_subset=test        # subset folder scored in stage 2
eval_jobs=2             # tracks scored in parallel
eval_tracks=0           # score only the first N tracks (0: all)
device=cpu              # cpu | cuda for stages 2-3
segment=                # inference chunk in seconds (default: the checkpoint's validation chunk)
separate_dir=           # stage 3: folder of audio files to separate
stage=1
stop_stage=2
PYTHON=${PYTHON:-python}  # the Makefile puts .venv/bin first on PATH; else the repo's .venv is used

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; echo; options_help "$0"; }

. "$(dirname "${BASH_SOURCE[0]}")/../utils/parse_options.sh"

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
[ -n "$musdb_root" ] || { echo "run.sh: --musdb-root is required" >&2; exit 1; }
musdb_root=$(cd "$musdb_root" && pwd)
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}

# the Python that has the project: $PYTHON, else the repo's .venv (relative to this script)
has_project() { "$1" -c 'import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ("omegaconf", "fairseq", "pahubert_plugin")))' >/dev/null 2>&1; }
if ! has_project "$PYTHON"; then
  if [ -x "$repo/.venv/bin/python" ] && has_project "$repo/.venv/bin/python"; then
    PYTHON=$repo/.venv/bin/python
  else
    echo "run.sh: '$PYTHON' cannot import the project (omegaconf, fairseq, pahubert_plugin): run" \
         "'source $repo/.venv/bin/activate' first (made by 'make setup'), or set PYTHON=/path/to/python" >&2
    exit 1
  fi
fi

mkdir -p "$exp_dir/logs"
exp_dir=$(cd "$exp_dir" && pwd)
# one run per --exp-dir: flock on $exp_dir/.pahubert.lock (held by this shell and its children)
. "$(dirname "${BASH_SOURCE[0]}")/../utils/lock_exp_dir.sh"
# hydra override value: 'VALUE' quoted for hydra's lexer (a space in a path), quotes escaped
hq() { printf "'%s'" "${1//\'/\\\'}"; }
ckpt_dir=$exp_dir/checkpoints
seg_args=(); [ -z "$segment" ] || seg_args=(--segment "$segment")
wav_args=(); [ "$is_wav" != true ] || wav_args=(--is-wav)

if [ "$stage" -le 1 ] && [ "$stop_stage" -ge 1 ]; then
  echo "stage 1: fine-tune ($config) -> $ckpt_dir"
  extra=()
  # the config says whether it needs a pretraining checkpoint (model.pretrained_checkpoint: ???)
  needs=$("$PYTHON" -c 'import sys; from omegaconf import OmegaConf; from pahubert_plugin.configs import load_recipe_config
print(OmegaConf.to_container(load_recipe_config(sys.argv[1])).get("model", {}).get("pretrained_checkpoint") == "???")' \
    "$here/conf/$config.yaml") || { echo "run.sh: cannot read $here/conf/$config.yaml" >&2; exit 1; }
  if [ "$needs" = True ] && [ -z "$pretrained" ]; then
    echo "run.sh: config $config needs --pretrained CKPT (its model.pretrained_checkpoint is ???)" >&2; exit 1
  fi
  if [ -n "$pretrained" ]; then  # a pretraining or ported checkpoint (models/pretrained.py)
    [ -f "$pretrained" ] || { echo "run.sh: --pretrained $pretrained: no such file" >&2; exit 1; }
    extra+=("model.pretrained_checkpoint=$(hq "$(cd "$(dirname "$pretrained")" && pwd)/$(basename "$pretrained")")")
  fi
  "$PYTHON" -m fairseq_cli.hydra_train --config-dir "$here/conf" --config-name "$config" \
    task.data="$(hq "$musdb_root")" ++task.is_wav="$is_wav" common.user_dir="$(hq "$repo/pahubert_plugin")" \
    checkpoint.save_dir="$(hq "$ckpt_dir")" hydra.run.dir="$(hq "$exp_dir/logs/hydra")" \
    ${extra[@]+"${extra[@]}"} ${train_overrides[@]+"${train_overrides[@]}"} 2>&1 | tee "$exp_dir/logs/stage1.log"
fi

if [ "$stage" -le 2 ] && [ "$stop_stage" -ge 2 ]; then
  echo "stage 2: evaluate $ckpt_dir/checkpoint_best.pt on $eval_subset -> $exp_dir/eval"
  "$PYTHON" -m pahubert_plugin.evaluate "$ckpt_dir/checkpoint_best.pt" --musdb-root "$musdb_root" \
    "${wav_args[@]}" --subset "$eval_subset" --jobs "$eval_jobs" --tracks "$eval_tracks" \
    --device "$device" --out "$exp_dir/eval" "${seg_args[@]}" 2>&1 | tee "$exp_dir/logs/stage2.log"
fi

if [ "$stage" -le 3 ] && [ "$stop_stage" -ge 3 ]; then
  [ -n "$separate_dir" ] || { echo "run.sh: stage 3 needs --separate-dir DIR" >&2; exit 1; }
  echo "stage 3: separate $separate_dir -> $exp_dir/separated"
  mapfile -t files < <(find "$separate_dir" -type f \( -iname '*.wav' -o -iname '*.flac' -o -iname '*.mp3' -o -iname '*.ogg' \) | sort)
  "$PYTHON" -m pahubert_plugin.separate "$ckpt_dir/checkpoint_best.pt" "${files[@]}" -o "$exp_dir/separated" \
    --device "$device" "${seg_args[@]}" 2>&1 | tee "$exp_dir/logs/stage3.log"
fi
