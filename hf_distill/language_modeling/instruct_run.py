"""The instruction-model run (``instruct: true``): two stages, three regimes, held-out metrics that tell them apart.

1. Checks before anything is written: the data, the chat template, prompt lengths, the tokenizers
   (:func:`.instruct_data.prepare_instruction_data`).
2. The teacher's greedy completions of every prompt without one, generated once and cached with provenance
   (:func:`hf_distill.teacher_completions`); those cut at ``rollout_max_new_tokens`` are counted.
3. **Stage 1** heals the layer-cut student off-policy: supervised KD on the teacher's completions
   (``lmbda = 0``) for ``off_policy_steps``.
4. **Stage 2**, from the stage-1 student, for ``on_policy_steps``: **on-policy** (``lmbda`` of the steps, the
   student writes and the live teacher scores) and its **off-policy** twin (``lmbda = 0``, the same steps on the
   teacher's completions). With ``train_baseline``, **CE** (SFT on the teacher's completions, ``alpha = 0``) from
   the initial student for ``off_policy_steps + on_policy_steps``: every regime takes as many optimizer steps.
5. On the held-out prompts (:func:`evaluate`): ``reverse_kl`` (per token, KL(student || teacher) on the student's
   own samples at T = 1), ``forward_kl`` (KL(teacher || student) on the teacher's completions), ``rouge_l`` (the
   student's greedy completion against the teacher's), and greedy samples side by side.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset
from rouge_score import rouge_scorer
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from ..config import DistillationConfig
from ..generation import TransformersGenerator
from ..hub import write_cards_and_push_best
from ..instruction_data import InstructionDataCollator, pad_token_id_of, tokenize_instruction_dataset
from ..model_card import StudentCardData, count_parameters, settings_of
from ..offline import cache_dir
from ..student import teacher_layers_of
from ..tasks import CAUSAL_LM
from ..teacher_cache import weights_hash, write_json_atomic
from ..teacher_completions import end_token_ids, teacher_completions
from .instruct_data import prepare_instruction_data
from .instruct_metrics import completion_logits, reverse_kl, token_kl
from .report import StageTimes
from .students import fit, make_student
from .teacher import load_teacher

ON_POLICY, OFF_POLICY, CE = "on-policy", "off-policy", "CE"
STAGE_1 = "off-policy (stage 1)"
TEACHER = "teacher"
SAMPLES = 3  # held-out prompts shown side by side in results.json and the cards


@dataclass
class InstructRow:
    """One row of the instruct results: the teacher, or a student after its regime (``training``)."""

    name: str
    kind: str
    training: str
    metrics: dict[str, dict[str, float]]  # "validation" -> reverse_kl, forward_kl, rouge_l, tokens
    parameters: int
    samples: list[dict[str, str]]
    output_dir: str | None = None
    steps: int = 0
    train_seconds: float | None = None
    step_seconds: float | None = None
    rollouts: dict[str, int] = field(default_factory=dict)
    train_losses: dict[str, float] = field(default_factory=dict)


def _train(model, args: DistillationConfig, train: Dataset, tokenizer, teacher) -> tuple[Any, dict[str, Any]]:
    """Train ``model`` in place on instruction rows; returns it and what the row records of the run."""
    done = fit(model, args, train, tokenizer, teacher)  # the CE run too: the trainer expects a teacher
    record = {
        "steps": done.steps,
        "train_seconds": done.seconds,
        "step_seconds": done.seconds / max(done.steps, 1),
        "rollouts": dict(done.trainer.rollouts.counts),
        "train_losses": done.losses,
    }
    return model.eval(), record


def _stage_args(args: DistillationConfig, output_dir: Path, **changes) -> DistillationConfig:
    return dataclasses.replace(args, output_dir=str(output_dir), push_to_hub=False, **changes)


@torch.no_grad()
def evaluate(
    student: PreTrainedModel,
    teacher: PreTrainedModel,
    held_out: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """The held-out metrics of ``student`` (tokenized rows with the teacher's completions) and its samples."""
    pad = pad_token_id_of(tokenizer)
    generator = TransformersGenerator(pad_token_id=pad, eos_token_id=end_token_ids(teacher, tokenizer))
    collate = InstructionDataCollator(pad)
    device = next(student.parameters()).device
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    sums = {"reverse_kl": 0.0, "reverse_kl_tokens": 0, "forward_kl": 0.0, "forward_kl_tokens": 0}
    rouge, samples = [], []
    set_seed(seed)  # the student's samples for reverse_kl: the same draws for the same weights
    for start in range(0, len(held_out), batch_size):
        rows = [held_out[i] for i in range(start, min(start + batch_size, len(held_out)))]
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        prompt, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        total, count = reverse_kl(
            student, teacher, prompt, prompt_mask, generator, max_new_tokens=max_new_tokens, temperature=1.0
        )
        sums["reverse_kl"] += float(total)
        sums["reverse_kl_tokens"] += int(count)
        # forward KL on the teacher's (cached, greedy) completions, right-padded
        completions = [list(r["completion_input_ids"]) for r in rows]
        width = max(1, max(len(c) for c in completions))
        ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), width), dtype=torch.bool, device=device)
        for i, c in enumerate(completions):
            ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            mask[i, : len(c)] = True
        args = (prompt, prompt_mask, ids, mask)
        total, count = token_kl(completion_logits(teacher, *args), completion_logits(student, *args), mask)
        sums["forward_kl"] += float(total)
        sums["forward_kl_tokens"] += int(count)
        greedy = generator.generate(
            student, prompt, prompt_mask, max_new_tokens=max_new_tokens, do_sample=False
        )
        predictions = tokenizer.batch_decode(
            greedy.completion_ids.masked_fill(~greedy.completion_mask, pad), skip_special_tokens=True
        )
        references = tokenizer.batch_decode(completions, skip_special_tokens=True)
        rouge += [
            scorer.score(target=t, prediction=p)["rougeL"].fmeasure
            for p, t in zip(predictions, references, strict=True)
        ]
        for i in range(len(rows)):
            if len(samples) < SAMPLES:
                prompt_text = tokenizer.decode(prompt[i][prompt_mask[i].bool()], skip_special_tokens=True)
                samples.append({"prompt": prompt_text, "teacher": references[i], "student": predictions[i]})
    metrics = {
        "reverse_kl": sums["reverse_kl"] / max(sums["reverse_kl_tokens"], 1),
        "forward_kl": sums["forward_kl"] / max(sums["forward_kl_tokens"], 1),
        "rouge_l": sum(rouge) / max(len(rouge), 1),
        "reverse_kl_tokens": sums["reverse_kl_tokens"],
        "forward_kl_tokens": sums["forward_kl_tokens"],
    }
    return metrics, samples


