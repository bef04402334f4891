"""The run's report: result rows, ``results.json``, the Markdown table, the students' cards and publishing."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..config import DistillationConfig
from ..hub import write_cards_and_push_best
from ..model_card import StudentCardData, settings_of
from ..student import teacher_layers_of
from .data import TextTask
from .plot import plot_results
from .students import ENSEMBLE, HARD_LABELS


@dataclass(frozen=True)
class RunResult:
    """One row of the results table: a model, how it was trained, its metrics, size and speed."""

    name: str
    student: str | None  # student kind; None for the teacher
    training: str  # "fine-tuned on N labels", "checkpoint", "hard labels", "KD", "KD + transfer set"
    metrics: dict[str, dict[str, float]]  # split -> metric -> value
    parameters: int
    examples_per_second: float
    train_seconds: float = 0.0
    steps: int = 0
    output_dir: str | None = None
    train_losses: dict[str, float] | None = None  # the last logged training loss and its components

    @property
    def distilled(self) -> bool:
        return self.student is not None and self.training != HARD_LABELS


def report_split(task_splits: list[str]) -> str:
    """The split the table and the cards report: test when there is one, else validation."""
    return "test" if "test" in task_splits else task_splits[0]


def summary(
    task: TextTask,
    script,
    args: DistillationConfig,
    results: list[RunResult],
    *,
    splits: dict[str, dict[str, Any]],
    labelled_examples: int,
    train_examples: int,
    teacher_weights_hash: str | list[str],
) -> dict[str, Any]:
    """What ``results.json`` holds: the data and where its splits came from, the settings, the rows."""
    eval_splits = [s for s in splits if s != "train"]
    return {
        "task": dataclasses.asdict(task),
        "main_metric": task.main_metric,
        "splits": splits,
        "eval_splits": eval_splits,
        "report_split": report_split(eval_splits),
        "train_examples": train_examples,
        "labelled_examples": labelled_examples,
        "settings": {**settings_of(args), **dataclasses.asdict(script), **_training_settings(args)},
        "device": str(args.device),
        "num_processes": PartialState().num_processes,
        "torch_threads": torch.get_num_threads(),
        "teacher_weights_hash": teacher_weights_hash,
        "results": [dataclasses.asdict(r) for r in results],
    }


def _training_settings(args: DistillationConfig) -> dict[str, Any]:
    names = ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "seed")
    return {name: getattr(args, name) for name in names}


def write_summary(summary: dict[str, Any], output_dir: str | Path) -> None:
    """Write ``<output_dir>/results.json`` (main process)."""
    if PartialState().is_main_process:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "results.json").write_text(json.dumps(summary, indent=2))


def write_picture(summary: dict[str, Any], output_dir: str | Path) -> Path | None:
    """Draw ``<output_dir>/results.png`` (:func:`~.plot.plot_results`) beside ``results.json`` (main process);
    returns its path (None on the other processes)."""
    if not PartialState().is_main_process:
        return None
    path = Path(output_dir) / "results.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_results(summary, path)
    return path


def format_table(summary: dict[str, Any]) -> str:
    """The results as a Markdown table: one row per model, the main metric on the report split."""
    rows = summary["results"]
    teacher = rows[0]
    split = summary["report_split"]
    speed0 = teacher["examples_per_second"]
    main = summary["main_metric"]
    lines = [
        f"| model | training | {main} ({split}) | retention | parameters | examples/s | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        value = r["metrics"][split].get(main, float("nan"))
        reference = teacher["metrics"][split].get(main)
        retention = value / reference if reference else float("nan")
        lines.append(
            f"| {r['name']} | {r['training']} | {100 * value:.2f} | {100 * retention:.1f}% | "
            f"{r['parameters'] / 1e6:.1f}M | {r['examples_per_second']:.0f} | {r['examples_per_second'] / speed0:.1f}x |"
        )
    return "\n".join(lines)


def student_card(
    result: RunResult,
    results: list[RunResult],
    task: TextTask,
    script,
    args: DistillationConfig,
    *,
    teacher_weights_hashes: dict[str, str],
    student: PreTrainedModel,
    recipe: str | None = None,
    launch_command: str | None = None,
    results_image: str | None = None,
) -> StudentCardData:
    """The card of a distilled student: its teacher's (or ensemble's) and the baseline's scores on the report
    split beside its own, the distillation settings of ``args`` (``settings_of``), sizes and speedup."""
    split = report_split([s for s in result.metrics])
    from_ensemble = ENSEMBLE in result.training
    teacher = next(r for r in results if r.student is None and r.name.startswith("ensemble") == from_ensemble)
    baseline = next((r for r in results if r.student == result.student and r.training == HARD_LABELS), None)
    return StudentCardData(
        repo_id=args.hub_model_id or f"{task.name}-{result.student}-student",
        task="sequence_classification",
        dataset_name=task.dataset,
        dataset_config=task.dataset_config,
        eval_split=split,
        teacher=script.teacher_model_name_or_path
        + (f" (ensemble, seeds {', '.join(map(str, script.teacher_seeds))})" if from_ensemble else ""),
        teacher_weights_hash=teacher_weights_hashes["ensemble" if from_ensemble else "teacher"],
        student_init_layers=teacher_layers_of(student),
        student_init_checkpoint=script.student_model_name_or_path if result.student == "checkpoint" else None,
        teacher_mode="cached" if script.use_teacher_cache else "live",
        teacher_metrics=teacher.metrics[split],
        student_metrics=result.metrics[split],
        baseline_metrics=baseline.metrics[split] if baseline else None,
        teacher_parameters=teacher.parameters,
        student_parameters=result.parameters,
        speedup=result.examples_per_second / teacher.examples_per_second,
        speedup_hardware=f"{args.device} ({torch.get_num_threads()} threads)",
        speedup_setup=f"batch {script.speed_batch_size}, first {script.speed_samples} {split} examples",
        recipe=recipe,
        launch_command=launch_command,
        results_image=results_image,
        **settings_of(args),
    )


def best_distilled(results: list[RunResult], main_metric: str) -> RunResult:
    """The distilled row to publish: the best ``main_metric`` on validation (on the report split without one)."""
    distilled = [r for r in results if r.distilled]
    split = "validation" if "validation" in distilled[0].metrics else report_split(list(distilled[0].metrics))
    return max(distilled, key=lambda r: r.metrics[split].get(main_metric, float("-inf")))


def write_cards_and_publish(
    results: list[RunResult],
    students: dict[str, PreTrainedModel],
    task: TextTask,
    script,
    args: DistillationConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    teacher_weights_hashes: dict[str, str],
    recipe: str | None = None,
    launch_command: str | None = None,
    picture: Path | None = None,
) -> RunResult | None:
    """Write each distilled student's ``README.md``, with a copy of the run's ``picture`` (``results.png``) beside
    it that the card shows; with ``push_to_hub``, publish the best one (:func:`best_distilled`) with
    :func:`hf_distill.push_student` (the picture too). Main process only; returns the published row."""
    if not PartialState().is_main_process:
        return None
    cards = {}
    for result in results:
        if result.distilled:
            image = None
            if picture is not None:
                image = Path(result.output_dir) / picture.name
                shutil.copyfile(picture, image)
            cards[result.output_dir] = student_card(
                result,
                results,
                task,
                script,
                args,
                teacher_weights_hashes=teacher_weights_hashes,
                student=students[result.output_dir],
                recipe=recipe,
                launch_command=launch_command,
                results_image=None if image is None else str(image),
            )
    best = best_distilled(results, task.main_metric) if args.push_to_hub else None
    write_cards_and_push_best(cards, students, tokenizer, args, None if best is None else best.output_dir)
    return best
