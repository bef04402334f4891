"""Stage 1, the teacher: a fine-tuned classifier used as it is, or a backbone fine-tuned on the data first.

A checkpoint that is already a sequence classifier with the data's labels is the teacher. Its labels are
matched **by name**: the same names in another order are reordered (the rows of its classification head
permuted), other names are refused with both lists. Generic names (``LABEL_0``, ...) match by position
when the counts agree.

Anything else is fine-tuned on the labelled training split with a plain ``Trainer``. The fine-tuned
teacher is kept in the **fine-tuned teacher cache**, ``<cache>/teachers/<task>-<key>``: a folder saved
with ``save_pretrained`` plus ``hf_distill_teacher.json`` (written last, atomically: a folder without it
is not a cached teacher). ``key`` hashes what the teacher depends on (:func:`teacher_key`). This cache
of whole models is a separate thing from the teacher-*logit* cache (:mod:`hf_distill.teacher_cache`),
which stores one teacher's outputs over one dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import Dataset
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    set_seed,
)

from ..config import DistillationConfig
from ..errors import InputError
from ..teacher_cache import write_json_atomic
from . import offline
from .data import TextTask

# Bump when the way a teacher is fine-tuned changes, so older cached teachers are not reused.
TEACHER_CACHE_VERSION = 2
TEACHER_INFO = "hf_distill_teacher.json"
_GENERIC_LABEL = re.compile(r"LABEL_\d+")


@dataclass
class Teacher:
    """The stage-1 teacher: the model, where it was loaded from, and whether this run fine-tuned it."""

    model: PreTrainedModel
    source: str
    fine_tuned_labels: int | None = None  # labelled examples it was fine-tuned on (None: a checkpoint)


# ---- labels ---------------------------------------------------------------------------------------


def _is_classifier(config: PretrainedConfig) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def named_labels(config: PretrainedConfig) -> tuple[str, ...] | None:
    """The label names of a classifier config, in id order; None when they are generic (``LABEL_0``...)."""
    names = tuple(str(config.id2label[i]) for i in range(config.num_labels))
    return None if all(_GENERIC_LABEL.fullmatch(n) for n in names) else names


def labels_fit(config: PretrainedConfig, task: TextTask, who: str) -> bool:
    """Whether the classifier ``config`` predicts ``task``'s labels (by name, in any order).

    False when it is not a sequence classifier, or has generic names and another number of labels.
    Raises ``ValueError`` showing both lists when its label names differ from the data's.
    """
    if not _is_classifier(config):
        return False
    names = named_labels(config)
    if names is None or task.is_regression:
        return config.num_labels == task.num_labels
    if sorted(names) != sorted(task.label_names):
        raise InputError(
            f"The {who} predicts the labels {list(names)} but the data's labels are {list(task.label_names)}. "
            f"Use a {who} fine-tuned on these labels, or fine-tune it on the data "
            f"({'teacher_finetune: true' if who == 'teacher' else 'a backbone checkpoint'})."
        )
    return True


def reorder_labels(model: PreTrainedModel, names: tuple[str, ...]) -> PreTrainedModel:
    """``model`` with its classes in the order of ``names``: the rows of its classification head permuted
    and ``id2label`` / ``label2id`` rewritten. The head is the last ``nn.Linear`` with one output per label."""
    current = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    if current == list(names):
        return model
    order = [current.index(n) for n in names]
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == len(names)]
    if not heads:
        raise InputError(
            f"Cannot reorder the labels of {type(model).__name__}: no linear layer with {len(names)} outputs."
        )
    with torch.no_grad():
        heads[-1].weight.copy_(heads[-1].weight[order])
        if heads[-1].bias is not None:
            heads[-1].bias.copy_(heads[-1].bias[order])
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {n: i for i, n in enumerate(names)}
    return model


def load_classifier(path: str, task: TextTask, who: str) -> PreTrainedModel:
    """A sequence classifier for ``task`` from ``path``: a fitting classifier with its labels reordered by
    name, or a new head with the data's labels (``labels_fit`` refuses other label names)."""
    config = AutoConfig.from_pretrained(path)
    if labels_fit(config, task, who):
        model = AutoModelForSequenceClassification.from_pretrained(path)
        if task.label_names is not None and named_labels(config) is not None:
            return reorder_labels(model, task.label_names)
        model.config.update(task.labels_config())
        return model
    return AutoModelForSequenceClassification.from_pretrained(path, **task.labels_config())


# ---- the fine-tuned teacher cache -----------------------------------------------------------------


def teacher_seed(script, args: DistillationConfig, seed: int | None = None) -> int:
    """The fine-tuning seed: ``seed`` (one of ``teacher_seeds``), else ``teacher_seed``, else ``args.seed``."""
    if seed is not None:
        return seed
    return args.seed if script.teacher_seed is None else script.teacher_seed


