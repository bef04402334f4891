"""Stage 2: each student, distilled once per teacher mode and trained on the text alone (its CE twin).

Every run of one student starts from the same weights and sees the same blocks in the same order
(the same seed); only the loss differs: ``alpha * KD + beta * CE`` with the teacher live, from the
top-k cache or from the RS-KD cache, or CE alone (``alpha = 0, beta = 1``).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from ..config import DistillationConfig
from ..student import build_student
from ..teachers import check_compatible
from ..trainer import DistillationTrainer
from .data import check_block_size
from .teacher import Teacher, load_causal_lm, load_tokenizer

# teacher mode (None: the CE twin) -> the row's name in the results
TRAINING = {
    None: "CE only",
    "live": "KD, live teacher",
    "topk": "KD, top-k cache",
    "sampled": "KD, RS-KD cache",
}


def make_student(kind: str, teacher: Teacher, script) -> PreTrainedModel:
    """The initial student: ``layers`` (:func:`hf_distill.build_student`) or a ``checkpoint`` sharing the vocabulary."""
    if kind == "layers":
        return build_student(
            teacher.model,
            num_layers=script.student_num_layers,
            layers=script.student_layers,
            teacher_name_or_path=teacher.name,
        )
    student = load_causal_lm(script.student_model_name_or_path, "student")
    check_compatible(
        student,
        teacher.model,
        student_tokenizer=load_tokenizer(script.student_model_name_or_path),
        teacher_tokenizer=teacher.tokenizer,
    )
    check_block_size(script.block_size, student.config, "student")
    return student


@dataclass(frozen=True)
class StudentRun:
    """One training run of one student: its kind, teacher mode (None: CE only) and settings."""

    kind: str
    mode: str | None
    args: DistillationConfig

    @property
    def training(self) -> str:
        return TRAINING[self.mode]

    @property
    def slug(self) -> str:
        return f"{self.kind}-{self.mode or 'ce'}"


def plan_runs(script, args: DistillationConfig) -> list[StudentRun]:
    """The CE twin (when ``train_baseline``) and one distilled run per teacher mode, for each student."""
    runs = []
    for kind in script.students:
        modes = ([None] if script.train_baseline else []) + list(script.teacher_modes)
        for mode in modes:
            changes: dict[str, Any] = {"output_dir": str(Path(args.output_dir) / f"{kind}-{mode or 'ce'}")}
            if mode is None:
                changes.update(alpha=0.0, beta=1.0)
            runs.append(StudentRun(kind, mode, dataclasses.replace(args, **changes)))
    return runs


@dataclass(frozen=True)
class TrainedStudent:
    """A finished run: the trained model, its wall time, seconds per step and last logged losses."""

    run: StudentRun
    model: PreTrainedModel
    train_seconds: float
    step_seconds: float
    losses: dict[str, float]


def train_student(
    init: PreTrainedModel,
    run: StudentRun,
    train: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    teacher: PreTrainedModel | None,
) -> TrainedStudent:
    """Train a copy of ``init`` for ``run`` with ``DistillationTrainer`` on ``train`` and save it with the tokenizer.

    ``teacher`` runs live for the ``live`` mode; cached modes read their columns from ``train``.
    """
    model = copy.deepcopy(init)
    done = fit(model, run.args, train, tokenizer, teacher if run.mode in (None, "live") else None)
    return TrainedStudent(run, model.eval(), done.seconds, done.runtime / max(done.steps, 1), done.losses)


@dataclass(frozen=True)
class Fit:
    """What :func:`fit` leaves: the trainer, its optimizer steps, the wall time of ``train()`` and the Trainer's
    own ``train_runtime`` (seconds), and the last logged losses (``loss`` and each ``*_loss``)."""

    trainer: DistillationTrainer
    steps: int
    seconds: float
    runtime: float
    losses: dict[str, float]


def fit(
    model: PreTrainedModel,
    args: DistillationConfig,
    train: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    teacher: PreTrainedModel | None,
) -> Fit:
    """Train ``model`` in place with ``DistillationTrainer`` (seeded by ``args.seed``) on ``train``, and save it with
    the tokenizer in ``args.output_dir``."""
    set_seed(args.seed)
    trainer = DistillationTrainer(
        model=model, teacher_model=teacher, args=args, train_dataset=train, processing_class=tokenizer
    )
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    logged = [h for h in trainer.state.log_history if "loss" in h]
    losses = {k: v for k, v in (logged[-1] if logged else {}).items() if k == "loss" or k.endswith("_loss")}
    trainer.save_model(args.output_dir)
    return Fit(trainer, output.global_step, seconds, output.metrics["train_runtime"], losses)
