"""Fine-tuning speed on CPU: real ``fairseq-hydra-train`` runs of recipes/musdb/conf/CONFIG.yaml
(default ``pahubert_tiny``: task music_separation, model pahubert_resunet).

The script writes, in a temporary folder,

* a tiny MUSDB18-HQ-layout corpus (16 kHz stereo wav folders
  ``<root>/{train,test}/<song>/{mixture,drums,bass,other,vocals}.wav``, songs of the numpy toy
  synthesiser; the config holds out the last training song for validation), and
* a ``pahubert`` pretraining checkpoint of recipes/pahubert/conf/pretrain/tiny.yaml built
  directly (random weights: the architecture and tensor shapes are what matter for speed),

then trains for ``--updates`` updates at each thread count (OMP_NUM_THREADS), validating and
saving a checkpoint every ``--interval`` updates and at the end.  From fairseq's log
(benchmarks/fairseq_runs.py) it reports

* training throughput: updates/s and audio-s/s (batch x crop seconds per second) over the
  updates after warm-up, by the log's timestamps, wall-clock with data loading, **less** the
  validation and checkpoint-writing spans (what fairseq's own ``ups`` meter does not subtract:
  its interval after a validation includes it; printed for comparison);
* validation and checkpoint writing: count and seconds, measured separately;
* fairseq's ``train_wall`` (time inside Trainer.train_step) of the whole run next to its
  ``done training in`` wall time: the difference is data loading + validation + checkpointing +
  logging.

    python benchmarks/bench_finetune.py                       # pahubert_tiny at 1 and 2 threads
    python benchmarks/bench_finetune.py --threads 2 --updates 60 --interval 20
"""
import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pahubert_plugin  # noqa: E402,F401

from pahubert_plugin.configs import load_recipe_config  # noqa: E402

import fairseq_runs  # noqa: E402  (benchmarks/)

FT_CONF = REPO / "recipes" / "musdb" / "conf"
PRETRAIN_CONF = REPO / "recipes" / "pahubert" / "conf" / "pretrain"


def make_pretraining_checkpoint(path, config="tiny", n_clusters=100):
    """A fairseq-style ``pahubert`` checkpoint of the pretraining config, random weights."""
    from fairseq import checkpoint_utils

    from pahubert_plugin.models.pahubert import PahubertConfig, PahubertModel, _tie_to_task

    yaml = load_recipe_config(PRETRAIN_CONF / f"{config}.yaml")
    model_over = OmegaConf.to_container(yaml.model, resolve=False)
    for key in ("_name", "label_rate", "sample_rate", "audio_channels"):
        model_over.pop(key, None)
    cfg = _tie_to_task(OmegaConf.structured(PahubertConfig), yaml.task)
    cfg.merge_with(model_over)
    model = PahubertModel(cfg, [n_clusters + 4])
    task = {"_name": "pahubert_pretraining", "sample_rate": int(yaml.task.sample_rate),
            "audio_channels": int(yaml.task.audio_channels), "label_rate": float(yaml.task.label_rate)}
    state = {"args": None, "cfg": {"model": dict(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), _name="pahubert"),
                                   "task": task},
             "model": model.state_dict()}
    checkpoint_utils.torch_persistent_save(state, str(path))
    return sum(p.numel() for p in model.parameters())


def overrides(config, data, ckpt, save, updates, interval, log_interval, lr, warmup):
    return ["--config-dir", FT_CONF, "--config-name", config,
            f"common.user_dir={fairseq_runs.PLUGIN_DIR}", "common.log_format=json",
            f"common.log_interval={log_interval}", f"task.data={data}", f"model.pretrained_checkpoint={ckpt}",
            f"checkpoint.save_dir={save}", f"hydra.run.dir={save}/hydra", f"optimization.max_update={updates}",
            f"dataset.validate_interval_updates={interval}", f"checkpoint.save_interval_updates={interval}",
            f"optimizer.groups.default.lr_float={lr}",
            f"optimizer.groups.default.lr_scheduler.warmup_updates={warmup}"]


