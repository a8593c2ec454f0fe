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
``dump_label``) that loads the model safely; recipe stages 3 and 5 call it.
"""
import logging
import os
import pickle
import sys

import numpy as np

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
            except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as e:
                raise ValueError(f"{path}: not a readable k-means model ({type(e).__name__}: {e})") from None
    centres = getattr(model, "cluster_centers_", None)
    if not isinstance(centres, np.ndarray) or centres.ndim != 2 or not np.issubdtype(centres.dtype, np.floating):
        raise ValueError(f"{path}: not a fitted k-means model (no 2-D float cluster_centers_)")
    return model


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


def dump_label(feat_dir, split, km_path, nshard, rank, lab_dir):
    """fairseq's ``dump_km_label.dump_label`` with the k-means model loaded safely."""
    from .simple_kmeans import import_script

    module = import_script("dump_km_label")
    safe = apply_kmeans_class()
    load_kmeans(km_path)  # refuse before any output is written
    original, module.ApplyKmeans = module.ApplyKmeans, safe
    try:
        module.dump_label(feat_dir, split, km_path, nshard, rank, lab_dir)
    finally:
        module.ApplyKmeans = original


def main(argv=None) -> int:
    import argparse

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
