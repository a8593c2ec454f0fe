"""Pac-HuBERT pretraining speed: updates/s and audio-seconds/s, and parameter counts.

Two figures for the same config, measured in one process run under the same load:

* **step**: full training steps timed in this process (forward, HuBERT loss, backward,
  optimizer step with gradient clipping) on one batch.  On CPU the step is fairseq's: the batch
  is collated by the real ``pahubert_pretraining`` dataset from a tiny corpus this script writes
  (same crops, padding mask and label dictionary as training), the optimizer is fairseq's
  ``FairseqAdam`` built from the config (decoupled weight decay), gradients are divided by the
  sample size and clipped the way fairseq's Trainer does.  On CUDA (``--config base``) the step
  runs on a synthetic batch under fp16 autocast with a GradScaler (fairseq's ``common.amp``) and
  peak GPU memory is printed.
* **fairseq**: a real ``fairseq-hydra-train`` run of recipes/pahubert/conf/pretrain/NAME.yaml on
  that corpus (CPU only), throughput read from the log's timestamps after warm-up (see
  benchmarks/fairseq_runs.py: wall-clock, data loading included, like fairseq's ``ups`` meter).

Both honour the thread count (``--threads 1,2``: torch.set_num_threads here, OMP_NUM_THREADS for
fairseq).  On 2 cores shared with other jobs, 2 intra-op threads can be several times slower
than 1: report the load average next to every figure (printed).  The step also prints CPU
seconds per update (all threads): at 1 thread that is about the wall time per update the step
would take on an idle core.

    python benchmarks/bench_pretrain.py                       # tiny on CPU (+ base on GPU if any)
    python benchmarks/bench_pretrain.py --config tiny --threads 1,2
    python benchmarks/bench_pretrain.py --config base --device cuda --updates 20
    python benchmarks/bench_pretrain.py --config tiny --threads 1 --no-fairseq --logits-peer
"""
import argparse
import contextlib
import shlex
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pahubert_plugin  # noqa: E402,F401
from pahubert_plugin.criterions.pahubert import PahubertCriterion  # noqa: E402
from pahubert_plugin.models.pahubert import PahubertConfig, PahubertModel, _tie_to_task  # noqa: E402

from pahubert_plugin.configs import load_recipe_config  # noqa: E402

import fairseq_runs  # noqa: E402  (benchmarks/)

CONF = REPO / "recipes" / "pahubert" / "conf" / "pretrain"
CLUSTERS = {"tiny": 100, "base": 500}  # k-means sizes of the recipe (iteration 1 / 2)


def load_config(name):
    """(model cfg, task cfg, criterion cfg, dataset cfg) of recipes/pahubert/conf/pretrain/NAME.yaml."""
    yaml = load_recipe_config(CONF / f"{name}.yaml")
    task = yaml.task
    model = OmegaConf.to_container(yaml.model, resolve=False)
    for key in ("_name", "label_rate", "sample_rate", "audio_channels"):
        model.pop(key, None)
    cfg = _tie_to_task(OmegaConf.structured(PahubertConfig), task)
    cfg.merge_with(model)
    return cfg, task, yaml.criterion, yaml.dataset


def build(name, device):
    cfg, task, crit_cfg, _ = load_config(name)
    model = PahubertModel(cfg, [CLUSTERS[name] + 4]).to(device)  # + fairseq's 4 special symbols
    fake_task = SimpleNamespace(cfg=SimpleNamespace(labels=list(task.labels)))
    criterion = PahubertCriterion(fake_task, crit_cfg.pred_masked_weight, crit_cfg.pred_nomask_weight,
                                  list(crit_cfg.loss_weights))
    return model, criterion, task


