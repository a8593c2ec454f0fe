"""Safe loading of k-means models (stage 2's joblib files) and label dumping with them.

fairseq's ``learn_kmeans.py`` saves a scikit-learn ``MiniBatchKMeans`` with ``joblib.dump``, and
its ``dump_km_label.ApplyKmeans`` loads it with ``joblib.load``, i.e. pickle: a crafted ``.km``
file runs any code when opened. Shared k-means models are common in the HuBERT world, so every
k-means load of the project goes through :func:`load_kmeans`: joblib's own unpickler with an
allow-list of exactly the classes a fitted (MiniBatch)KMeans and its numpy arrays need (the same
idea as the checkpoint allow-list of :mod:`pahubert_plugin.checkpoint`). Anything else in the
file, including numpy object arrays (joblib reads those with plain pickle), is refused with
:class:`KmeansRefused` naming the file, before it is built.

``python -m pahubert_plugin.clustering.kmeans FEAT_DIR SPLIT KM_PATH NSHARD RANK LAB_DIR`` is a
drop-in for fairseq's ``dump_km_label.py`` (same arguments, same output, fairseq's own
``dump_label``) that loads the model safely; recipe stages 3 and 5 call it. It checks the feature
shard against the model first (the feature dimension against the centroids', naming both files) and
writes the label shard through a temporary file, so a failure never leaves an empty or partial shard.

``python -m pahubert_plugin.clustering.kmeans learn FEAT_DIR SPLIT NSHARD KM_PATH N_CLUSTERS [options]``
is fairseq's ``learn_kmeans.py`` (same arguments and options, its own fit), except that the model file
is written atomically (:func:`atomic_dump`): a kill during stage 2 leaves the previous file or none,
never a truncated one. The file is still a ``joblib.dump`` (a pickle, as fairseq's tools expect);
this package only ever opens it through the allow-list of :func:`load_kmeans`.
"""
import errno
import logging
import os
import pickle
import sys
import tempfile

import numpy as np

from ..fileio import atomic_write, disk_full, full_disk_exits

logger = logging.getLogger("pahubert.kmeans")

#: (module, name) pairs a joblib-saved KMeans / MiniBatchKMeans may reference. Nothing here runs
#: code beyond building an estimator's attributes, an ndarray or a numpy scalar/dtype.
ALLOWED = frozenset({
    ("sklearn.cluster._kmeans", "MiniBatchKMeans"),
    ("sklearn.cluster._kmeans", "KMeans"),
    ("joblib.numpy_pickle", "NumpyArrayWrapper"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    *(("numpy", t) for t in ("float64", "float32", "int64", "int32", "bool_")),
    *(("numpy.dtypes", f"{t}DType") for t in ("Float64", "Float32", "Int64", "Int32", "Bool")),
})


class KmeansRefused(ValueError, pickle.UnpicklingError):
    """A k-means model file that references something outside :data:`ALLOWED`."""


def _refuse(path, what):
    raise KmeansRefused(
        f"{path}: refused to load this k-means model: it references {what}, which is not part of a "
        f"scikit-learn (MiniBatch)KMeans (allow-list in pahubert_plugin.clustering.kmeans). The file may "
        f"run code when unpickled: do not open it with joblib or pickle; re-create it with stage 2 "
        f"(fairseq's learn_kmeans.py) from your own features")


def _unpickler_class():
    from joblib.numpy_pickle import NDArrayWrapper, NumpyArrayWrapper, NumpyUnpickler

    class SafeUnpickler(NumpyUnpickler):
        dispatch = NumpyUnpickler.dispatch.copy()

        def find_class(self, module, name):
            if (module, name) not in ALLOWED:
                _refuse(self.filename, f"{module}.{name}")
            return super().find_class(module, name)

        def load_build(self):
            pickle._Unpickler.load_build(self)
            top = self.stack[-1]
            if isinstance(top, NDArrayWrapper):  # joblib < 0.10 companion files: np.load with pickle
                _refuse(self.filename, "an array of joblib < 0.10 in a companion file")
            if isinstance(top, NumpyArrayWrapper):
                if top.dtype.hasobject:  # joblib reads object arrays with plain pickle.load
                    _refuse(self.filename, f"a numpy array of dtype {top.dtype} (Python objects)")
                self.stack[-1] = top.read(self, self.ensure_native_byte_order)

        dispatch[pickle.BUILD[0]] = load_build

    return SafeUnpickler


def load_kmeans(path):
    """The fitted k-means estimator in ``path`` (a ``joblib.dump``), loaded through the allow-list.

    Raises :class:`KmeansRefused` (a ValueError) naming the file for anything but a (MiniBatch)KMeans
    of numeric arrays, FileNotFoundError if it is missing, ValueError if it is not a k-means file.
    """
    from joblib.numpy_pickle_utils import _validate_fileobject_and_memmap

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"k-means model not found: {path}")
    with open(path, "rb") as f:
        with _validate_fileobject_and_memmap(f, path, None) as (fobj, _):
            if isinstance(fobj, str):  # joblib < 0.10 format
                _refuse(path, "the joblib < 0.10 format")
            try:
                model = _unpickler_class()(path, fobj, ensure_native_byte_order=True).load()
            except KmeansRefused:
                raise
            except Exception as e:  # noqa: BLE001  (a cut-off or damaged file fails in many ways; all name it)
                raise ValueError(
                    f"{path}: not a readable k-means model ({os.path.getsize(path)} bytes; {type(e).__name__}: "
                    f"{str(e)[:200]}); is it truncated? Re-create it with stage 2") from None
    centres = getattr(model, "cluster_centers_", None)
    if not isinstance(centres, np.ndarray) or centres.ndim != 2 or not np.issubdtype(centres.dtype, np.floating):
        raise ValueError(f"{path}: not a fitted k-means model (no 2-D float cluster_centers_)")
    return model