def bench(config, data, ckpt, workdir, threads, updates, interval, warmup, log_interval, lr):
    save = Path(workdir) / f"ft_t{threads}"
    over = overrides(config, data, ckpt, save, updates, interval, log_interval, lr, max(1, warmup))
    load0 = fairseq_runs.load_average()
    log, wall = fairseq_runs.run_hydra_train(over, workdir, threads)
    load1 = fairseq_runs.load_average()
    tp = fairseq_runs.throughput(log, warmup)
    yaml = load_recipe_config(FT_CONF / f"{config}.yaml")
    bsz, crop = int(yaml.dataset.batch_size), float(yaml.task.segment)
    audio_s = tp["ups"] * bsz * crop
    print(f"{config}, {threads} thread(s): training {tp['ups']:.3f} updates/s, {audio_s:.1f} audio-s/s "
          f"(batch {bsz} x {crop:g} s; updates {warmup}-{warmup + tp['updates']}: {tp['seconds']:.1f} s by log "
          f"timestamps less validation/checkpointing; fairseq's ups meter over the same lines "
          f"{tp['fairseq_ups']:.3f}, its train_wall {tp['train_wall']:.0f} s)", flush=True)
    print(f"  validation: {tp['valid_n']} x, {tp['valid_s']:.1f} s in all; checkpoint writing: {tp['save_n']} x, "
          f"{tp['save_s']:.1f} s in all; fairseq train_wall (whole run) {tp['total_train_wall'] or 0:.0f} s vs "
          f"'done training in' {tp['done_s'] or 0:.1f} s; process wall {wall:.1f} s (startup included); "
          f"load average {load0} -> {load1}", flush=True)
    print(f"  command: {fairseq_runs.command_line(over, threads)}", flush=True)
    return tp, audio_s, load1


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="pahubert_tiny", help="recipes/musdb/conf/CONFIG.yaml (a pahubert_resunet "
                        "config; default pahubert_tiny)")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--updates", type=int, default=30, help="updates per run (default 30)")
    parser.add_argument("--interval", type=int, default=10,
                        help="validate and save every N updates (and at the end; default 10)")
    parser.add_argument("--warmup", type=int, default=5, help="updates left out of the throughput (default 5)")
    parser.add_argument("--log-interval", type=int, default=5, help="fairseq log interval (default 5)")
    parser.add_argument("--lr", type=float, default=1e-3, help="optimizer.groups.default.lr_float")
    parser.add_argument("--songs", type=int, default=4, help="training songs (the last one validates; default 4)")
    parser.add_argument("--song-seconds", type=float, default=12.0, help="song length (default 12 s)")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), flush=True)
    print(f"load average at start: {fairseq_runs.load_average()}", flush=True)
    yaml = load_recipe_config(FT_CONF / f"{args.config}.yaml")
    sr = int(yaml.task.sample_rate)
    threads = [int(t) for t in args.threads.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as tmp:
        data = fairseq_runs.write_musdb_corpus(Path(tmp) / "musdb", train=args.songs, test=1,
                                               seconds=args.song_seconds, sr=sr)
        ckpt = Path(tmp) / "pretrain.pt"
        n = make_pretraining_checkpoint(ckpt)
        print(f"corpus: {args.songs} training songs of {args.song_seconds:g} s ({sr} Hz stereo; the last one "
              f"validates), pretraining checkpoint: tiny pahubert, {n / 1e6:.2f} M parameters, random weights",
              flush=True)
        for t in threads:
            rows.append((t, *bench(args.config, data, ckpt, tmp, t, args.updates, args.interval, args.warmup,
                                   args.log_interval, args.lr)))
    print(f"\n{args.config} fine-tuning on CPU ({args.updates} updates, validation + checkpoint every "
          f"{args.interval} and at the end)")
    print("| threads | train updates/s | train audio-s/s | fairseq ups meter | validation s (n) | "
          "checkpoint s (n) | train_wall / done-training s | load average after |")
    print("|---|---|---|---|---|---|---|---|")
    for t, tp, audio_s, load in rows:
        print(f"| {t} | {tp['ups']:.3f} | {audio_s:.1f} | {tp['fairseq_ups']:.3f} | {tp['valid_s']:.1f} "
              f"({tp['valid_n']}) | {tp['save_s']:.1f} ({tp['save_n']}) | {tp['total_train_wall'] or 0:.0f} / "
              f"{tp['done_s'] or 0:.0f} | {load} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
