"""Stage 2, the students: each kind distilled, and trained on hard labels as its baseline.

A student kind is ``layers`` (teacher layers, :func:`hf_distill.build_student`), ``compact`` (a small
randomly initialised BERT) or ``checkpoint`` (a pretrained model). Every run of one student starts from
the same initialisation and takes the same number of steps: "hard labels" (``alpha=0, beta=1``), "KD"
over the labelled rows and, with a transfer set, "KD + transfer set" over every training text.

Resuming (``--resume_from_checkpoint true``): a run that finished with the same settings, data and
initialisation (its ``hf_distill_run.json`` holds the key) is not trained again; a run that was cut
off continues from the last checkpoint in its folder (``save_strategy`` must write checkpoints).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import PartialState
from datasets import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from ..config import DistillationConfig
from ..errors import InputError
from ..student import build_student
from ..teacher_cache import weights_hash, write_json_atomic
from ..trainer import DistillationTrainer
from . import offline
from .data import TextTask
from .evaluation import evaluate_splits
from .teacher import load_classifier

HARD_LABELS, KD, KD_TRANSFER = "hard labels", "KD", "KD + transfer set"
ENSEMBLE = " from the ensemble"  # KD from the ensemble [+ transfer set]
# A hard-label baseline learns from the labels alone: no teacher term of any kind.
_HARD_LABELS_ONLY = {
    "alpha": 0.0,
    "beta": 1.0,
    "hidden_loss": None,
    "hidden_loss_weight": 0.0,
    "attention_loss_weight": 0.0,
}
RUN_INFO = "hf_distill_run.json"  # written last in a run's folder: the run finished
# TrainingArguments that name or place a run without changing what it computes.
_NOT_KEYED = {
    "output_dir",
    "logging_dir",
    "resume_from_checkpoint",
    "hub_token",
    "push_to_hub",
    "disable_tqdm",
}


def make_student(kind: str, teacher: PreTrainedModel, script, task: TextTask) -> PreTrainedModel:
    """A fresh student of ``kind`` with the data's labels in its config."""
    if kind == "layers":
        return build_student(teacher, num_layers=script.student_num_layers)
    if kind == "compact":
        t = teacher.config
        config = BertConfig(
            vocab_size=t.vocab_size,
            hidden_size=script.compact_hidden_size,
            num_hidden_layers=script.compact_num_layers,
            num_attention_heads=script.compact_num_attention_heads,
            intermediate_size=script.compact_intermediate_size,
            max_position_embeddings=t.max_position_embeddings,
            type_vocab_size=getattr(t, "type_vocab_size", 2),
            pad_token_id=t.pad_token_id,
            **task.labels_config(),
        )
        return BertForSequenceClassification(config)
    if kind == "checkpoint":
        path = offline.resolve_model_path(script.student_model_name_or_path, script.cache_dir)
        return load_classifier(path, task, "student checkpoint")
    raise InputError(f"Unknown student kind {kind!r}; expected 'layers', 'compact' or 'checkpoint'.")


@dataclass
class StudentRun:
    """One training run of a student: its kind, regime, data, settings and where it is saved.

    ``source`` names the teacher it learns from: ``"teacher"`` (the first or only one) or ``"ensemble"``.
    """

    kind: str
    training: str  # HARD_LABELS, KD, KD_TRANSFER, or their ensemble variants
    train: Dataset
    args: DistillationConfig
    source: str = "teacher"

    @property
    def slug(self) -> str:
        return f"{self.kind}-" + re.sub(r"[^a-z0-9]+", "-", self.training.lower()).strip("-")


@dataclass
class TrainedStudent:
    """What a run produced: its metrics on each evaluation split, training time and steps."""

    run: StudentRun
    metrics: dict[str, dict[str, float]]
    train_seconds: float
    train_losses: dict[str, float] = field(default_factory=dict)  # the last logged loss and its components


def _steps(num_rows: int, args: DistillationConfig, epochs: float) -> int:
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return max(1, math.ceil(epochs * math.ceil(num_rows / per_step)))


