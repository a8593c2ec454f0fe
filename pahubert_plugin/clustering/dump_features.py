"""Stage 1 (and 5): dump per-frame features of one manifest shard with fairseq's ``dump_feature``.

``python -m pahubert_plugin.clustering.dump_features TSV_DIR SPLIT NSHARD RANK FEAT_DIR --feature mfcc``
reads ``TSV_DIR/SPLIT.tsv``, takes shard ``RANK`` of ``NSHARD`` with fairseq's ``get_path_iterator``
and writes ``FEAT_DIR/SPLIT_RANK_NSHARD.{npy,len}`` with fairseq's ``dump_feature``, driven by one of
our readers (:mod:`pahubert_plugin.clustering.readers`). The shard is written into a temporary
folder and moved into place at the end, so a re-run rewrites it cleanly and a killed run never
leaves a half shard that k-means would read.
"""
import argparse
import logging
import os
import shutil
import sys
import tempfile

from pahubert_plugin.clustering.readers import FEATURES, build_reader
from pahubert_plugin.clustering.simple_kmeans import import_script
from pahubert_plugin.data.manifest import check_manifest_rate, manifest_rate
from pahubert_plugin.fileio import CommandError, prints_command_errors, write_error

logger = logging.getLogger("pahubert.dump_features")


def shard_paths(feat_dir: str, split: str, nshard: int, rank: int):
    """fairseq's names: ``{feat_dir}/{split}_{rank}_{nshard}.npy`` and ``.len``."""
    stem = os.path.join(feat_dir, f"{split}_{rank}_{nshard}")
    return stem + ".npy", stem + ".len"


def dump_shard(reader, tsv_dir: str, split: str, nshard: int, rank: int, feat_dir: str) -> None:
    feature_utils = import_script("feature_utils")
    tsv = os.path.join(tsv_dir, f"{split}.tsv")
    if not os.path.isfile(tsv):
        raise ValueError(f"manifest {tsv} not found; run stage 0 (pahubert_plugin.data.manifest) first")
    check_manifest_rate(tsv, reader.sample_rate)  # another rate would read a fraction of each file
    generator, num = feature_utils.get_path_iterator(tsv, nshard, rank)
    final = shard_paths(feat_dir, split, nshard, rank)
    os.makedirs(feat_dir, exist_ok=True)
    for path in final:  # a stale shard must not survive a failed re-run
        if os.path.exists(path):
            os.remove(path)
    tmp_dir = tempfile.mkdtemp(prefix=f".{split}_{rank}_{nshard}.", dir=feat_dir)
    try:
        feature_utils.dump_feature(reader, generator, num, split, nshard, rank, tmp_dir)
        for src, dst in zip(shard_paths(tmp_dir, split, nshard, rank), final):
            os.replace(src, dst)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("wrote %s and %s (%d files, %s)", *final, num, reader)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pahubert-dump-features",
        description="Dump features of shard RANK/NSHARD of TSV_DIR/SPLIT.tsv to FEAT_DIR/SPLIT_RANK_NSHARD.{npy,len} "
                    "with fairseq's simple_kmeans dump_feature and a pahubert reader.",
    )
    parser.add_argument("tsv_dir", help="folder holding SPLIT.tsv (stage-0 manifest)")
    parser.add_argument("split", help="manifest name without .tsv, e.g. train")
    parser.add_argument("nshard", type=int, help="number of shards the manifest is cut into")
    parser.add_argument("rank", type=int, help="which shard to dump, 0..NSHARD-1")
    parser.add_argument("feat_dir", help="output folder for the .npy/.len shard")
    parser.add_argument("--feature", choices=FEATURES, default="mfcc",
                        help="mfcc: Kaldi MFCC+D+DD (39); primitive: MFCC + Bregman cues (47); "
                             "hubert: a layer of a pretrained pahubert model")
    parser.add_argument("--sample-rate", type=int, default=None,
                        help="rate the manifest's num_samples are counted at; audio is resampled to it "
                             "(default: the rate the manifest records, else 44100; another rate is refused)")
    parser.add_argument("--ckpt", help="[hubert] checkpoint of the model to read features from")
    parser.add_argument("--layer", type=int, help="[hubert] transformer layer whose output is dumped")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="[hubert] device for the model")
    parser.add_argument("--max-chunk", type=float, default=None,
                        help="[hubert] longest chunk in seconds fed to the model at once")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (the recipe runs one process per shard)")
    return parser


@prints_command_errors
def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        stream=sys.stdout)
    import torch  # after parsing: --help and argument errors answer at once

    torch.set_num_threads(args.threads)
    if not 0 <= args.rank < args.nshard:
        raise CommandError(f"dump_features: error: rank {args.rank} is not in 0..{args.nshard - 1}")
    try:
        if args.sample_rate is None:
            args.sample_rate = manifest_rate(os.path.join(args.tsv_dir, f"{args.split}.tsv")) or 44100
        reader = build_reader(args.feature, args.sample_rate, ckpt=args.ckpt, layer=args.layer,
                              device=args.device, max_chunk=args.max_chunk)
    except (ValueError, OSError) as e:  # e.g. a checkpoint refused by the allow-list
        logging.getLogger("pahubert.dump_features").error(str(e))
        return 2
    try:
        dump_shard(reader, args.tsv_dir, args.split, args.nshard, args.rank, args.feat_dir)
    except ValueError as e:  # no manifest, or one written for another rate
        logger.error(str(e))
        return 2
    except OSError as e:  # a full disk or an unwritable feature folder (the shard's temporaries are gone)
        feat_dir = os.path.abspath(args.feat_dir)
        written = not e.filename or os.path.abspath(os.fspath(e.filename)).startswith(feat_dir + os.sep)
        shard = shard_paths(args.feat_dir, args.split, args.nshard, args.rank)[0]
        logger.error(write_error(shard, e, "write features") if written else
                     f"cannot read {os.fspath(e.filename)}: {e.strerror or e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
