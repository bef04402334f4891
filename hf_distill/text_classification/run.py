"""The whole run behind ``scripts/distill_glue.py``: checks, stage 1 (teacher), stage 2 (students), report.

:func:`prepare` reads and checks the data, the tokenizer(s) and the teacher's and students' labels
before anything is trained or written; :func:`run` then fine-tunes (or loads) the teacher, fills the
teacher-logit cache, trains every student run, times the models and writes ``results.json`` and the
students' cards. ``scripts/precompute_teacher_logits.py`` uses :func:`prepare`,
:func:`~.teacher.get_teacher` and :func:`teacher_cache_settings` to fill the very cache :func:`run` reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    set_seed,
)

from ..config import DistillationConfig
from ..errors import InputError, reading
from ..losses import ensemble_logits
from ..model_card import count_parameters
from ..teacher_cache import precompute_teacher_logits, weights_hash
from . import data, offline
from .data import TextTask
from .evaluation import evaluate_ensemble, evaluate_model, measure_speed
from .report import (
    RunResult,
    format_table,
    summary,
    write_cards_and_publish,
    write_picture,
    write_summary,
)
from .students import HARD_LABELS, TrainedStudent, make_student, plan_runs, train_student
from .teacher import get_teacher, labels_fit, teacher_plan

__all__ = ["Prepared", "format_table", "prepare", "run", "teacher_cache_settings"]


@dataclass
class Prepared:
    """A recipe's data, checked and tokenized: what both stages start from."""

    task: TextTask
    splits: dict[str, dict[str, Any]]  # where each split came from, and its rows
    tokenizer: PreTrainedTokenizerBase
    labelled: Dataset  # tokenized labelled training rows (the first num_labelled)
    transfer: Dataset  # tokenized training texts: the labelled rows first, then the others with label -100
    evals: dict[str, Dataset]  # tokenized evaluation splits


def _check_students(script, task: TextTask, tokenizer: PreTrainedTokenizerBase) -> None:
    if "checkpoint" not in script.students:
        return
    with reading(f"the student checkpoint {script.student_model_name_or_path!r}"):
        path = offline.resolve_model_path(script.student_model_name_or_path, script.cache_dir)
        config, student_tokenizer = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    labels_fit(config, task, "student checkpoint")  # refuses other label names
    if student_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise InputError(
            f"The student checkpoint {script.student_model_name_or_path} has another vocabulary than the teacher "
            f"{script.teacher_model_name_or_path}; this script tokenizes once, so both must share a tokenizer."
        )


def prepare(script, args: DistillationConfig) -> Prepared:
    """Read, check and tokenize the recipe's data; check the teacher's and students' labels.

    Raises ``ValueError`` on bad data or labels before anything is trained or written to ``output_dir``.
    """
    state = PartialState()
    with state.main_process_first():  # download once, then every rank reads the cache
        with reading(f"the data {script.dataset_name!r}"):
            task, splits, record = data.load_splits(script)
        with reading(f"the teacher {script.teacher_model_name_or_path!r}"):
            teacher_path = offline.resolve_model_path(script.teacher_model_name_or_path, script.cache_dir)
            teacher_config = AutoConfig.from_pretrained(teacher_path)
            tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    if script.teacher_finetune is not True:
        labels_fit(teacher_config, task, "teacher")  # refuses other label names
    if script.teacher_seeds and (args.hidden_loss_weight > 0 or args.attention_loss_weight > 0):
        raise InputError(
            "teacher_seeds (an ensemble) gives the students logits only: the hidden-state and attention losses "
            "take one teacher. Set hidden_loss_weight and attention_loss_weight to 0, or drop teacher_seeds."
        )
    if script.num_labelled is not None and task.is_regression:
        raise InputError(
            "num_labelled (unlabelled examples) needs a classification task, not a regression one."
        )
    _check_students(script, task, tokenizer)

    train = splits["train"]
    if script.max_train_samples is not None:
        train = train.select(range(min(script.max_train_samples, len(train))))
    evals = {s: d for s, d in splits.items() if s != "train"}
    if not evals:
        raise InputError("No validation or test split: set validation_split or test_split (auto carves one).")
    if script.max_eval_samples is not None:
        evals = {s: d.select(range(min(script.max_eval_samples, len(d)))) for s, d in evals.items()}
    with state.main_process_first():
        labelled_raw, transfer_raw = data.split_labelled(train, script.num_labelled)
        labelled = data.tokenize(labelled_raw, tokenizer, task, script.max_seq_length)
        transfer = data.tokenize(transfer_raw, tokenizer, task, script.max_seq_length)
        evals = {s: data.tokenize(d, tokenizer, task, script.max_seq_length) for s, d in evals.items()}
    record["train"]["rows_used"] = len(train)
    return Prepared(task, record, tokenizer, labelled, transfer, evals)