def plan_runs(
    kind: str, script, args: DistillationConfig, sources: dict[str, tuple[Dataset, Dataset]], output_dir: str
) -> list[StudentRun]:
    """The runs of one student kind, all with the same number of steps.

    ``sources``: for ``"teacher"`` (and ``"ensemble"``), the labelled rows and every training text, with that
    teacher's logits when they are cached. The steps are ``num_train_epochs`` (``compact_num_train_epochs``
    for the compact student) over the largest of the runs' training sets, unless ``max_steps`` fixes them.
    """
    epochs, student_args = args.num_train_epochs, args
    if kind == "compact":
        epochs = script.compact_num_train_epochs or epochs
        student_args = dataclasses.replace(
            args, learning_rate=script.compact_learning_rate or args.learning_rate
        )
    labelled, transfer = sources["teacher"]
    with_transfer = kind in script.transfer_set and len(transfer) > len(labelled)
    largest = len(transfer) if with_transfer else len(labelled)
    steps = args.max_steps if args.max_steps > 0 else _steps(largest, args, epochs)
    regimes = [(HARD_LABELS, labelled, _HARD_LABELS_ONLY, "teacher")] if script.train_baseline else []
    for source, (labelled, transfer) in sources.items():
        suffix = ENSEMBLE if source == "ensemble" else ""
        regimes.append((KD + suffix, labelled, {}, source))
        if with_transfer:
            regimes.append((KD + suffix + " + transfer set", transfer, {}, source))
    runs = []
    for training, train, overrides, source in regimes:
        run = StudentRun(kind, training, train, student_args, source)
        run.args = dataclasses.replace(
            student_args,
            output_dir=f"{output_dir}/{run.slug}",
            max_steps=steps,
            push_to_hub=False,
            **overrides,
        )
        runs.append(run)
    return runs


def run_key(init: PreTrainedModel, run: StudentRun, eval_splits: dict[str, Dataset]) -> str:
    """Hash of what a run's result depends on: its settings, training data, initial weights, evaluation data."""
    settings = {k: v for k, v in run.args.to_dict().items() if k not in _NOT_KEYED}
    parts = {
        "settings": settings,
        "train": run.train._fingerprint,
        "init": weights_hash(init),
        "eval": {s: d._fingerprint for s, d in eval_splits.items()},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _finished(folder: Path, key: str) -> dict[str, Any] | None:
    info = folder / RUN_INFO
    if not info.is_file():
        return None
    record = json.loads(info.read_text())
    return record if record.get("key") == key else None


def train_student(
    init: PreTrainedModel,
    run: StudentRun,
    tokenizer: PreTrainedTokenizerBase,
    teacher: PreTrainedModel | list[PreTrainedModel] | None,
    task: TextTask,
    eval_splits: dict[str, Dataset],
) -> TrainedStudent:
    """Train a copy of ``init`` for ``run`` with ``DistillationTrainer``, evaluate it on ``eval_splits``
    (T = 1), and save it with the tokenizer in ``run.args.output_dir``.

    ``teacher``: a model, a list (an ensemble), or None when ``run.train`` carries ``teacher_logits``. With ``resume_from_checkpoint`` set, a
    finished run with the same key is read back instead, and a cut-off one continues from its last checkpoint.
    """
    folder = Path(run.args.output_dir)
    key = run_key(init, run, eval_splits)
    resume = run.args.resume_from_checkpoint is not None
    if resume and (done := _finished(folder, key)) is not None:
        print(f"hf_distill: stage 2, {run.kind} student, {run.training}: finished before, kept", flush=True)
        return TrainedStudent(run, done["metrics"], done["train_seconds"], done["train_losses"])
    last = get_last_checkpoint(str(folder)) if resume and folder.is_dir() else None
    model = copy.deepcopy(init)
    set_seed(run.args.seed)
    trainer = DistillationTrainer(
        model=model, teacher_model=teacher, args=run.args, train_dataset=run.train, processing_class=tokenizer
    )
    print(
        f"hf_distill: stage 2, {run.kind} student, {run.training}: {run.args.max_steps} steps on "
        f"{len(run.train)} examples" + (f", resumed from {last}" if last else ""),
        flush=True,
    )
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - start
    logged = [h for h in trainer.state.log_history if "loss" in h]
    losses = {k: v for k, v in (logged[-1] if logged else {}).items() if k == "loss" or k.endswith("_loss")}
    metrics = evaluate_splits(trainer, task, eval_splits)
    trainer.save_model(run.args.output_dir)  # gathers sharded (FSDP/DeepSpeed) weights
    state = PartialState()
    if state.is_main_process:
        record = {"key": key, "metrics": metrics, "train_seconds": seconds, "train_losses": losses}
        write_json_atomic(folder / RUN_INFO, record)
    state.wait_for_everyone()
    return TrainedStudent(run, metrics, seconds, losses)