def atomic_dump(model, path) -> None:
    """``joblib.dump(model, path)`` through :func:`pahubert_plugin.fileio.atomic_write` (a temporary file in
    the same folder, fsynced and renamed over ``path``): readers see the old file or the complete new one."""
    import joblib

    def write(tmp):
        with open(tmp, "wb") as f:
            joblib.dump(model, f)

    atomic_write(path, write)


class _AtomicJoblib:
    """What fairseq's ``learn_kmeans`` sees as ``joblib``: the real module with :func:`atomic_dump`."""

    def __init__(self, joblib):
        self._joblib = joblib

    def __getattr__(self, name):
        return getattr(self._joblib, name)

    @staticmethod
    def dump(value, filename, *args, **kwargs):
        atomic_dump(value, filename)


def learn_kmeans(feat_dir, split, nshard, km_path, n_clusters, **options):
    """fairseq's ``learn_kmeans.learn_kmeans`` (its defaults for the ``options`` left out), the model
    written with :func:`atomic_dump`."""
    from .simple_kmeans import import_script

    module = import_script("learn_kmeans")
    args = learn_parser().parse_args([str(feat_dir), split, str(nshard), str(km_path), str(n_clusters)])
    args = {**vars(args), **options}
    original, module.joblib = module.joblib, _AtomicJoblib(module.joblib)
    try:
        module.learn_kmeans(**args)
    finally:
        module.joblib = original


def learn_parser():
    """fairseq's ``learn_kmeans.py`` arguments (same names and defaults)."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m pahubert_plugin.clustering.kmeans learn",
        description="fairseq's learn_kmeans.py (same arguments and output), the model file written atomically.")
    p.add_argument("feat_dir", type=str)
    p.add_argument("split", type=str)
    p.add_argument("nshard", type=int)
    p.add_argument("km_path", type=str)
    p.add_argument("n_clusters", type=int)
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--percent", default=-1, type=float, help="sample a subset; -1 for all")
    p.add_argument("--init", default="k-means++")
    p.add_argument("--max_iter", default=100, type=int)
    p.add_argument("--batch_size", default=10000, type=int)
    p.add_argument("--tol", default=0.0, type=float)
    p.add_argument("--max_no_improvement", default=100, type=int)
    p.add_argument("--n_init", default=20, type=int)
    p.add_argument("--reassignment_ratio", default=0.0, type=float)
    return p


def apply_kmeans_class():
    """fairseq's ``dump_km_label.ApplyKmeans``, with the model loaded by :func:`load_kmeans`."""
    from .simple_kmeans import import_script

    base = import_script("dump_km_label").ApplyKmeans

    class SafeApplyKmeans(base):
        def __init__(self, km_path):  # base.__init__ with load_kmeans instead of joblib.load
            import torch

            self.km_model = load_kmeans(km_path)
            self.C_np = self.km_model.cluster_centers_.transpose()
            self.Cnorm_np = (self.C_np ** 2).sum(0, keepdims=True)
            self.C = torch.from_numpy(self.C_np)
            self.Cnorm = torch.from_numpy(self.Cnorm_np)
            if torch.cuda.is_available():
                self.C = self.C.cuda()
                self.Cnorm = self.Cnorm.cuda()

    return SafeApplyKmeans