def teacher_row(name: str, teacher: PreTrainedModel, held_out: Dataset, tokenizer) -> InstructRow:
    """The teacher's row, by definition rather than by generation: KL(teacher || teacher) is 0 on any tokens,
    forward and reverse, and its greedy completions are the cached ones it would be compared with (ROUGE-L 1). Its
    samples are its held-out completions. Evaluating it would spend the teacher's sampling and greedy decoding of
    every held-out prompt (about 3 minutes of the offline default on 2 CPU cores) to find these values;
    ``tests/test_distill_lm_instruct.py`` checks that :func:`evaluate` finds them."""
    samples = [
        {
            "prompt": tokenizer.decode(r["prompt_input_ids"], skip_special_tokens=True),
            "teacher": text,
            "student": text,
        }
        for r in held_out.select(range(min(SAMPLES, len(held_out))))
        for text in [tokenizer.decode(r["completion_input_ids"], skip_special_tokens=True)]
    ]
    metrics = {"reverse_kl": 0.0, "forward_kl": 0.0, "rouge_l": 1.0, "by_definition": True}
    return InstructRow(name, TEACHER, TEACHER, {"validation": metrics}, count_parameters(teacher), samples)


def run_instruct(
    script, args: DistillationConfig, *, recipe: str | None = None, launch_command: str | None = None
) -> dict:
    """The two-stage instruction run of ``script``; writes ``results.json``, the students and their cards."""
    start = time.perf_counter()
    teacher = load_teacher(script)
    inits = {kind: make_student(kind, teacher, script) for kind in script.students}
    data = prepare_instruction_data(
        script,
        teacher.tokenizer,
        [teacher.model, *inits.values()],
        max_new_tokens=args.rollout_max_new_tokens,
    )
    tokenizer = teacher.tokenizer
    teacher.model.to(args.device)
    out_dir = Path(args.output_dir)
    steps = script.off_policy_steps + script.on_policy_steps
    print(
        f"hf_distill: plan: teacher {script.teacher_model_name_or_path}, {len(data.splits['train'])} training and "
        f"{len(data.splits['validation'])} held-out prompts (longest {max(data.longest_prompt.values())} tokens); "
        f"stage 1 off-policy {script.off_policy_steps} steps, stage 2 {script.on_policy_steps} steps on-policy "
        f"(lmbda={args.lmbda}) and off-policy; "
        + (f"CE {steps} steps; " if script.train_baseline else "")
        + f"batch {args.per_device_train_batch_size}, completions up to {args.rollout_max_new_tokens} tokens",
        flush=True,
    )
    stages = StageTimes(start)
    stages.done("checks, teacher and data", echo=False)

    splits, truncated = {}, {}
    for split, rows in data.splits.items():
        if not data.has_completions[split]:
            done = teacher_completions(
                teacher.model,
                tokenizer,
                rows,
                max_new_tokens=args.rollout_max_new_tokens,
                cache_dir=cache_dir(script.cache_dir) / "teacher_completions",
                batch_size=script.completion_batch_size,
                chat_template_for_text=script.chat_template_for_text,
                teacher_name=script.teacher_model_name_or_path,
            )
            rows, truncated[split] = done.dataset.remove_columns(["completion_truncated"]), done.num_truncated
        splits[split], _ = tokenize_instruction_dataset(
            rows,
            tokenizer,
            script.max_prompt_length,
            args.rollout_max_new_tokens,
            chat_template_for_text=script.chat_template_for_text,
        )
    stages.done(
        f"teacher completions ({sum(truncated.values())} cut at {args.rollout_max_new_tokens} tokens)"
    )
    _write_teacher_samples(splits["validation"], tokenizer, out_dir, args.rollout_samples)

    def row(name, kind, training, model, output_dir=None, record=None) -> InstructRow:
        metrics, samples = evaluate(
            model,
            teacher.model,
            splits["validation"],
            tokenizer,
            max_new_tokens=args.rollout_max_new_tokens,
            batch_size=script.completion_batch_size,
            seed=args.seed,
        )
        return InstructRow(
            name,
            kind,
            training,
            {"validation": metrics},
            count_parameters(model),
            samples,
            output_dir,
            **(record or {}),
        )

    rows = [
        teacher_row(
            f"teacher: {script.teacher_model_name_or_path}", teacher.model, splits["validation"], tokenizer
        )
    ]
    students: dict[str, PreTrainedModel] = {}
    for kind, init in inits.items():
        name = f"{kind} student ({init.config.num_hidden_layers} layers)"
        base = _stage_args(
            args, out_dir / f"{kind}-stage1", lmbda=0.0, seq_kd=False, max_steps=script.off_policy_steps
        )
        healed, record1 = _train(copy.deepcopy(init), base, splits["train"], tokenizer, teacher.model)
        rows.append(row(name, kind, STAGE_1, healed, base.output_dir, record1))
        stages.done(f"{kind} student, stage 1 off-policy")
        second = {"max_steps": script.on_policy_steps, "data_seed": (args.data_seed or args.seed) + 1}
        for regime, lmbda in ((ON_POLICY, args.lmbda), (OFF_POLICY, 0.0)):
            stage_args = _stage_args(args, out_dir / f"{kind}-{regime}", lmbda=lmbda, **second)
            model, record = _train(
                copy.deepcopy(healed), stage_args, splits["train"], tokenizer, teacher.model
            )
            record["steps"] += record1["steps"]
            rows.append(row(name, kind, regime, model, stage_args.output_dir, record))
            students[stage_args.output_dir] = model
            stages.done(f"{kind} student, stage 2 {regime}")
        if script.train_baseline:
            ce_args = _stage_args(
                args, out_dir / f"{kind}-ce", alpha=0.0, beta=1.0, lmbda=0.0, seq_kd=False, max_steps=steps
            )
            model, record = _train(copy.deepcopy(init), ce_args, splits["train"], tokenizer, teacher.model)
            rows.append(row(name, kind, CE, model, ce_args.output_dir, record))
            stages.done(f"{kind} student, CE")
    result = {
        "task": "instruct",
        "dataset": script.dataset_name,
        "teacher": script.teacher_model_name_or_path,
        "splits": data.record,
        "teacher_completions_truncated": truncated,
        "settings": {**dataclasses.asdict(script), **{k: getattr(args, k) for k in _SETTINGS}},
        "rows": [dataclasses.asdict(r) for r in rows],
        "stage_seconds": stages.seconds,
        "wall_seconds": time.perf_counter() - start,
    }
    best = min(
        (r for r in rows if r.training in (ON_POLICY, OFF_POLICY)), key=_held_out_reverse_kl, default=None
    )
    result["published_candidate"] = best.output_dir if best else None
    if PartialState().is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "results.json", result)
        plot_instruct(result, out_dir / "results.png")
        cards = {
            r.output_dir: _card(
                r, rows, script, args, teacher.model, students[r.output_dir], recipe, launch_command
            )
            for r in rows
            if r.output_dir in students
        }
        write_cards_and_push_best(cards, students, tokenizer, args, best.output_dir if best else None)
    return result