def default_batch(name, task, dataset):
    """Batch size and crop length the config trains with (max_tokens / crop when batching by tokens)."""
    length = int(task.max_sample_size)
    if dataset.get("batch_size"):
        return int(dataset.batch_size), length
    return max(1, int(dataset.max_tokens) // length), length


def count_params(name):
    model, _, _ = build(name, "cpu")
    return sum(p.numel() for p in model.parameters())


def corpus_task(name, data, max_sample_size=None):
    """The config's pahubert_pretraining task on the corpus in ``data`` (train split loaded)."""
    from pahubert_plugin.tasks.pahubert_pretraining import PahubertPretrainingConfig, PahubertPretrainingTask

    yaml_task = load_recipe_config(CONF / f"{name}.yaml").task
    task_cfg = OmegaConf.merge(OmegaConf.structured(PahubertPretrainingConfig),
                               {k: v for k, v in OmegaConf.to_container(yaml_task).items() if k != "_name"},
                               {"data": str(data), "label_dir": str(data), "seed": 1})
    if max_sample_size:
        task_cfg.max_sample_size = int(max_sample_size)
    task = PahubertPretrainingTask.setup_task(task_cfg)
    task.load_dataset("train")
    return task


def fairseq_optimizer(name, params):
    """The config's FairseqAdam (what fairseq-hydra-train builds on CPU: fairseq's own Adam)."""
    from fairseq.optim.adam import FairseqAdam

    yaml = load_recipe_config(CONF / f"{name}.yaml")
    assert yaml.optimizer._name == "adam", yaml.optimizer
    cfg = OmegaConf.create({"adam_betas": yaml.optimizer.adam_betas, "adam_eps": yaml.optimizer.adam_eps,
                            "weight_decay": yaml.optimizer.weight_decay, "lr": list(yaml.optimization.lr),
                            "tpu": False, "fp16_adam_stats": False, "use_old_adam": False})
    return FairseqAdam(cfg, params), float(yaml.optimization.clip_norm)


def bench(name, device, updates, batch_size=None, seconds=None, warmup=2, data=None):
    """Time ``updates`` training steps after ``warmup``; returns (updates/s, audio-s/s, batch, crop s)."""
    cfg, task_cfg, _, dataset = load_config(name)
    bsz, length = default_batch(name, task_cfg, dataset)
    bsz = batch_size or bsz
    length = int(seconds * task_cfg.sample_rate) if seconds else length
    cuda = device.startswith("cuda")
    if data is not None:  # CPU: fairseq's step on a batch of the real dataset
        task = corpus_task(name, data, length if seconds else None)
        model = PahubertModel.build_model(cfg, task).to(device)
        criterion = PahubertCriterion(task, *_crit_args(name))
        ds = task.dataset("train")
        ds.set_epoch(1)
        sample = ds.collater([ds[i] for i in range(bsz)])
        length = sample["net_input"]["source"].shape[-1]
        opt, clip = fairseq_optimizer(name, list(model.parameters()))

        def step():
            opt.zero_grad()
            loss, sample_size, log = criterion(model, sample)
            opt.backward(loss)
            opt.multiply_grads(1.0 / (sample_size or 1.0))
            opt.clip_grad_norm(clip)
            opt.step()
            return log
    else:  # synthetic batch (GPU path; fp16 autocast + GradScaler on CUDA)
        model, criterion, task_cfg = build(name, device)
        opt = torch.optim.Adam(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
        scaler = torch.amp.GradScaler("cuda", enabled=cuda)
        gen = torch.Generator().manual_seed(0)
        source = (0.1 * torch.randn(bsz, task_cfg.audio_channels, length, generator=gen)).to(device)
        frames = length // (task_cfg.sample_rate // 100)
        sample = {
            "id": torch.arange(bsz),
            "net_input": {"source": source,
                          "padding_mask": torch.zeros(bsz, length, dtype=torch.bool, device=device)},
            "target_list": [torch.randint(4, CLUSTERS[name] + 4, (bsz, frames), generator=gen).to(device)],
        }

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
                loss, sample_size, log = criterion(model, sample)
            scaler.scale(loss / sample_size).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            scaler.step(opt)
            scaler.update()
            return log

    model.train()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    load0 = fairseq_runs.load_average()
    start, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(updates):
        log = step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    cpu_per_update = (time.process_time() - cpu0) / updates
    ups = updates / elapsed
    sr = task_cfg.sample_rate
    channels = task_cfg.audio_channels
    audio_s = ups * bsz * length / sr
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    what = "fairseq's step on a dataset batch" if data is not None else "synthetic batch"
    print(f"{name} step ({what}): batch {bsz} x {length / sr:.2f} s, {sr} Hz x {channels} ch "
          f"on {where}{' (fp16 autocast)' if cuda else ''}: {ups:.3f} updates/s, {audio_s:.1f} audio-s/s "
          f"({elapsed / updates:.3f} s/update over {updates} updates, {cpu_per_update:.3f} CPU-s/update "
          f"(all threads); masked acc "
          f"{log['correct_m_0'] / max(log['count_m_0'], 1):.2f}; load average {load0} -> "
          f"{fairseq_runs.load_average()})", flush=True)
    if cuda:
        print(f"{name}: peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB")
    return ups, audio_s, bsz, length / sr


@contextlib.contextmanager
def expanded_nce():
    """The head computes its logits with fairseq's compute_nce on (classes, tokens, dim) negatives."""
    from pahubert_plugin.models.hubert_encoder import MaskedPredictionHead

    fast = MaskedPredictionHead.cosine_logits
    MaskedPredictionHead.cosine_logits = MaskedPredictionHead.expanded_logits
    try:
        yield
    finally:
        MaskedPredictionHead.cosine_logits = fast


def _crit_args(name):
    crit = load_recipe_config(CONF / f"{name}.yaml").criterion
    return crit.pred_masked_weight, crit.pred_nomask_weight, list(crit.loss_weights)


def fairseq_overrides(name, data, save, max_update, log_interval, batch_size=None, seconds=None):
    over = ["--config-dir", CONF, "--config-name", name,
            f"common.user_dir={fairseq_runs.PLUGIN_DIR}", "common.cpu=true", f"common.log_interval={log_interval}",
            "common.log_format=json", f"task.data={data}", f"task.label_dir={data}",
            f"optimization.max_update={max_update}", "dataset.disable_validation=true",
            "checkpoint.no_save=true", f"checkpoint.save_dir={save}", f"hydra.run.dir={save}/hydra"]
    if batch_size:
        over.append(f"dataset.batch_size={batch_size}")
    if seconds:
        over.append(f"task.max_sample_size={int(seconds * load_recipe_config(CONF / f'{name}.yaml').task.sample_rate)}")
    return over


def bench_fairseq(name, data, workdir, threads, updates, warmup=2, log_interval=2, batch_size=None, seconds=None):
    """A real fairseq-hydra-train run of the config on ``data``; returns (updates/s, audio-s/s)."""
    over = fairseq_overrides(name, data, Path(workdir) / f"fairseq_t{threads}", warmup + updates,
                             log_interval, batch_size, seconds)
    load0 = fairseq_runs.load_average()
    log, wall = fairseq_runs.run_hydra_train(over, workdir, threads)
    tp = fairseq_runs.throughput(log, warmup)
    records, _ = fairseq_runs.parse_log(log)
    inner = [r for _, kind, r in records if kind == "train_inner"]
    bsz = sum(float(r["bsz"]) for r in inner) / len(inner)
    task = load_recipe_config(CONF / f"{name}.yaml").task
    crop = (seconds or task.max_sample_size / task.sample_rate)
    audio_s = tp["ups"] * bsz * crop
    print(f"{name} fairseq-hydra-train: batch {bsz:g} x {crop:.2f} s on CPU, {threads} threads: "
          f"{tp['ups']:.3f} updates/s, {audio_s:.1f} audio-s/s (updates {warmup}-{warmup + tp['updates']}, "
          f"{tp['seconds']:.1f} s by log timestamps; fairseq's ups meter {tp['fairseq_ups']:.3f}, "
          f"train_wall {tp['train_wall']:.0f} s (inside train_step, whole seconds); process wall {wall:.0f} s; "
          f"load average {load0} -> {fairseq_runs.load_average()})", flush=True)
    print(f"  command: {fairseq_runs.command_line(over, threads)}", flush=True)
    return tp["ups"], audio_s


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("tiny", "base"), default=None,
                        help="measure only this config (default: tiny on CPU, and base if a GPU is present)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cpu for tiny, cuda for base)")
    parser.add_argument("--updates", type=int, default=10, help="timed updates (after 2 warm-up updates), "
                        "for the step and for the fairseq run")
    parser.add_argument("--batch-size", type=int, default=None, help="override the config's batch size")
    parser.add_argument("--seconds", type=float, default=None, help="override the config's crop length")
    parser.add_argument("--threads", default=None,
                        help="comma-separated intra-op thread counts for the CPU figures (default: torch's "
                             f"default here, {torch.get_num_threads()})")
    parser.add_argument("--no-fairseq", action="store_true", help="CPU: time the step only, no fairseq run")
    parser.add_argument("--logits-peer", action="store_true",
                        help="CPU: also time the step with fairseq's own HubertModel.compute_nce on the expanded "
                             "(classes, tokens, dim) negatives instead of the head's matrix-product cosine logits "
                             "(same values), and print the ratio")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), flush=True)
    print(f"load average at start: {fairseq_runs.load_average()}", flush=True)
    for name in ("tiny", "base"):
        print(f"{name}: {count_params(name) / 1e6:.2f} M parameters")
    configs = [args.config] if args.config else ["tiny", "base"]
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    for name in configs:
        device = args.device or ("cpu" if name == "tiny" else "cuda")
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                print(f"{name}: not measured (no GPU: torch.cuda.is_available() is False)")
                continue
            bench(name, device, args.updates, args.batch_size, args.seconds)
            continue
        with tempfile.TemporaryDirectory(prefix=f"bench_pretrain_{name}_") as tmp:
            task = load_recipe_config(CONF / f"{name}.yaml").task
            crop = args.seconds or task.max_sample_size / task.sample_rate
            data = fairseq_runs.write_pretraining_corpus(
                Path(tmp) / "data", n_files=48, seconds=crop + 0.5, sr=task.sample_rate,
                channels=task.audio_channels, n_clusters=CLUSTERS[name])
            rows, peers = [], []
            for t in threads:
                torch.set_num_threads(t)
                ups, audio_s, bsz, crop = bench(name, device, args.updates, args.batch_size, args.seconds, data=data)
                if args.logits_peer:
                    with expanded_nce():
                        p_ups = bench(name, device, args.updates, args.batch_size, args.seconds, data=data)[0]
                    peers.append((t, ups, p_ups, fairseq_runs.load_average()))
                f_ups = f_audio = None
                if not args.no_fairseq:
                    f_ups, f_audio = bench_fairseq(name, data, tmp, t, args.updates, batch_size=args.batch_size,
                                                   seconds=args.seconds)
                rows.append((t, ups, audio_s, f_ups, f_audio, fairseq_runs.load_average()))
            print(f"\n{name} on CPU, batch {bsz} x {crop:.2f} s: step in this process vs real fairseq-hydra-train")
            print("| threads | step updates/s | step audio-s/s | fairseq updates/s | fairseq audio-s/s "
                  "| fairseq / step | load average after |")
            print("|---|---|---|---|---|---|---|")
            for t, ups, audio_s, f_ups, f_audio, load in rows:
                if f_ups is None:
                    print(f"| {t} | {ups:.3f} | {audio_s:.1f} | - | - | - | {load} |")
                else:
                    print(f"| {t} | {ups:.3f} | {audio_s:.1f} | {f_ups:.3f} | {f_audio:.1f} | {f_ups / ups:.2f} | {load} |")
            if peers:
                print(f"\n{name}: masked-prediction logits, {CLUSTERS[name]} clusters: matrix product (shipped) vs "
                      f"fairseq's compute_nce on expanded negatives (same values)")
                print("| threads | matrix product updates/s | compute_nce updates/s | speed-up | load average after |")
                print("|---|---|---|---|---|")
                for t, ups, p_ups, load in peers:
                    print(f"| {t} | {ups:.3f} | {p_ups:.3f} | {ups / p_ups:.2f}x | {load} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