def teacher_cache_settings(script, task: TextTask, cache: Path) -> dict[str, Any]:
    """The ``precompute_teacher_logits`` settings of a recipe: what ``run`` and the precompute script share."""
    return {
        "preprocessing": {
            "max_length": script.max_seq_length,
            "truncation": True,
            "fields": list(task.text_columns),
        },
        "cache_dir": cache / "teacher_logits",
        "dtype": "float32",
    }


def _load_saved(path: str, device) -> AutoModelForSequenceClassification:
    return AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()


def _ensemble_logits(datasets: list[Dataset], args: DistillationConfig) -> Dataset:
    """The first teacher's cached dataset with ``teacher_logits`` replaced by the ensemble's mixture at the
    distillation temperature (:func:`hf_distill.ensemble_logits`, the logits the trainer would form live)."""
    logits = [torch.as_tensor(np.asarray(d["teacher_logits"], dtype=np.float32)) for d in datasets]
    weights = args.teacher_weights or [1.0] * len(datasets)
    mixture = ensemble_logits(logits, weights, args.temperature, args.kd_loss).numpy()
    first = datasets[0].remove_columns("teacher_logits")
    return first.add_column(
        "teacher_logits", list(mixture), new_fingerprint=_mixture_fingerprint(datasets, args)
    )


def _mixture_fingerprint(datasets: list[Dataset], args: DistillationConfig) -> str:
    parts = [d._fingerprint for d in datasets] + [args.teacher_weights, args.temperature, args.kd_loss]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def run(
    script, args: DistillationConfig, recipe: str | None = None, launch_command: str | None = None
) -> dict[str, Any]:
    """Both stages; returns (and saves in ``output_dir``) the results.

    ``recipe`` and ``launch_command`` (how this run was started) go into the students' model cards.
    """
    prepared = prepare(script, args)
    task, tokenizer, evals = prepared.task, prepared.tokenizer, prepared.evals
    cache = offline.cache_dir(script.cache_dir)
    output_dir = Path(args.output_dir)
    eval_args = dataclasses.replace(args, output_dir=str(output_dir / "eval"), push_to_hub=False)
    seeds = script.teacher_seeds or [None]
    clock = _Clock()
    clock.say(describe_plan(script, args, prepared, cache, seeds))

    # ---- stage 1: the teacher, or one per seed of an ensemble
    teachers = [get_teacher(script, args, task, prepared.labelled, tokenizer, cache, seed=s) for s in seeds]
    models = [t.model.to(args.device).eval() for t in teachers]
    teacher_metrics = [evaluate_model(m, task, evals, eval_args, tokenizer) for m in models]
    hashes = [weights_hash(m) for m in models]
    clock.done("stage 1, the teacher" + ("s" if len(models) > 1 else "") + " (and its evaluation)")

    # Teacher logits over every training text (the labelled rows are the first ones). A hidden-state or
    # attention loss needs the live teacher's activations, so the teacher is kept beside its logits.
    needs_live = args.hidden_loss_weight > 0 or args.attention_loss_weight > 0
    live = {"teacher": models[0], "ensemble": models}
    full_sets = {"teacher": prepared.transfer, **({"ensemble": prepared.transfer} if len(models) > 1 else {})}
    if script.use_teacher_cache:
        settings = teacher_cache_settings(script, task, cache)
        cached = [
            precompute_teacher_logits(
                m, prepared.transfer, tokenizer=tokenizer, **settings, teacher_name=_name(script, s)
            )
            for m, s in zip(models, seeds, strict=True)
        ]
        full_sets["teacher"] = cached[0]
        if len(models) > 1:
            full_sets["ensemble"] = _ensemble_logits(cached, args)
        if not needs_live:
            live = dict.fromkeys(live)
        clock.done(f"teacher logits over {len(prepared.transfer):,} training texts")
    n_labelled = len(prepared.labelled)
    sources = {
        source: (full.select(range(n_labelled)) if n_labelled < len(full) else full, full)
        for source, full in full_sets.items()
    }

    # ---- stage 2
    trained: list[tuple[TrainedStudent, int]] = []
    for kind in script.students:
        set_seed(args.seed)
        init = make_student(kind, models[0], script, task)
        for student_run in plan_runs(kind, script, args, sources, str(output_dir)):
            teacher = live[student_run.source]
            result = train_student(init, student_run, tokenizer, teacher, task, evals)
            trained.append((result, count_parameters(init)))
            clock.done(
                f"stage 2, {kind} student, {student_run.training} ({student_run.args.max_steps} steps)"
            )

    # Speed depends on the architecture only: one model of each kind, reloaded from its saved folder
    # (whole weights even after FSDP/DeepSpeed) and timed one after the other on this process's device.
    speed_split = next(iter(evals.values()))

    def speed(model) -> float:
        return measure_speed(model, speed_split, tokenizer, script.speed_samples, script.speed_batch_size)

    speeds = {None: speed(models[0])}
    students = {}  # output_dir -> reloaded distilled student (cards, publishing)
    for student, _ in trained:
        out = student.run.args.output_dir
        if student.run.training != HARD_LABELS:
            students[out] = _load_saved(out, args.device)
        if student.run.kind not in speeds:
            speeds[student.run.kind] = speed(students.get(out) or _load_saved(out, args.device))

    results = [
        RunResult(
            name=f"teacher ({_name(script, seed)})",
            student=None,
            training="checkpoint"
            if t.fine_tuned_labels is None
            else f"fine-tuned on {t.fine_tuned_labels} labels",
            metrics=metrics,
            parameters=count_parameters(t.model),
            examples_per_second=speeds[None],
            output_dir=t.source,
        )
        for t, seed, metrics in zip(teachers, seeds, teacher_metrics, strict=True)
    ]
    if len(models) > 1:
        results.append(
            RunResult(
                name=f"ensemble of {len(models)} teachers (seeds {', '.join(map(str, seeds))})",
                student=None,
                training="mean of the teachers' soft labels",
                metrics=evaluate_ensemble(models, task, evals, eval_args, tokenizer),
                parameters=sum(r.parameters for r in results),
                examples_per_second=speeds[None] / len(models),
            )
        )
    results += [
        RunResult(
            name=f"{s.run.kind} student",
            student=s.run.kind,
            training=s.run.training,
            metrics=s.metrics,
            parameters=parameters,
            examples_per_second=speeds[s.run.kind],
            train_seconds=s.train_seconds,
            steps=s.run.args.max_steps,
            output_dir=s.run.args.output_dir,
            train_losses=s.train_losses,
        )
        for s, parameters in trained
    ]
    teacher_hashes = {"teacher": hashes[0], "ensemble": ", ".join(hashes)}
    result = summary(
        task,
        script,
        args,
        results,
        splits=prepared.splits,
        labelled_examples=n_labelled,
        train_examples=len(prepared.transfer),
        teacher_weights_hash=hashes[0] if len(hashes) == 1 else hashes,
    )
    write_summary(result, output_dir)
    picture = write_picture(result, output_dir)
    write_cards_and_publish(
        results,
        students,
        task,
        script,
        args,
        tokenizer,
        teacher_weights_hashes=teacher_hashes,
        recipe=recipe,
        launch_command=launch_command,
        picture=picture,
    )
    clock.done("inference speed, results.json, results.png and the students' cards")
    clock.say(f"hf_distill: finished in {time.perf_counter() - clock.start:.0f} s")
    return result


