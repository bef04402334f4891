"""Text-classification data from anywhere, checked before anything is trained or written.

:func:`load_splits` reads the recipe's data keys (``dataset_name``, ``dataset_config_name``,
``text_columns``, ``label_column``, ``*_split``) and returns the train / validation / test splits, each
with its text column(s) and an encoded ``label`` column, and the :class:`TextTask` they define:

- ``dataset_name``: a Hub id (``datasets.load_dataset``), a folder written by ``save_to_disk``, a CSV /
  JSON / JSON Lines / Parquet file or glob (the training split; ``validation_file`` / ``test_file`` for
  the others), or ``offline:rotten_tomatoes`` (:mod:`.offline`). The GLUE tasks and the offline set are
  recipes that set these keys, not code paths of their own.
- A split that is ``auto`` and missing is carved from the training split (seeded); what came from where
  is recorded (``split_record``) and lands in ``results.json``.
- Labels: a ``ClassLabel``'s names, else the sorted distinct values of the training split (strings or
  ints); float labels mean regression (one output, the score).

The checks, each a ``ValueError`` saying what is wrong and how to fix it: an unknown split, a missing
column, empty or null texts, null labels, fewer than two classes, a label in validation/test never seen
in training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from datasets import ClassLabel, Dataset, DatasetDict, Value
from transformers import PreTrainedTokenizerBase

from ..data import check_columns, select_splits
from ..data import read_dataset as _read_dataset
from ..errors import InputError
from . import offline
from .metrics import main_metric

UNLABELLED = -100  # the label of an example that only the teacher labels (KD term only)
LABEL = "label"  # the encoded label column every split comes out with
_SHOWN = 5  # offending rows named in an error


@dataclass(frozen=True)
class TextTask:
    """What the data defines: its text columns, its labels (None: regression) and how it is scored.

    ``name`` names caches and default repo ids; ``dataset`` is what the card cites; ``metric`` is
    ``"auto"`` (accuracy and macro-F1, or Pearson and Spearman) or ``"glue"`` (GLUE's metric for
    ``dataset_config``).
    """

    name: str
    dataset: str
    dataset_config: str | None
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None
    metric: str = "auto"

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def main_metric(self) -> str:
        """The metric reported first (the results table's column)."""
        return main_metric(self.metric, self.dataset_config, self.is_regression)

    def labels_config(self) -> dict[str, Any]:
        """The config keys of a classifier for these labels: ``num_labels``, ``id2label``, ``label2id``."""
        if self.is_regression:
            return {"num_labels": 1, "problem_type": "regression"}
        return {  # num_labels follows from id2label
            "id2label": dict(enumerate(self.label_names)),
            "label2id": {n: i for i, n in enumerate(self.label_names)},
            "problem_type": "single_label_classification",
        }


# ---- reading ----------------------------------------------------------------------------------------


def read_dataset(
    name: str,
    config: str | None = None,
    *,
    validation_file: str | None = None,
    test_file: str | None = None,
    cache_dir: str | None = None,
    seed: int = 42,
) -> DatasetDict:
    """Every split of ``name`` as it is stored: :func:`hf_distill.data.read_dataset` after resolving ``offline:``."""
    path = offline.resolve_dataset_path(name, cache_dir, seed=seed)
    return _read_dataset(path, config, validation_file=validation_file, test_file=test_file)


# ---- checks and labels ----------------------------------------------------------------------------


def _rows(mask: pa.ChunkedArray | pa.Array) -> list[int]:
    return pc.indices_nonzero(pc.fill_null(mask, True)).to_pylist()


def empty_text_rows(dataset: Dataset, column: str) -> list[int]:
    """Rows of ``dataset`` whose ``column`` is null or only white space."""
    values = dataset.data.column(column)
    if not pa.types.is_string(values.type) and not pa.types.is_large_string(values.type):
        raise InputError(
            f"Text column {column!r} holds {values.type}, not strings: text_columns must name text columns."
        )
    return _rows(pc.equal(pc.utf8_trim_whitespace(values), ""))


def check_texts(splits: DatasetDict, text_columns: list[str], drop: bool = False) -> DatasetDict:
    """Refuse (or with ``drop``, drop) rows whose text is empty or null."""
    out = {}
    for split, dataset in splits.items():
        bad = sorted({i for c in text_columns for i in empty_text_rows(dataset, c)})
        if bad and not drop:
            raise InputError(
                f"The {split} split has {len(bad)} rows with an empty or null text in {text_columns} (rows "
                f"{bad[:_SHOWN]}{' ...' if len(bad) > _SHOWN else ''}). Remove them from the data, or set "
                "drop_empty_texts: true to drop them."
            )
        if bad:
            keep = sorted(set(range(len(dataset))) - set(bad))
            dataset = dataset.select(keep)
        out[split] = dataset
    return DatasetDict(out)


def _label_values(dataset: Dataset, column: str) -> list:
    values = dataset.data.column(column)
    if values.null_count:
        rows = _rows(pc.is_null(values))
        raise InputError(
            f"Label column {column!r} has {values.null_count} null values (rows {rows[:_SHOWN]}): every training "
            "and evaluation example needs a label."
        )
    return pc.unique(values).to_pylist()


def label_names(splits: DatasetDict, column: str) -> tuple[str, ...] | None:
    """The classes of ``column`` (None for float labels: regression), checked across splits.

    A ``ClassLabel`` gives its names; strings or ints give their sorted distinct values in the training
    split. Refuses fewer than two classes in training, and any validation/test label not seen there.
    """
    feature = splits["train"].features[column]
    if isinstance(feature, Value) and feature.dtype.startswith("float"):
        for dataset in splits.values():
            _label_values(dataset, column)
        return None
    if isinstance(feature, Value) and not (
        feature.dtype.startswith(("int", "uint")) or feature.dtype in ("string", "large_string", "bool")
    ):
        raise InputError(
            f"Label column {column!r} holds {feature.dtype}: labels are class names, class ids or float scores."
        )
    seen = _label_values(splits["train"], column)
    if len(seen) < 2:
        raise InputError(
            f"The training split has {len(seen)} class{'es' if len(seen) != 1 else ''} in {column!r} ({seen}): "
            "classification needs at least two. Check label_column, or use more of the data."
        )
    for split, dataset in splits.items():
        unseen = sorted(set(_label_values(dataset, column)) - set(seen), key=str)
        if unseen:
            hint = (
                " (-1 marks a hidden label, as in GLUE's test split: set test_split: none)"
                if -1 in unseen
                else ""
            )
            raise InputError(
                f"The {split} split has labels {unseen} that the training split never has{hint}: a student "
                f"cannot learn them. Training labels: {sorted(seen, key=str)}."
            )
    if isinstance(feature, ClassLabel):
        return tuple(feature.names)
    return tuple(str(v) for v in sorted(seen))


def encode_labels(dataset: Dataset, column: str, names: tuple[str, ...] | None) -> Dataset:
    """``dataset`` with the labels of ``column`` as ``label``: class ids of ``names`` (a ``ClassLabel``), or
    float32 scores for regression."""
    if column != LABEL:
        if LABEL in dataset.column_names:
            dataset = dataset.remove_columns(LABEL)
        dataset = dataset.rename_column(column, LABEL)
    if names is None:
        return dataset.cast_column(LABEL, Value("float32"))
    feature = dataset.features[LABEL]
    if isinstance(feature, ClassLabel) and tuple(feature.names) == names:
        return dataset
    ids = {name: i for i, name in enumerate(names)}
    if isinstance(feature, ClassLabel):
        to_name = feature.int2str
    else:
        to_name = str
    features = dataset.features.copy()
    features[LABEL] = ClassLabel(names=list(names))
    return dataset.map(
        lambda batch: {LABEL: [ids[to_name(v)] for v in batch[LABEL]]},
        batched=True,
        features=features,
        desc="Encoding labels",
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "data"


def load_splits(script) -> tuple[TextTask, DatasetDict, dict[str, dict[str, Any]]]:
    """``(task, splits, record)`` for a ``DistillTextArguments``: read, split, checked and label-encoded.

    ``splits`` has ``train`` and whichever of ``validation`` / ``test`` there are, each with the text
    columns and ``label``; ``record`` says where each split came from.
    """
    raw = read_dataset(
        script.dataset_name,
        script.dataset_config_name,
        validation_file=script.validation_file,
        test_file=script.test_file,
        cache_dir=script.cache_dir,
        seed=script.dataset_seed,
    )
    splits, record = select_splits(
        raw,
        train_split=script.train_split,
        validation_split=script.validation_split,
        test_split=script.test_split,
        validation_size=script.validation_size,
        test_size=script.test_size,
        seed=script.dataset_seed,
        dataset_name=script.dataset_name,
    )
    columns = list(script.text_columns)
    check_columns(splits, [*columns, script.label_column])
    splits = DatasetDict({s: d.select_columns([*columns, script.label_column]) for s, d in splits.items()})
    splits = check_texts(splits, columns, drop=script.drop_empty_texts)
    names = label_names(splits, script.label_column)
    splits = DatasetDict({s: encode_labels(d, script.label_column, names) for s, d in splits.items()})
    for split, dataset in splits.items():
        record[split]["rows"] = len(dataset)
    dataset = offline.describe_dataset(script.dataset_name)
    task = TextTask(
        name=_slug(script.dataset_config_name or Path(script.dataset_name.removeprefix("offline:")).stem),
        dataset=dataset,
        dataset_config=script.dataset_config_name,
        text_columns=tuple(columns),
        label_names=names,
        metric=script.metric,
    )
    return task, splits, record


# ---- training texts -------------------------------------------------------------------------------


def split_labelled(train: Dataset, num_labelled: int | None) -> tuple[Dataset, Dataset]:
    """``(labelled, transfer_set)``: the first ``num_labelled`` rows keep their labels; the transfer set is
    every row of ``train``, with the labels of the rows beyond ``num_labelled`` replaced by -100.

    ``num_labelled=None`` keeps every label (both are ``train``). Rows are taken in order: shuffle
    ``train`` first if it is sorted. Classification only (a regression loss cannot skip a label).
    """
    if num_labelled is None or num_labelled >= len(train):
        return train, train
    if num_labelled < 1:
        raise InputError(f"num_labelled must be >= 1 (or None for all labels), got {num_labelled}.")
    if not isinstance(train.features[LABEL], ClassLabel) and train.features[LABEL].dtype.startswith("float"):
        raise InputError(
            "num_labelled (unlabelled examples) needs a classification task, not a regression one."
        )
    labelled = train.select(range(num_labelled))
    transfer = train.cast_column(LABEL, Value("int64"))  # a ClassLabel cannot hold -100

    def drop_label(example, index):
        return {LABEL: example[LABEL] if index < num_labelled else UNLABELLED}

    return labelled, transfer.map(drop_label, with_indices=True, desc="Unlabelling the transfer set")


def tokenize(
    dataset: Dataset | DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    task: TextTask,
    max_seq_length: int = 128,
) -> Dataset | DatasetDict:
    """``dataset`` with ``input_ids``/``attention_mask``(/``token_type_ids``) and ``length`` added and
    the text columns removed; no padding (the collator pads each batch to its longest row)."""

    def encode(batch):
        texts = [batch[column] for column in task.text_columns]
        encoded = tokenizer(*texts, truncation=True, max_length=max_seq_length)
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    columns = dataset["train"].column_names if isinstance(dataset, DatasetDict) else dataset.column_names
    remove = [c for c in columns if c != LABEL]
    return dataset.map(encode, batched=True, remove_columns=remove, desc="Tokenizing")
