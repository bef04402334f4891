"""One language-model distillation run: checks, the teacher's caches, the students, evaluation and reports.

Everything the user can get wrong (the corpus, its text column, ``block_size``, the teacher, a student
checkpoint's vocabulary) is checked before anything is written to ``output_dir``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict
from transformers import PreTrainedModel

from ..config import DistillationConfig
from ..errors import InputError
from ..model_card import count_parameters
from ..offline import cache_dir
from ..sharding import gathered_model
from ..teacher_cache import SAMPLE_SHAPE_OPTIONS, precompute_teacher_caches, read_provenance, weights_hash
from .data import check_block_size, load_corpus, pack
from .evaluation import forward_speed, greedy_samples, perplexity
from .instruct_run import run_instruct
from .report import TEACHER, RunResult, StageTimes, summary, write_cards_and_publish, write_summary
from .students import StudentRun, make_student, plan_runs, train_student
from .teacher import Teacher, load_teacher

CACHED_MODES = ("topk", "sampled")


@dataclass
class Prepared:
    """What the checks produced: the documents, the teacher, each student's initial weights and the runs."""

    splits: DatasetDict
    record: dict[str, dict[str, Any]]
    teacher: Teacher
    inits: dict[str, PreTrainedModel]
    runs: list[StudentRun]


def prepare(script, args: DistillationConfig) -> Prepared:
    """Read and check the corpus, load the teacher, build the students: nothing is written yet."""
    splits, record = load_corpus(script)
    teacher = load_teacher(script)
    check_block_size(script.block_size, teacher.model.config, "teacher")
    vocab = teacher.model.config.vocab_size
    if "sampled" in script.teacher_modes and script.sample_head >= vocab:
        raise InputError(
            f"sample_head must be below the teacher's vocabulary size {vocab} (the tail must hold a token), "
            f"got {script.sample_head}."
        )
    inits = {kind: make_student(kind, teacher, script) for kind in script.students}
    runs = plan_runs(script, dataclasses.replace(args, push_to_hub=False))
    return Prepared(splits, record, teacher, inits, runs)


def _plan(prepared: Prepared, script, args: DistillationConfig, blocks: dict[str, Dataset]) -> str:
    steps = args.max_steps if args.max_steps > 0 else "one epoch of"
    lines = [
        f"hf_distill: plan: teacher {script.teacher_model_name_or_path}, "
        f"{len(blocks['train'])} training blocks of {script.block_size} tokens, "
        + ", ".join(f"{len(b)} {name} blocks" for name, b in blocks.items() if name != "train")
    ]
    for mode in CACHED_MODES:
        if mode in script.teacher_modes:
            drawn = "sampled" if script.sample_scheme == "iid" else "drawn systematically"
            size = f"top {script.top_k} logits" if mode == "topk" else f"{script.num_samples} tokens {drawn}"
            if mode == "sampled" and script.sample_head:
                size = f"{script.sample_head} most likely tokens exactly and {script.num_samples} {drawn} from the rest"
            if mode == "sampled" and script.sample_proposal_temperature != 1.0:
                size += f" (proposal at tau = {script.sample_proposal_temperature:g}, importance-weighted)"
            if mode == "sampled" and script.sample_head_quantized:
                size += " (the head's probabilities in 8 bits)"
            if mode == "sampled" and not script.sample_counts:
                size += " (the draws stored themselves, without counts)"
            if mode == "sampled" and script.sample_allocation != "even":
                size += (f" ({script.sample_allocation}: a block's draws shared by need, {script.num_samples} a token on "
                         "average, in an interpolative code)")  # fmt: skip
            lines.append(
                f"hf_distill: plan: cache the teacher's {size} per token (reused when cached before)"
            )
    for run in prepared.runs:
        lines.append(
            f"hf_distill: plan: {run.kind} student, {run.training}: {steps} steps of "
            f"{args.per_device_train_batch_size * args.gradient_accumulation_steps} blocks"
        )
    return "\n".join(lines)


def _row(
    name: str, kind: str, training: str, mode: str | None, model, tokenizer, blocks, script, **extra
) -> RunResult:
    with gathered_model(model):  # ZeRO-3: whole weights for the evaluation
        metrics = {
            split: perplexity(model, b, script.eval_batch_size)
            for split, b in blocks.items()
            if split != "train"
        }
        samples, generate_speed = greedy_samples(model, tokenizer, script.prompts, script.max_new_tokens)
        return RunResult(
            name=name,
            kind=kind,
            training=training,
            mode=mode,
            metrics=metrics,
            parameters=count_parameters(model),
            forward_tokens_per_second=forward_speed(model, blocks["validation"], script.eval_batch_size),
            generate_tokens_per_second=generate_speed,
            samples=samples,
            **extra,
        )