class _Clock:
    """Prints (main process) what the run will do, then one line per finished stage with its wall time."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.main = PartialState().is_main_process

    def say(self, text: str) -> None:
        if self.main:
            print(text, flush=True)

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        self.say(f"hf_distill: done: {stage} in {now - self.last:.1f} s")
        self.last = now


def describe_plan(script, args: DistillationConfig, prepared: Prepared, cache: Path, seeds: list) -> str:
    """What :func:`run` will do, before it starts: the teacher(s), the teacher logits and every student run
    with its steps (the runs :func:`~.students.plan_runs` makes)."""
    lines = ["hf_distill: the plan"]
    for seed in seeds:
        plan = teacher_plan(script, args, prepared.task, prepared.labelled, cache, seed)
        lines.append(f"  stage 1, teacher: {plan}")
    if len(seeds) > 1:
        lines.append(f"  ensemble: the mean of the {len(seeds)} teachers' soft labels")
    if script.use_teacher_cache:
        lines.append(
            f"  teacher logits: over {len(prepared.transfer):,} training texts, computed once and cached in "
            f"{cache / 'teacher_logits'} (a matching cache from an earlier run is read instead)"
        )
    else:
        lines.append(
            "  teacher logits: computed live by the teacher at every training step (use_teacher_cache off)"
        )
    sources = {"teacher": (prepared.labelled, prepared.transfer)}
    if len(seeds) > 1:
        sources["ensemble"] = sources["teacher"]
    for kind in script.students:
        for student_run in plan_runs(kind, script, args, sources, args.output_dir):
            lines.append(
                f"  stage 2, {kind} student, {student_run.training}: {student_run.args.max_steps} steps on "
                f"{len(student_run.train):,} examples, learning rate {student_run.args.learning_rate:g}"
            )
    lines.append(
        f"  then: inference speed, results.json, results.png and the students' cards in {args.output_dir}"
    )
    return "\n".join(lines)


def _name(script, seed: int | None) -> str:
    """How a teacher is named in the table and the cache's provenance."""
    name = script.teacher_model_name_or_path
    return name if seed is None else f"{name}, seed {seed}"
