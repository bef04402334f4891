"""The results of a language-model run: rows, ``results.json``, the printed table, cards and publishing."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..config import DistillationConfig
from ..hub import write_cards_and_push_best
from ..model_card import StudentCardData, settings_of
from ..student import teacher_layers_of
from ..tasks import CAUSAL_LM
from ..teacher_cache import write_json_atomic
from . import offline

TEACHER = "teacher"


class StageTimes:
    """The seconds of each stage of a run, kept in order for ``results.json``'s ``stage_seconds`` and printed as
    each ends (``hf_distill: <name> done in N s``). Measured from ``start`` (``time.perf_counter()``)."""

    def __init__(self, start: float):
        self.seconds: dict[str, float] = {}
        self._mark = start

    def done(self, name: str, *, echo: bool = True) -> None:
        """``name`` ended now: its seconds since the previous stage ended (or ``start``)."""
        now = time.perf_counter()
        self.seconds[name] = now - self._mark
        if echo:
            print(f"hf_distill: {name} done in {now - self._mark:.0f} s", flush=True)
        self._mark = now


@dataclass(frozen=True)
class RunResult:
    """One row: the teacher, or one run of one student (``mode``: its teacher mode, None for CE only)."""

    name: str
    kind: str
    training: str
    mode: str | None
    metrics: dict[str, dict[str, float]]  # split -> {"loss" (nats/token), "perplexity", "ece", "tokens"}
    parameters: int
    forward_tokens_per_second: float
    generate_tokens_per_second: float
    samples: list[dict[str, str]]
    output_dir: str | None = None
    train_seconds: float | None = None
    step_seconds: float | None = None
    cache_bytes_per_token: float | None = None
    train_losses: dict[str, float] = field(default_factory=dict)

    @property
    def distilled(self) -> bool:
        return self.mode is not None


def summary(
    results: list[RunResult], script, args: DistillationConfig, record: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Any]:
    """What ``results.json`` holds: the rows, each student's step time relative to its CE twin, the settings."""
    rows = []
    for r in results:
        row = dataclasses.asdict(r)
        twin = next((t for t in results if t.kind == r.kind and t.mode is None and t.kind != TEACHER), None)
        if r.step_seconds and twin is not None and twin.step_seconds:
            row["step_time_vs_ce"] = r.step_seconds / twin.step_seconds
        rows.append(row)
    best = best_distilled(results)
    return {
        "task": CAUSAL_LM,
        "dataset": script.dataset_name,
        "teacher": script.teacher_model_name_or_path,
        "splits": record,
        "settings": {**dataclasses.asdict(script), **settings_of(args), **_training_settings(args)},
        "rows": rows,
        "published_candidate": best.output_dir if best else None,
        **extra,
    }


def _training_settings(args: DistillationConfig) -> dict[str, Any]:
    keys = (
        "learning_rate",
        "warmup_steps",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_steps",
        "seed",
    )
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)  # a SchedulerType or its name
    return {k: getattr(args, k) for k in keys} | {"num_train_epochs": args.num_train_epochs, "lr_scheduler_type": schedule}  # fmt: skip


def write_summary(summary: dict[str, Any], output_dir: str | Path) -> None:
    if PartialState().is_main_process:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(output_dir) / "results.json", summary)


def _ppl(row: dict[str, Any], split: str) -> str:
    value = row["metrics"].get(split, {}).get("perplexity")
    return "" if value is None else f"{value:.1f}"


def _ece(row: dict[str, Any], split: str) -> str:
    value = row["metrics"].get(split, {}).get("ece")
    return "" if value is None else f"{value:.3f}"


