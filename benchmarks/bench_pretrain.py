"""Pac-HuBERT pretraining speed: updates/s and audio-seconds/s, and parameter counts.

Builds the ``pahubert`` model of a recipe config (recipes/pahubert/conf/pretrain/*.yaml) with
the ``pahubert`` criterion and times full training steps (forward, HuBERT loss, backward, Adam
step with gradient clipping) on a synthetic batch shaped like the config's crops.  On CUDA the
step runs under fp16 autocast with a GradScaler (fairseq's ``common.amp``) and peak GPU memory
is printed.

    python benchmarks/bench_pretrain.py                       # tiny on CPU (+ base on GPU if any)
    python benchmarks/bench_pretrain.py --config base --device cuda --updates 20
"""
import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pahubert_plugin  # noqa: E402,F401
from pahubert_plugin.criterions.pahubert import PahubertCriterion  # noqa: E402
from pahubert_plugin.models.pahubert import PahubertConfig, PahubertModel, _tie_to_task  # noqa: E402

CONF = REPO / "recipes" / "pahubert" / "conf" / "pretrain"
CLUSTERS = {"tiny": 100, "base": 500}  # k-means sizes of the recipe (iteration 1 / 2)


def load_config(name):
    """(model cfg, task cfg, criterion cfg, dataset cfg) of recipes/pahubert/conf/pretrain/NAME.yaml."""
    yaml = OmegaConf.load(CONF / f"{name}.yaml")
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


def bench(name, device, updates, batch_size=None, seconds=None, warmup=2):
    cfg, task, _, dataset = load_config(name)
    bsz, length = default_batch(name, task, dataset)
    bsz = batch_size or bsz
    length = int(seconds * task.sample_rate) if seconds else length
    model, criterion, task = build(name, device)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    cuda = device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    gen = torch.Generator().manual_seed(0)
    source = (0.1 * torch.randn(bsz, task.channels, length, generator=gen)).to(device)
    frames = length // (task.sample_rate // 100)
    sample = {
        "id": torch.arange(bsz),
        "net_input": {"source": source, "padding_mask": torch.zeros(bsz, length, dtype=torch.bool, device=device)},
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

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(updates):
        log = step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    ups = updates / elapsed
    audio_s = ups * bsz * length / task.sample_rate
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}: batch {bsz} x {length / task.sample_rate:.2f} s, {task.sample_rate} Hz x {task.channels} ch "
          f"on {where}{' (fp16 autocast)' if cuda else ''}: {ups:.3f} updates/s, {audio_s:.1f} audio-s/s "
          f"({elapsed / updates:.3f} s/update over {updates} updates; masked acc {log['correct_m_0'] / max(log['count_m_0'], 1):.2f})")
    if cuda:
        print(f"{name}: peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB")
    return ups, audio_s


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("tiny", "base"), default=None,
                        help="measure only this config (default: tiny on CPU, and base if a GPU is present)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cpu for tiny, cuda for base)")
    parser.add_argument("--updates", type=int, default=10, help="timed updates (after 2 warm-up updates)")
    parser.add_argument("--batch-size", type=int, default=None, help="override the config's batch size")
    parser.add_argument("--seconds", type=float, default=None, help="override the config's crop length")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    for name in ("tiny", "base"):
        print(f"{name}: {count_params(name) / 1e6:.2f} M parameters")
    configs = [args.config] if args.config else ["tiny", "base"]
    for name in configs:
        device = args.device or ("cpu" if name == "tiny" else "cuda")
        if device.startswith("cuda") and not torch.cuda.is_available():
            print(f"{name}: not measured (no GPU: torch.cuda.is_available() is False)")
            continue
        bench(name, device, args.updates, args.batch_size, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