def teacher_key(
    name: str, train: Dataset, task: TextTask, script, args: DistillationConfig, seed: int | None = None
) -> str:
    """Hash of what a fine-tuned teacher depends on: backbone, training data and labels, fine-tuning settings."""
    settings = {
        "version": TEACHER_CACHE_VERSION,
        "backbone": name,
        "train_fingerprint": train._fingerprint,
        "num_rows": len(train),
        "text_columns": list(task.text_columns),
        "labels": list(task.label_names) if task.label_names is not None else "regression",
        "max_seq_length": script.max_seq_length,
        "learning_rate": script.teacher_learning_rate,
        "epochs": script.teacher_num_train_epochs,
        "batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "weight_decay": args.weight_decay,
        "warmup_steps": args.warmup_steps,
        "seed": teacher_seed(script, args, seed),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def fine_tuned_folder(
    script, args: DistillationConfig, task: TextTask, train: Dataset, cache: Path, seed: int | None = None
) -> Path:
    """Where the fine-tuned teacher is kept: ``<cache>/teachers/<task>-<teacher_key>``."""
    name = script.teacher_model_name_or_path
    return cache / "teachers" / f"{task.name}-{teacher_key(name, train, task, script, args, seed)}"


def teacher_plan(
    script, args: DistillationConfig, task: TextTask, train: Dataset, cache: Path, seed: int | None = None
) -> str:
    """What :func:`get_teacher` will do, in words: use the checkpoint, reuse a fine-tuned teacher, or fine-tune."""
    name = script.teacher_model_name_or_path
    config = AutoConfig.from_pretrained(offline.resolve_model_path(name, script.cache_dir))
    if script.teacher_finetune is not True and labels_fit(config, task, "teacher"):
        return f"{name}, used as it is (a classifier of the data's labels)"
    saved = fine_tuned_folder(script, args, task, train, cache, seed)
    if (saved / TEACHER_INFO).exists():
        return f"{name}, fine-tuned before: reused from {saved}"
    return (
        f"{name}, fine-tuned on {len(train):,} labelled examples for {script.teacher_num_train_epochs:g} epochs "
        f"(seed {teacher_seed(script, args, seed)}), then kept in {saved}"
    )


def get_teacher(
    script,
    args: DistillationConfig,
    task: TextTask,
    train: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    cache: Path,
    seed: int | None = None,
) -> Teacher:
    """Stage 1: the teacher of ``script.teacher_model_name_or_path`` for ``task``.

    A checkpoint whose labels fit is used as it is (``teacher_finetune`` unset or false); otherwise it is
    fine-tuned on ``train`` (tokenized, labelled) with ``seed`` (default: ``teacher_seed``) and saved in the
    fine-tuned teacher cache, from which a later run with the same key loads it.
    """
    name = script.teacher_model_name_or_path
    path = offline.resolve_model_path(name, script.cache_dir)
    config = AutoConfig.from_pretrained(path)
    fits = script.teacher_finetune is not True and labels_fit(config, task, "teacher")
    if fits and seed is not None:
        raise InputError(
            f"teacher_seeds fine-tunes one teacher per seed, but {name} is already a classifier of the data's "
            "labels and would be used as it is: give a backbone, or set teacher_finetune: true."
        )
    if fits:
        return Teacher(load_classifier(path, task, "teacher"), path)
    if script.teacher_finetune is False:
        raise InputError(
            f"teacher_finetune is false but {name} is not a sequence classifier with the data's "
            f"{task.num_labels} labels. Give a fine-tuned classifier, or let it be fine-tuned (teacher_finetune: null)."
        )
    saved = fine_tuned_folder(script, args, task, train, cache, seed)
    if (saved / TEACHER_INFO).exists():
        print(f"hf_distill: reusing the fine-tuned teacher in {saved}", flush=True)
        info = json.loads((saved / TEACHER_INFO).read_text())
        model = AutoModelForSequenceClassification.from_pretrained(saved)
        return Teacher(model, str(saved), fine_tuned_labels=info["train_rows"])
    set_seed(teacher_seed(script, args, seed))
    # A classifier fine-tuned again gets a new head when its number of labels differs.
    mismatched = {"ignore_mismatched_sizes": True} if _is_classifier(config) else {}
    model = AutoModelForSequenceClassification.from_pretrained(path, **task.labels_config(), **mismatched)
    finetune_args = dataclasses.replace(
        args,
        seed=teacher_seed(script, args, seed),
        output_dir=str(saved),
        learning_rate=script.teacher_learning_rate,
        num_train_epochs=script.teacher_num_train_epochs,
        max_steps=-1,
        save_strategy="no",
        eval_strategy="no",
        push_to_hub=False,
    )
    print(f"hf_distill: stage 1, fine-tuning the teacher {name} on {len(train)} examples", flush=True)
    trainer = Trainer(model=model, args=finetune_args, train_dataset=train, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    trainer.save_model(str(saved))
    state = PartialState()
    if state.is_main_process:
        info = {"backbone": name, "train_rows": len(train), "seconds": time.perf_counter() - start}
        write_json_atomic(saved / TEACHER_INFO, info)
    state.wait_for_everyone()
    # Reloaded from the saved folder: whole weights whatever wrapped it for training (FSDP, DeepSpeed).
    model = AutoModelForSequenceClassification.from_pretrained(saved)
    return Teacher(model, str(saved), fine_tuned_labels=len(train))