def format_table(summary: dict[str, Any]) -> str:
    """The rows as a Markdown table: perplexities, calibration (ECE), size, speeds, step time against CE only, cache size
    (an instruct run's: :func:`.instruct_run.format_instruct_table`)."""
    if summary.get("task") == "instruct":
        from .instruct_run import format_instruct_table

        return format_instruct_table(summary)
    has_ood = any("ood" in r["metrics"] for r in summary["rows"])
    head = "| model | training | validation perplexity | validation ECE |"
    head += " out-of-domain perplexity | out-of-domain ECE |" if has_ood else ""
    head += " parameters | forward tokens/s | generated tokens/s | step time vs CE | cache bytes/token |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in summary["rows"]:
        ratio = r.get("step_time_vs_ce")
        cells = [r["name"], r["training"], _ppl(r, "validation"), _ece(r, "validation")]
        if has_ood:
            cells += [_ppl(r, "ood"), _ece(r, "ood")]
        cells += [
            f"{r['parameters'] / 1e6:.1f}M",
            f"{r['forward_tokens_per_second']:.0f}",
            f"{r['generate_tokens_per_second']:.1f}",
            "" if ratio is None else f"{ratio:.2f}x",
            "" if r["cache_bytes_per_token"] is None else f"{r['cache_bytes_per_token']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_distilled(results: list[RunResult]) -> RunResult | None:
    """The distilled row to publish: the lowest validation perplexity (never a CE-only row, never another split)."""
    distilled = [r for r in results if r.distilled]
    if not distilled:
        return None
    return min(distilled, key=lambda r: r.metrics["validation"].get("perplexity", math.inf))


def student_card(
    result: RunResult,
    results: list[RunResult],
    script,
    args: DistillationConfig,
    *,
    teacher_weights_hash: str,
    student: PreTrainedModel,
    recipe: str | None,
    launch_command: str | None,
) -> StudentCardData:
    """The card of a distilled student: validation perplexity and ECE of teacher, student and CE twin, settings, sizes."""
    teacher = next(r for r in results if r.kind == TEACHER)
    twin = next((r for r in results if r.kind == result.kind and r.mode is None), None)

    def metrics(row: RunResult | None) -> dict[str, float] | None:
        return (
            None if row is None else {k: row.metrics["validation"][k] for k in ("perplexity", "loss", "ece")}
        )

    return StudentCardData(
        repo_id=args.hub_model_id or f"{Path(args.output_dir).name}-{result.kind}-student",
        task=CAUSAL_LM,
        dataset_name=offline.describe_dataset(script.dataset_name),
        dataset_config=script.dataset_config_name,
        eval_split="validation",
        teacher=script.teacher_model_name_or_path,
        teacher_weights_hash=teacher_weights_hash,
        student_init_layers=teacher_layers_of(student),
        student_init_checkpoint=script.student_model_name_or_path if result.kind == "checkpoint" else None,
        teacher_mode="live" if result.mode == "live" else "cached",
        teacher_metrics=metrics(teacher),
        student_metrics=metrics(result),
        baseline_metrics=metrics(twin),
        teacher_parameters=teacher.parameters,
        student_parameters=result.parameters,
        speedup=result.generate_tokens_per_second / teacher.generate_tokens_per_second
        if teacher.generate_tokens_per_second
        else None,
        speedup_hardware=f"{args.device} ({torch.get_num_threads()} threads)",
        speedup_setup=f"greedy generation, {script.max_new_tokens} new tokens per prompt, batch 1",
        samples=result.samples,
        recipe=recipe,
        launch_command=launch_command,
        **settings_of(args),
    )


def write_cards_and_publish(
    results: list[RunResult],
    students: dict[str, PreTrainedModel],
    script,
    args: DistillationConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    teacher_weights_hash: str,
    recipe: str | None = None,
    launch_command: str | None = None,
) -> RunResult | None:
    """Write each distilled student's ``README.md``; with ``push_to_hub``, publish the one with the lowest
    validation perplexity (:func:`best_distilled`). Main process only; returns the published row."""
    if not PartialState().is_main_process:
        return None
    cards = {
        result.output_dir: student_card(
            result,
            results,
            script,
            args,
            teacher_weights_hash=teacher_weights_hash,
            student=students[result.output_dir],
            recipe=recipe,
            launch_command=launch_command,
        )
        for result in results
        if result.distilled
    }
    best = best_distilled(results) if args.push_to_hub else None
    write_cards_and_push_best(cards, students, tokenizer, args, None if best is None else best.output_dir)
    return best