def apply_kmeans(km_path):
    """A fairseq ``ApplyKmeans`` for ``km_path``, loaded safely: ``labels = it(features)``."""
    return apply_kmeans_class()(km_path)


def check_feature_shard(feat_dir, split, nshard, rank, km_path, model=None) -> None:
    """ValueError naming the files unless ``{feat_dir}/{split}_{rank}_{nshard}.npy``/``.len`` form one
    feature shard (2-D, as many rows as its lengths add up to) of the k-means model's dimension."""
    model = model if model is not None else load_kmeans(km_path)
    feat_path, leng_path = (os.path.join(os.fspath(feat_dir), f"{split}_{rank}_{nshard}{ext}") for ext in (".npy", ".len"))
    for path in (feat_path, leng_path):
        if not os.path.isfile(path):
            raise ValueError(f"feature shard {path} not found; run the feature stage (pahubert-dump-features) "
                             f"for shard {rank} of {nshard} first")
    try:
        feats = np.load(feat_path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{feat_path}: not a readable feature shard ({type(e).__name__}: {e})") from None
    try:
        with open(leng_path) as f:
            lengths = [int(line) for line in f if line.strip()]
    except ValueError as e:
        raise ValueError(f"{leng_path}: not a list of frame counts ({e})") from None
    dim = model.cluster_centers_.shape[1]
    if feats.ndim != 2:
        raise ValueError(f"{feat_path}: expected (frames, dim) features, found shape {feats.shape}")
    if feats.shape[1] != dim:
        raise ValueError(f"{feat_path} holds features of dimension {feats.shape[1]}, but the k-means model "
                         f"{km_path} has centroids of dimension {dim}: the model was fit on another feature "
                         f"(or layer, or model); use the k-means model of this feature or re-run stage 2")
    if sum(lengths) != feats.shape[0] or not lengths:
        raise ValueError(f"{leng_path} adds up to {sum(lengths)} frames in {len(lengths)} files, but {feat_path} "
                         f"has {feats.shape[0]} rows; re-run the feature stage for this shard")


def dump_label(feat_dir, split, km_path, nshard, rank, lab_dir):
    """fairseq's ``dump_km_label.dump_label`` with the k-means model loaded safely, the shard checked
    against it first (:func:`check_feature_shard`) and the labels written to a temporary file renamed
    into place: a failure leaves no label shard (a stale one is removed first), never an empty one."""
    from .simple_kmeans import import_script

    module = import_script("dump_km_label")
    safe = apply_kmeans_class()
    final = os.path.join(os.fspath(lab_dir), f"{split}_{rank}_{nshard}.km")
    if os.path.exists(final):  # a stale shard must not survive a failed re-run
        os.remove(final)
    model = load_kmeans(km_path)  # refuse before any output is written
    check_feature_shard(feat_dir, split, nshard, rank, km_path, model)
    os.makedirs(lab_dir, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{split}_{rank}_{nshard}.", dir=lab_dir)
    original, module.ApplyKmeans = module.ApplyKmeans, safe
    try:
        module.dump_label(feat_dir, split, km_path, nshard, rank, tmp_dir)
        os.replace(os.path.join(tmp_dir, os.path.basename(final)), final)
    except OSError as e:
        if disk_full(e, lab_dir):  # name the label shard, not the temporary folder (or nothing)
            raise OSError(errno.ENOSPC, "No space left on device", final) from e
        raise
    finally:
        module.ApplyKmeans = original
        import shutil

        shutil.rmtree(tmp_dir, ignore_errors=True)


@full_disk_exits("python -m pahubert_plugin.clustering.kmeans")
def main(argv=None) -> int:
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["learn"]:
        args = learn_parser().parse_args(argv[1:])
        logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
        learn_kmeans(**vars(args))
        logger.info("wrote %s", args.km_path)
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m pahubert_plugin.clustering.kmeans",
        description="fairseq's dump_km_label.py (same arguments and output) with the k-means model loaded "
                    "through an allow-list instead of plain joblib/pickle.")
    parser.add_argument("feat_dir")
    parser.add_argument("split")
    parser.add_argument("km_path")
    parser.add_argument("nshard", type=int)
    parser.add_argument("rank", type=int)
    parser.add_argument("lab_dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    try:
        dump_label(**vars(args))
    except (ValueError, FileNotFoundError) as e:
        logger.error(str(e))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
