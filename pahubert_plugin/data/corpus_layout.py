"""The folder layout both corpus generators write (:mod:`pahubert_plugin.corpora.toy`, :mod:`pahubert_plugin.corpora.midi`), in one place.

``OUT/musdb/{train,test}/<song>/{mixture,drums,bass,other,vocals}.wav`` (MUSDB18-HQ layout),
``OUT/unlabelled/<song>.wav`` (mixtures only) and ``OUT/corpus.json`` (the parameters and, per
song, what was made). A folder holding a complete corpus of the same parameters is reused; one
holding another corpus is refused unless ``overwrite``.
"""
import json
import logging
import os
import shutil
from typing import Callable, Dict, List, Optional, Sequence

logger = logging.getLogger(__name__)

SOURCES = ("drums", "bass", "other", "vocals")  # MUSDB stem order after the mixture
SPLITS = {"train": 0, "test": 1, "unlabelled": 2}  # mixed into each song's seed


def song_names(train: int, test: int, unlabelled: int) -> Dict[str, List[str]]:
    return {"train": [f"train_{i:03d}" for i in range(train)],
            "test": [f"test_{i:03d}" for i in range(test)],
            "unlabelled": [f"unlabelled_{i:04d}" for i in range(unlabelled)]}


def song_paths(out: str, split: str, name: str) -> List[str]:
    """The audio files of one song: its mixture, then (labelled splits) one file per source."""
    if split == "unlabelled":
        return [os.path.join(out, "unlabelled", name + ".wav")]
    folder = os.path.join(out, "musdb", split, name)
    return [os.path.join(folder, f"{s}.wav") for s in ("mixture",) + SOURCES]


def reuse_or_clear(out: str, params: dict, is_complete: Callable[[], bool], folders: Sequence[str],
                   overwrite: bool) -> Optional[dict]:
    """``OUT/corpus.json`` if ``out`` already holds this complete corpus (``params`` equal and
    ``is_complete()``), else None, after making sure ``folders`` hold no other corpus: a ValueError
    naming both parameter sets, or (``overwrite``) the folders removed. A partial corpus of the same
    parameters is kept, so finished songs are reused."""
    meta_path = os.path.join(out, "corpus.json")
    existing = None
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            existing = json.load(f)
    if existing is not None and existing.get("params") == params:
        if existing.get("status") == "complete" and is_complete():
            logger.info("%s already holds this corpus; reusing it", out)
            return existing
    elif any(os.path.isdir(os.path.join(out, d)) and os.listdir(os.path.join(out, d)) for d in folders):
        found = existing.get("params") if existing else "no corpus.json"
        if not overwrite:
            raise ValueError(f"{out} already holds a corpus made with other parameters ({found}); "
                             f"expected {params}. Choose another folder or pass --overwrite.")
        for d in folders:
            shutil.rmtree(os.path.join(out, d), ignore_errors=True)
    return None