def _held_out_reverse_kl(row: InstructRow) -> float:
    return row.metrics["validation"]["reverse_kl"]


def _card(row: InstructRow, rows: list[InstructRow], script, args, teacher, student, recipe, launch_command):
    """The card of a stage-2 student: the held-out metrics of teacher, student and the CE run, settings, samples."""
    by_training = {r.training: r for r in rows if r.kind in (TEACHER, row.kind)}
    keys = ("reverse_kl", "forward_kl", "rouge_l")

    def metrics(r: InstructRow | None) -> dict[str, float] | None:
        return None if r is None else {k: r.metrics["validation"][k] for k in keys}

    return StudentCardData(
        repo_id=args.hub_model_id or f"{Path(args.output_dir).name}-{row.kind}-{row.training}",
        task=CAUSAL_LM,
        dataset_name=script.dataset_name,
        dataset_config=script.dataset_config_name,
        eval_split="validation",
        teacher=script.teacher_model_name_or_path,
        teacher_weights_hash=weights_hash(teacher),
        student_init_layers=teacher_layers_of(student),
        teacher_mode="live",
        teacher_metrics=metrics(by_training[TEACHER]),
        student_metrics=metrics(row),
        baseline_metrics=metrics(by_training.get(CE)),
        teacher_parameters=by_training[TEACHER].parameters,
        student_parameters=row.parameters,
        samples=[{"prompt": s["prompt"], "continuation": s["student"]} for s in row.samples],
        recipe=recipe,
        launch_command=launch_command,
        **settings_of(args),
    )


