"""Evaluation at T = 1 with the task's metric, and inference speed."""

from __future__ import annotations

import time

import numpy as np
import torch
import transformers
from datasets import Dataset
from torch import nn
from transformers import DataCollatorWithPadding, EvalPrediction, PreTrainedTokenizerBase, Trainer

from ..model_card import EVAL_BOOKKEEPING
from ..tasks import forward_params
from .data import TextTask
from .metrics import load_metric


def compute_metrics_fn(task: TextTask):
    """``compute_metrics`` for a ``Trainer``: argmax (or the score, for regression) scored by the task's metric."""
    metric = load_metric(task.metric, task.dataset_config, task.is_regression)

    def compute_metrics(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        predictions = logits.squeeze(-1) if task.is_regression else np.argmax(logits, axis=-1)
        return metric.compute(predictions=predictions, references=labels)

    return compute_metrics


def split_metrics(raw: dict[str, float], split: str) -> dict[str, float]:
    """``{metric: value}`` from a ``Trainer.evaluate`` result with ``metric_key_prefix=split``."""
    prefix = split + "_"
    return {
        k[len(prefix) :]: v
        for k, v in raw.items()
        if k.startswith(prefix) and k[len(prefix) :] not in EVAL_BOOKKEEPING
    }


def evaluate_splits(
    trainer: Trainer, task: TextTask, splits: dict[str, Dataset]
) -> dict[str, dict[str, float]]:
    """``{split: {metric: value}}`` of the trainer's model on each split, at T = 1."""
    trainer.compute_metrics = compute_metrics_fn(task)
    return {
        split: split_metrics(trainer.evaluate(d, metric_key_prefix=split), split)
        for split, d in splits.items()
    }


def evaluate_model(
    model: nn.Module,
    task: TextTask,
    splits: dict[str, Dataset],
    args: transformers.TrainingArguments,
    tokenizer: PreTrainedTokenizerBase,
) -> dict[str, dict[str, float]]:
    """``{split: {metric: value}}`` of ``model`` (e.g. the teacher) with a plain ``Trainer``."""
    trainer = Trainer(
        model=model, args=args, processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer)
    )
    return evaluate_splits(trainer, task, splits)


def evaluate_ensemble(
    models: list[nn.Module],
    task: TextTask,
    splits: dict[str, Dataset],
    args: transformers.TrainingArguments,
    tokenizer: PreTrainedTokenizerBase,
) -> dict[str, dict[str, float]]:
    """``{split: {metric: value}}`` of an ensemble's own predictions: the mean of its models' softmax at T = 1
    (the mean score for regression), as the students learn it at T = 1."""
    metrics = compute_metrics_fn(task)
    results = {}
    for split, dataset in splits.items():
        outputs = [
            Trainer(
                model=m,
                args=args,
                processing_class=tokenizer,
                data_collator=DataCollatorWithPadding(tokenizer),
            ).predict(dataset)
            for m in models
        ]
        logits = torch.stack([torch.as_tensor(o.predictions).float() for o in outputs])
        if task.is_regression:
            mixed = logits.mean(0)
        else:
            mixed = torch.log(torch.softmax(logits, dim=-1).mean(0))
        results[split] = metrics(EvalPrediction(predictions=mixed.numpy(), label_ids=outputs[0].label_ids))
    return results


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
