"""Datasets from anywhere: a Hub id, a ``save_to_disk`` folder, or CSV / TSV / JSON / JSON Lines / Parquet files.

:func:`read_dataset` reads every split as stored; :func:`select_splits` picks the training split and
carves seeded validation / test splits from it where the data has none, recording where each came from.
Both applications read their data through these (each resolves its own ``offline:`` names first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from .errors import InputError

EVAL_SPLITS = ("validation", "test")
# File suffix -> the datasets builder that reads it.
FILE_BUILDERS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",  # one example per line, in a "text" column
}


# ---- reading --------------------------------------------------------------------------------------


def _builder(path: str) -> str | None:
    return FILE_BUILDERS.get(Path(path).suffix.lower())


def _read_file(path: str) -> Dataset:
    builder = _builder(path)
    if builder is None:
        raise InputError(
            f"Cannot tell the format of {path!r}: expected a file ending in {sorted(FILE_BUILDERS)}, a folder "
            "written by save_to_disk, or a Hub dataset id."
        )
    if not any(ch in path for ch in "*?[") and not Path(path).expanduser().is_file():
        raise InputError(f"No such data file: {path!r}.")
    kwargs = {"delimiter": "\t"} if path.lower().endswith(".tsv") else {}
    return load_dataset(builder, data_files=str(Path(path).expanduser()), split="train", **kwargs)


def read_dataset(
    path: str,
    config: str | None = None,
    *,
    validation_file: str | None = None,
    test_file: str | None = None,
) -> DatasetDict:
    """Every split of ``path`` as it is stored (see the module docstring for what ``path`` may be)."""
    local = Path(path).expanduser()
    if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
        loaded = load_from_disk(str(local))
        splits = loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    elif _builder(path) is not None:
        splits = DatasetDict({"train": _read_file(path)})
    else:
        splits = load_dataset(path, config)
    for split, file in (("validation", validation_file), ("test", test_file)):
        if file is not None:
            splits[split] = _read_file(file)
    return splits


# ---- splits ---------------------------------------------------------------------------------------


def _size(value: float, rows: int) -> int:
    return int(value) if value >= 1 else round(value * rows)


def select_splits(
    raw: DatasetDict,
    *,
    train_split: str = "train",
    validation_split: str = "auto",
    test_split: str = "auto",
    validation_size: float = 0.1,
    test_size: float = 0.1,
    seed: int = 42,
    dataset_name: str = "the dataset",
) -> tuple[DatasetDict, dict[str, dict[str, Any]]]:
    """``(splits, record)``: ``train`` and the ``validation`` / ``test`` splits asked for.

    A split named explicitly must exist; ``auto`` takes the split of the standard name, or carves
    ``*_size`` rows from the training split with ``seed`` (test first, then validation); ``none`` skips it.
    ``record`` says where each split came from (``results.json`` keeps it).
    """
    available = list(raw)

    def named(role: str, split: str) -> Dataset:
        if split not in raw:
            raise InputError(
                f"{role}={split!r} is not a split of {dataset_name}: its splits are {available}. Name one of "
                f"them{'' if role == 'train_split' else ', or auto (carved from the training split), or none'}."
            )
        return raw[split]

    train = named("train_split", train_split)
    record: dict[str, dict[str, Any]] = {"train": {"source": train_split}}
    out: dict[str, Dataset] = {}
    for role, choice, size in (
        ("test", test_split, test_size),
        ("validation", validation_split, validation_size),
    ):
        if choice == "none":
            continue
        if choice != "auto":
            out[role] = named(f"{role}_split", choice)
            record[role] = {"source": choice}
        elif role in raw and role != train_split:
            out[role] = raw[role]
            record[role] = {"source": role}
        elif _size(size, len(train)) > 0:
            rows = _size(size, len(train))
            if rows >= len(train):
                raise InputError(
                    f"Carving a {role} split of {rows} rows from the {len(train)} training rows leaves no training "
                    f"data: lower {role}_size, or give a {role} split."
                )
            parts = train.train_test_split(test_size=rows, seed=seed, shuffle=True)
            train, out[role] = parts["train"], parts["test"]
            record[role] = {"source": f"carved from {train_split}", "seed": seed, "size": size}
    splits = DatasetDict({"train": train, **{r: out[r] for r in EVAL_SPLITS if r in out}})
    for split, dataset in splits.items():
        record[split]["rows"] = len(dataset)
    return splits, {s: record[s] for s in splits}


def check_columns(splits: DatasetDict, columns: list[str]) -> None:
    """Every split has ``columns``; else a ``ValueError`` naming the columns present."""
    for split, dataset in splits.items():
        missing = [c for c in columns if c not in dataset.column_names]
        if missing:
            raise InputError(
                f"The {split} split has no column {missing[0]!r}; its columns are {dataset.column_names}. Set "
                "the script's column settings (e.g. text_columns, label_column, text_column) to your column names."
            )