_SETTINGS = (
    "alpha", "beta", "temperature", "kd_loss", "jsd_mixture", "lmbda", "seq_kd", "rollout_max_new_tokens",
    "rollout_temperature", "rollout_top_p", "learning_rate", "per_device_train_batch_size", "seed",
)  # fmt: skip


def _write_teacher_samples(held_out: Dataset, tokenizer, out_dir: Path, limit: int) -> None:
    """The first ``limit`` held-out prompts with the teacher's completions, beside the students' rollouts."""
    if not limit or not PartialState().is_main_process:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "teacher_completions.jsonl").open("w", encoding="utf-8") as f:
        for r in held_out.select(range(min(limit, len(held_out)))):
            record = {
                "written_by": TEACHER,
                "prompt": tokenizer.decode(r["prompt_input_ids"]),
                "completion": tokenizer.decode(r["completion_input_ids"], skip_special_tokens=True),
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def format_instruct_table(summary: dict[str, Any]) -> str:
    """The instruct rows as a Markdown table: the held-out metrics that tell the regimes apart."""
    lines = [
        "| model | training | steps | held-out reverse KL | held-out forward KL | ROUGE-L vs teacher | step (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        m = r["metrics"]["validation"]
        step = "" if r["step_seconds"] is None else f"{r['step_seconds']:.2f}"
        lines.append(
            f"| {r['name']} | {r['training']} | {r['steps'] or ''} | {m['reverse_kl']:.3f} | {m['forward_kl']:.3f} | "
            f"{m['rouge_l']:.3f} | {step} |"
        )
    return "\n".join(lines)


def plot_instruct(summary: dict[str, Any], path: Path) -> None:
    """``results.png``: the held-out reverse KL, forward KL (nats/token, lower is better) and ROUGE-L against the
    teacher (higher is better) of every student row, one panel each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in summary["rows"] if r["kind"] != TEACHER]
    labels = [r["training"] for r in rows]
    figure = Figure(figsize=(11, 3.6), layout="constrained")
    panels = (("reverse_kl", "reverse KL(student || teacher)\non the student's samples"),
              ("forward_kl", "forward KL(teacher || student)\non the teacher's completions"),
              ("rouge_l", "ROUGE-L of the greedy completion\nagainst the teacher's"))  # fmt: skip
    for i, (key, title) in enumerate(panels):
        ax = figure.add_subplot(1, 3, i + 1)
        values = [r["metrics"]["validation"][key] for r in rows]
        ax.barh(labels, values, color=["#1f77b4" if "policy" in t else "#999999" for t in labels])
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        for y, v in enumerate(values):
            ax.annotate(
                f"{v:.3f}", (v, y), xytext=(2, 0), textcoords="offset points", va="center", fontsize=8
            )
    figure.suptitle(f"held-out prompts, teacher {summary['teacher']}", fontsize=10)
    FigureCanvasAgg(figure).print_png(str(path))