def cache_formats(script, args) -> dict[str, dict[str, Any]]:
    """The teacher caches of ``script``'s cached modes (``topk``, ``sampled``) as
    :func:`~hf_distill.teacher_cache.precompute_teacher_caches` formats: the RS-KD draws at the run's T and seed (or ``sample_seed``)."""
    formats = {
        "topk": {"top_k": script.top_k},
        "sampled": {"num_samples": script.num_samples, "sample_temperature": args.temperature,
                    "sample_seed": args.seed if script.sample_seed is None else script.sample_seed,
                    **{name: getattr(script, name) for name in SAMPLE_SHAPE_OPTIONS}},
    }  # fmt: skip
    return {mode: spec for mode, spec in formats.items() if mode in script.teacher_modes}


def run(
    script, args: DistillationConfig, *, recipe: str | None = None, launch_command: str | None = None
) -> dict:
    """Distil every student of ``script`` in every teacher mode, evaluate, write ``results.json`` and cards
    (instruction data, ``instruct: true``: :func:`.instruct_run.run_instruct`)."""
    if script.instruct:
        return run_instruct(script, args, recipe=recipe, launch_command=launch_command)
    start = time.perf_counter()
    prepared = prepare(script, args)
    teacher, tokenizer = prepared.teacher, prepared.teacher.tokenizer
    teacher.model.to(args.device)
    blocks = {
        split: pack(
            docs,
            tokenizer,
            script.block_size,
            max_blocks=script.max_train_blocks if split == "train" else script.max_eval_blocks,
        )
        for split, docs in prepared.splits.items()
    }
    print(_plan(prepared, script, args, blocks), flush=True)

    stages = StageTimes(start)
    stages.done("checks, teacher and data")
    preprocessing = {
        "dataset": script.dataset_name,
        "text_column": script.text_column,
        "block_size": script.block_size,
    }
    train = {None: blocks["train"], "live": blocks["train"]}
    formats = cache_formats(script, args)
    bytes_per_token = {}
    if formats:  # one teacher pass for every cached mode
        train.update(
            precompute_teacher_caches(
                teacher.model,
                blocks["train"],
                formats,
                tokenizer=tokenizer,
                preprocessing=preprocessing,
                cache_dir=cache_dir(script.cache_dir) / "teacher_logits",
                teacher_name=script.teacher_model_name_or_path,
                max_batch_tokens=script.precompute_batch_tokens,
            )
        )
        bytes_per_token = {mode: read_provenance(train[mode])["bytes_per_token"] for mode in formats}
        sizes = ", ".join(f"{mode}, {size:.1f} bytes/token" for mode, size in bytes_per_token.items())
        stages.done(f"teacher caches in one pass ({sizes})")

    results = [
        _row(
            f"teacher: {script.teacher_model_name_or_path}",
            TEACHER,
            "teacher",
            None,
            teacher.model,
            tokenizer,
            blocks,
            script,
        )
    ]
    stages.done("teacher evaluation")
    students: dict[str, PreTrainedModel] = {}
    for run_ in prepared.runs:
        init = prepared.inits[run_.kind]
        trained = train_student(init, run_, train[run_.mode], tokenizer, teacher.model)
        layers = init.config.num_hidden_layers
        results.append(
            _row(
                f"{run_.kind} student ({layers} layers)",
                run_.kind,
                run_.training,
                run_.mode,
                trained.model,
                tokenizer,
                blocks,
                script,
                output_dir=run_.args.output_dir,
                train_seconds=trained.train_seconds,
                step_seconds=trained.step_seconds,
                cache_bytes_per_token=bytes_per_token.get(run_.mode),
                train_losses=trained.losses,
            )
        )
        students[run_.args.output_dir] = trained.model
        stages.done(f"{run_.kind} student, {run_.training}")

    extra = {
        "wall_seconds": time.perf_counter() - start,
        "stage_seconds": stages.seconds,
        "cache_bytes_per_token": bytes_per_token,
    }
    out = summary(results, script, args, prepared.record, extra)
    write_summary(out, args.output_dir)
    write_cards_and_publish(
        results,
        students,
        script,
        args,
        tokenizer,
        teacher_weights_hash=weights_hash(teacher.model),
        recipe=recipe,
        launch_command=launch_command,
    )
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    return out
