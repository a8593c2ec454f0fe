"""Feature dumping speed: seconds of audio featurised per wall-clock second.

For each feature type (mfcc, primitive), 44.1 kHz stereo wav and mp3, and 1 or 2 shards run in
parallel processes, times the whole of stage 1 for a synthetic corpus: decode (soundfile),
downmix, features, and fairseq's dump_feature writing the .npy/.len shard. Prints x real time in
total and per process (= per core when each process has a core); each cell is the fastest of
--repeat runs, since other jobs may share the CPUs (the load average is printed).

    python benchmarks/bench_features.py [--files 8] [--seconds 30] [--sample-rate 44100]
"""
import argparse
import logging
import multiprocessing
import os
import sys
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm at import: keep the table readable

import numpy as np
import soundfile as sf
import torch

from pahubert_plugin.clustering.dump_features import dump_shard
from pahubert_plugin.clustering.readers import build_reader


def make_corpus(root, files, seconds, fmt, sr=44100):
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    with open(os.path.join(root, "train.tsv"), "w") as tsv:
        tsv.write(root + "\n")
        for i in range(files):
            x = 0.3 * np.sin(2 * np.pi * 110 * (i + 1) * t) + 0.1 * rng.standard_normal(n) * (np.sin(4 * np.pi * t) > 0)
            name = f"f{i}.{fmt}"
            sf.write(os.path.join(root, name), np.stack([x, 0.7 * x], 1).astype(np.float32), sr)
            frames = sf.info(os.path.join(root, name)).frames
            tsv.write(f"{name}\t{frames}\n")


def _init(feature, sr):
    """One thread per process; warm torch's kernels on a second of noise outside the timing."""
    torch.set_num_threads(1)
    build_reader(feature, sr).extract(torch.randn(1, sr))


def _worker(args):
    feature, sr, tsv_dir, nshard, rank, feat_dir = args
    reader = build_reader(feature, sr)
    start = time.perf_counter()
    dump_shard(reader, tsv_dir, "train", nshard, rank, feat_dir)
    return start, time.perf_counter()


def run(feature, sr, tsv_dir, nshard, feat_dir):
    tasks = [(feature, sr, tsv_dir, nshard, r, feat_dir) for r in range(nshard)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(nshard, initializer=_init, initargs=(feature, sr)) as pool:
        spans = pool.map(_worker, tasks, chunksize=1)
    return max(e for _, e in spans) - min(s for s, _ in spans)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=8, help="files per corpus")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each file")
    parser.add_argument("--sample-rate", type=int, default=44100, help="feature rate (files are 44.1 kHz)")
    parser.add_argument("--features", default="mfcc,primitive")
    parser.add_argument("--shards", default="1,2")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per cell; the fastest is reported (the machine is shared)")
    args = parser.parse_args(argv)
    logging.disable(logging.INFO)
    total = args.files * args.seconds
    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.files} x {args.seconds:g} s "
          f"44.1 kHz stereo per format, features at {args.sample_rate} Hz")
    print(f"{'feature':10s}{'format':>7s}{'shards':>7s}{'wall s':>9s}{'x RT':>9s}{'x RT/proc':>11s}")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("wav", "mp3"):
            corpus = os.path.join(tmp, fmt)
            make_corpus(corpus, args.files, args.seconds, fmt)
            for feature in args.features.split(","):
                for nshard in map(int, args.shards.split(",")):
                    feat_dir = os.path.join(tmp, f"feat_{fmt}_{feature}")
                    wall = min(run(feature, args.sample_rate, corpus, nshard, feat_dir) for _ in range(args.repeat))
                    rt = total / wall
                    print(f"{feature:10s}{fmt:>7s}{nshard:>7d}{wall:9.2f}{rt:9.1f}{rt / nshard:11.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
