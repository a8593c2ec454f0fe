"""Where fairseq's ``examples/hubert/simple_kmeans`` scripts live, and importing them.

fairseq-fixed installs the examples inside the package (``fairseq/examples/hubert/simple_kmeans``);
a source checkout of fairseq keeps them next to the package (``<repo>/examples/...``). Both are
looked up without importing fairseq itself. ``python -m pahubert_plugin.clustering.simple_kmeans``
prints the folder, which is how ``recipes/pahubert/run.sh`` finds ``learn_kmeans.py`` and
``dump_km_label.py``.
"""
import importlib.util
import os
import sys

_SCRIPTS = ("feature_utils.py", "learn_kmeans.py", "dump_km_label.py")


def simple_kmeans_dir() -> str:
    """Absolute path of fairseq's ``examples/hubert/simple_kmeans``; a clear error if missing."""
    spec = importlib.util.find_spec("fairseq")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("fairseq is not installed (pip install fairseq-fixed==0.12.3.1 on Python 3.11)")
    pkg = list(spec.submodule_search_locations)[0]
    candidates = [os.path.join(pkg, "examples", "hubert", "simple_kmeans"),
                  os.path.join(os.path.dirname(pkg), "examples", "hubert", "simple_kmeans")]
    for folder in candidates:
        if all(os.path.isfile(os.path.join(folder, s)) for s in _SCRIPTS):
            return os.path.realpath(folder)
    raise ImportError(f"fairseq's examples/hubert/simple_kmeans ({', '.join(_SCRIPTS)}) not found; "
                      f"looked in {', '.join(candidates)}")


def import_script(name: str):
    """Import one of the simple_kmeans scripts (e.g. ``feature_utils``) as a module."""
    folder = simple_kmeans_dir()
    if folder not in sys.path:
        sys.path.insert(0, folder)  # the scripts import each other by bare name
    return importlib.import_module(name)


if __name__ == "__main__":
    print(simple_kmeans_dir())
