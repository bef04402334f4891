"""On-policy distillation steps side by side: hf-distill's ``DistillationTrainer`` against TRL's ``GKDTrainer``.

Both trainers get the same prompts (the offline instruction prompts of ``recipes/offline/smollm2_instruct.yaml``:
summarise a plot, judge a review, continue a speech, tokenized once with the teacher's chat template), the same
initial student (``hf_distill.build_student``: 10 of the teacher's 30 layers, as the LM default), the same teacher
(the offline SmolLM2-135M-Instruct, loaded by the application's loader), and the same settings:

- ``lmbda`` (default 1.0: the student generates at every step in both);
- the JSD mixture (TRL ``beta`` = our ``jsd_mixture``), KD only (our ``alpha=1, beta=0``; TRL has no CE term);
- the sampling temperature (TRL ``temperature`` = our ``rollout_temperature``), ``top_p=1``, ``max_new_tokens``;
- the loss at T = 1 in both: TRL 1.16's ``GKDTrainer.compute_loss`` calls ``generalized_jsd_loss`` without its
  ``temperature``, so our loss ``temperature`` is set to 1.0, not to the sampling temperature;
- batch size, learning rate, AdamW, constant schedule, gradient clipping 1.0, no gradient accumulation, the seed;
- the dtype (float32 by default, as on CPU), no autocast, no gradient checkpointing: ``GKDConfig`` defaults to
  ``bf16=True`` and ``gradient_checkpointing=True`` (which also turns its generation's KV cache off), both set off.

Each variant runs in a fresh process; rounds interleave the variants (the order rotating), so load from other
processes hits each alike. A process builds everything, resets its peak memory, trains ``--steps`` steps and
reports:

- the step times: the time between the ends of consecutive steps (the first step left out). Not
  ``on_step_begin`` to ``on_step_end``: transformers' loop calls ``get_batch_samples``, where our trainer
  generates, before ``on_step_begin``;
- generation's share of those steps: time inside our ``Generator.generate`` (a wrapper around the trainer's
  generator) or inside TRL's ``generate_on_policy_outputs`` (wrapped on the trainer), over the step time;
- the completion tokens generated per row, and the loss normaliser each trainer used (``num_items_in_batch``);
- peak memory above the loaded process: on CPU the peak resident size (``VmHWM`` after resetting it, less
  ``VmRSS`` then, as ``bench_lm_loss.py``); on CUDA ``torch.cuda.max_memory_allocated`` less the allocated
  memory after loading.

What is not alike (also written into the results file): see :data:`CAVEATS`.

    python benchmarks/bench_on_policy_trl.py                      # 3 rounds x 2 variants x 6 steps of 4 x 64 tokens:
                                                                  # an estimate of 10-15 min on 2 idle CPU cores
    python benchmarks/bench_on_policy_trl.py --smoke              # 1 round, 3 steps, 2 rows, 8 new tokens: checks it runs
    python benchmarks/bench_on_policy_trl.py --device cuda        # on a GPU (peak from torch.cuda)

Results: ``benchmarks/results/on_policy_trl.json`` (``--out`` to change) and a markdown table on stdout.
trl is a benchmark-only dependency (the ``test`` extra).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "on_policy_trl.json"
RECIPE = ROOT / "recipes" / "offline" / "smollm2_instruct.yaml"
OURS, TRL = "hf-distill DistillationTrainer", "TRL GKDTrainer"
VARIANTS = (OURS, TRL)
WORKER_NAMES = {"ours": OURS, "trl": TRL}
# As bench_lm_loss.py: blocks of 1 MiB or more get their own mmap, so the resident size follows the live tensors.
WORKER_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(2**20),
    "TRL_EXPERIMENTAL_SILENCE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
CAVEATS = (
    "lmbda: TRL draws on-policy or not per micro-batch (random.random() <= lmbda in training_step), hf-distill once "
    "per optimizer step (seeded by the step); at lmbda = 1 without gradient accumulation both generate every step.",
    "Loss: TRL materialises the full (B, L, V) logits of student and teacher and the JSD's (B, L-1, V) "
    "intermediates over every position, then masks to the completion; hf-distill's fused loss (lm_chunk_size) "
    "computes it over completion positions only, lm_chunk_size positions at a time, without full logits.",
    "Normaliser: TRL's num_items_in_batch is counted by transformers from the collator's labels before it "
    "generates (the dataset's completion tokens), hf-distill's from the generated completions. The rows carry "
    "placeholder completions of max_new_tokens tokens (TRL would divide by 0 on prompt-only rows); neither trainer "
    "trains on them, they set TRL's normaliser. Compare loss_normaliser with completion_tokens in the results.",
    "Sampling: TRL generates with top_k=0 (no top-k filter); hf-distill's TransformersGenerator passes top_k=None, "
    "which transformers 5 fills with its default top_k=50, so our rollouts draw from the 50 likeliest tokens "
    "(a top-k over the vocabulary per generated token; a different distribution).",
    "Generation mode: TRL generates with the model in training mode (dropout is off in both: the student has none, "
    "and GKDConfig's disable_dropout); hf-distill switches to eval() for generation and back.",
    "Completion lengths are sampled: a step's cost follows the tokens generated, reported per variant "
    "(completion_tokens_per_row). An unhealed 10-layer student rarely stops early, so both usually reach "
    "max_new_tokens.",
    "TRL calls torch.cuda.empty_cache() after every loss (a no-op on CPU, a cost on GPU): kept, it is TRL's step.",
)


# ---- one measurement (in a fresh process) --------------------------------------------------------------------


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def _reset_peak(device: str) -> int:
    """Free what can be freed, reset the peak to now, and return the memory in use now (the baseline)."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:  # Linux 4.0+: resets VmHWM to VmRSS
        f.write("5")
    return _status_bytes("VmRSS")


def _peak(device: str) -> int:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_bytes("VmHWM")


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


class _TimedGenerator:
    """Wraps a :class:`hf_distill.generation.Generator`: seconds and completion tokens of each call."""

    def __init__(self, inner, device: str, calls: list[dict]):
        self.inner, self.device, self.calls = inner, device, calls

    def generate(self, model, prompt_input_ids, prompt_attention_mask, **kwargs):
        _sync(self.device)
        start = time.perf_counter()
        out = self.inner.generate(model, prompt_input_ids, prompt_attention_mask, **kwargs)
        _sync(self.device)
        self.calls.append(
            {
                "seconds": time.perf_counter() - start,
                "tokens": int(out.completion_mask.sum()),
                "rows": len(out.completion_mask),
            }
        )
        return out


def _timed_trl_generate(inner, device: str, calls: list[dict]):
    """TRL's ``generate_on_policy_outputs(model, inputs, generation_config)``, timed like :class:`_TimedGenerator`."""

    def generate_on_policy_outputs(model, inputs, generation_config):
        _sync(device)
        start = time.perf_counter()
        ids, attention_mask, labels = inner(model, inputs, generation_config)
        _sync(device)
        prompt_length = inputs["prompts"].shape[1]
        calls.append(
            {
                "seconds": time.perf_counter() - start,
                "tokens": int(attention_mask[:, prompt_length:].sum()),
                "rows": len(ids),
            }
        )
        return ids, attention_mask, labels

    return generate_on_policy_outputs


class TrlCollator:
    """The same batches as :class:`hf_distill.InstructionDataCollator`, under the names TRL's GKD reads: the
    left-padded prompts as ``prompts`` (and ``prompt_attention_mask``) beside ``input_ids``/``attention_mask``/
    ``labels``."""

    def __init__(self, pad_token_id: int):
        from hf_distill import InstructionDataCollator

        self.inner = InstructionDataCollator(pad_token_id)

    def __call__(self, features):
        batch = self.inner(features)
        batch["prompts"] = batch.pop("prompt_input_ids")
        return batch


def _common_args(settings: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """TrainingArguments both trainers share; the ones GKDConfig defaults otherwise are set explicitly."""
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=settings["batch"],
        gradient_accumulation_steps=1,
        max_steps=settings["steps"],
        learning_rate=settings["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=settings["seed"],
        data_seed=settings["seed"],
        logging_steps=settings["steps"],
        save_strategy="no",
        report_to="none",
        use_cpu=settings["device"] == "cpu",
        bf16=False,  # GKDConfig defaults to True; the models carry the dtype themselves
        fp16=False,
        gradient_checkpointing=False,  # GKDConfig defaults to True (and then generates without the KV cache)
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def measure(
    variant: str, student, teacher, tokenizer, train_dataset, settings: dict[str, Any], output_dir: str
) -> dict[str, Any]:
    """Train ``settings["steps"]`` steps of ``variant`` (:data:`OURS` or :data:`TRL`) in this process; its step
    times (first left out), generation times, completion tokens, every step's loss normaliser and loss, and the
    peak memory.

    ``settings``: ``steps``, ``batch``, ``learning_rate``, ``lmbda``, ``jsd_mixture``, ``temperature`` (sampling),
    ``max_new_tokens``, ``lm_chunk_size``, ``seed``, ``device``. ``train_dataset``: tokenized instruction rows
    (``prompt_input_ids``, ``completion_input_ids``)."""
    import torch
    from transformers import TrainerCallback

    device = settings["device"]
    ends: list[float] = []
    calls: list[dict] = []
    normalisers: list[float] = []
    losses: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            ends.append(time.perf_counter())

    common = _common_args(settings, output_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if variant == OURS:
        from hf_distill import DistillationConfig, DistillationTrainer

        config = DistillationConfig(
            **common,
            alpha=1.0,
            beta=0.0,
            kd_loss="jsd",
            jsd_mixture=settings["jsd_mixture"],
            temperature=1.0,  # TRL's loss is at T = 1 whatever its (sampling) temperature
            lmbda=settings["lmbda"],
            seq_kd=False,
            rollout_max_new_tokens=settings["max_new_tokens"],
            rollout_temperature=settings["temperature"],
            rollout_top_p=1.0,
            rollout_samples=0,  # TRL writes none
            lm_chunk_size=settings["lm_chunk_size"],
        )
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=config,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            callbacks=[StepEnds()],
        )
        trainer.rollouts.generator = _TimedGenerator(trainer.rollouts.generator, device, calls)
    elif variant == TRL:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        config = GKDConfig(
            **common,
            lmbda=settings["lmbda"],
            beta=settings["jsd_mixture"],
            temperature=settings["temperature"],
            max_new_tokens=settings["max_new_tokens"],
            seq_kd=False,
            disable_dropout=True,
        )
        trainer = GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=config,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            data_collator=TrlCollator(pad),
            callbacks=[StepEnds()],
        )
        trainer.generate_on_policy_outputs = _timed_trl_generate(
            trainer.generate_on_policy_outputs, device, calls
        )
    else:
        raise ValueError(f"variant={variant!r}; expected one of {VARIANTS}.")

    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        out = compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if model.training:
            normalisers.append(float(num_items_in_batch) if num_items_in_batch is not None else float("nan"))
            losses.append(float((out[0] if return_outputs else out).detach()))
        return out

    trainer.compute_loss = recording_compute_loss
    base = _reset_peak(device)
    _sync(device)
    ends.append(time.perf_counter())  # the first step runs from here to ends[1]; it is left out
    torch.manual_seed(settings["seed"])
    trainer.train()
    peak = _peak(device)
    steps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    if len(steps) != settings["steps"] or len(calls) != settings["steps"]:
        raise RuntimeError(
            f"{variant}: {len(steps)} steps and {len(calls)} generation calls in {settings['steps']} steps; "
            "lmbda < 1 or gradient accumulation breaks the one-generation-per-step timing."
        )
    return {
        "step_seconds": steps[1:],
        "generation_seconds": [c["seconds"] for c in calls][1:],
        "completion_tokens_per_row": [c["tokens"] / c["rows"] for c in calls][1:],
        "loss_normaliser": normalisers,  # every step's, the first included
        "losses": losses,  # every step's, the first included
        "prompt_tokens_per_row": statistics.mean(len(p) for p in train_dataset["prompt_input_ids"]),
        "peak_mib": (peak - base) / 2**20,
        "loaded_mib": base / 2**20,
    }


# ---- the offline setting: the application's teacher and prompts ------------------------------------------------


def offline_setup(settings: dict[str, Any], cache_dir: str):
    """``(student, teacher, tokenizer, train_dataset)``: the offline SmolLM2-135M-Instruct teacher (the application's
    loader), a student of ``student_layers`` of its layers, and ``steps * batch`` of the recipe's offline prompts
    tokenized with the chat template, each with a placeholder completion of ``max_new_tokens`` tokens."""
    from types import SimpleNamespace

    import torch

    from hf_distill import build_student, tokenize_instruction_dataset
    from hf_distill.language_modeling.instruct_data import offline_prompts
    from hf_distill.language_modeling.teacher import load_teacher

    script = SimpleNamespace(
        teacher_model_name_or_path="offline:smollm2-135m", teacher_gguf_file=None, cache_dir=cache_dir
    )
    teacher = load_teacher(script)
    dtype = getattr(torch, settings["dtype"])
    model = teacher.model.to(dtype)
    student = build_student(model, num_layers=settings["student_layers"])
    rows = max(settings["steps"] * settings["batch"], 3)
    prompts = offline_prompts(cache_dir, num_train=rows, num_eval=3, seed=42, max_source_chars=400)["train"]
    tokenized, _ = tokenize_instruction_dataset(
        prompts.select_columns(["messages"]), teacher.tokenizer, settings["max_prompt_length"], 0
    )
    return (
        student,
        model,
        teacher.tokenizer,
        with_placeholder_completions(tokenized, teacher.tokenizer, settings),
    )


def with_placeholder_completions(tokenized, tokenizer, settings: dict[str, Any]):
    """Each row's ``completion_input_ids``: ``max_new_tokens`` copies of the EOS id. Neither trainer trains on
    them (lmbda = 1 replaces them); TRL counts its loss normaliser from them (see :data:`CAVEATS`)."""
    eos = tokenizer.eos_token_id
    completion = [eos] * settings["max_new_tokens"]
    return tokenized.map(lambda row: {"completion_input_ids": completion})


def tiny_setup(settings: dict[str, Any]):
    """The same with tests/instruct_fixtures' tiny Llamas and word tokenizer: for the benchmark's test."""
    sys.path.insert(0, str(ROOT / "tests"))
    from datasets import Dataset
    from instruct_fixtures import WORDS, chat_tokenizer, tiny_llama

    from hf_distill import tokenize_instruction_dataset

    tokenizer = chat_tokenizer()
    rows = max(settings["steps"] * settings["batch"], 3)
    prompts = [
        {"prompt": " ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(2 + i % 4))} for i in range(rows)
    ]
    tokenized, _ = tokenize_instruction_dataset(
        Dataset.from_list(prompts), tokenizer, settings["max_prompt_length"], 0, chat_template_for_text=True
    )
    return (
        tiny_llama(1),
        tiny_llama(2),
        tokenizer,
        with_placeholder_completions(tokenized, tokenizer, settings),
    )


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = settings_of(args)
    if args.tiny:
        student, teacher, tokenizer, data = tiny_setup(settings)
    else:
        student, teacher, tokenizer, data = offline_setup(settings, args.cache_dir)
    output_dir = os.path.join(args.cache_dir, "bench_on_policy_trl", args.worker)
    result = measure(WORKER_NAMES[args.worker], student, teacher, tokenizer, data, settings, output_dir)
    return result | {"threads": torch.get_num_threads()}


# ---- rounds and the report ----------------------------------------------------------------------------------


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {
        name: getattr(args, name)
        for name in (
            "steps",
            "batch",
            "max_new_tokens",
            "max_prompt_length",
            "lmbda",
            "jsd_mixture",
            "temperature",
            "learning_rate",
            "student_layers",
            "lm_chunk_size",
            "dtype",
            "seed",
            "device",
        )  # fmt: skip
    }


def _spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """Per variant over its rounds: each round's median step time, then their median (min-max); generation's
    share (generation seconds / step seconds over all timed steps); peak memory (median over rounds)."""
    summary = {}
    for variant, rounds in runs.items():
        if not rounds:
            continue
        medians = [statistics.median(r["step_seconds"]) for r in rounds]
        step_total = sum(sum(r["step_seconds"]) for r in rounds)
        generation_total = sum(sum(r["generation_seconds"]) for r in rounds)
        tokens = [t for r in rounds for t in r["completion_tokens_per_row"]]
        summary[variant] = {
            "median_step_seconds": statistics.median(medians),
            "min_step_seconds": min(medians),
            "max_step_seconds": max(medians),
            "round_median_step_seconds": medians,
            "generation_share": generation_total / step_total,
            "median_generation_seconds": statistics.median(
                g for r in rounds for g in r["generation_seconds"]
            ),
            "peak_mib": statistics.median(r["peak_mib"] for r in rounds),
            "peak_mib_per_round": [r["peak_mib"] for r in rounds],
            "completion_tokens_per_row": statistics.mean(tokens),
            "loss_normaliser": statistics.mean(n for r in rounds for n in r["loss_normaliser"]),
            "timed_steps": sum(len(r["step_seconds"]) for r in rounds),
            "prompt_tokens_per_row": rounds[0]["prompt_tokens_per_row"],
        }
    return summary


def table(results: dict[str, Any]) -> str:
    settings, summary = results["settings"], results["summary"]
    prompt_tokens = next(iter(summary.values()))["prompt_tokens_per_row"]
    lines = [
        f"{settings['steps']} steps ({settings['steps'] - 1} timed) of {settings['batch']} prompts (mean "
        f"{prompt_tokens:.0f} tokens) x {settings['max_new_tokens']} new tokens per process, {results['rounds']} "
        f"rounds interleaved, {results['device']}, {settings['dtype']}, {results['threads']} threads; lmbda "
        f"{settings['lmbda']}, JSD mixture {settings['jsd_mixture']}, sampling T {settings['temperature']}, loss T 1; "
        f"load average (1 min) {results['load_average_1min']}. Median step time of each round, median (min-max):",
        "",
        "| trainer | median step (s) | generation (s) | generation share | peak memory above loaded (MiB) "
        "| completion tokens / row | loss normaliser / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in (v for v in VARIANTS if v in summary):
        v = summary[variant]
        steps = _spread(v["round_median_step_seconds"], "{:.2f}")
        peak = _spread(v["peak_mib_per_round"], "{:.0f}")
        lines.append(
            f"| {variant} | {steps} | {v['median_generation_seconds']:.2f} | {100 * v['generation_share']:.0f}% | "
            f"{peak} | {v['completion_tokens_per_row']:.1f} | {v['loss_normaliser']:.0f} |"
        )
    if results.get("ratios"):
        r = results["ratios"]
        lines += [
            "",
            f"hf-distill / TRL: step time {r['step_time_ours_over_trl']:.2f}x, peak memory "
            f"{r['peak_ours_over_trl']:.2f}x (goal: <= 1 and <= 1).",
        ]
    return "\n".join(lines)


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def results_of(args, runs: dict[str, list[dict]], loads: list, rounds_done: int) -> dict[str, Any]:
    import torch
    import transformers
    import trl

    summary = summarise(runs)
    ratios = {}
    if OURS in summary and TRL in summary:
        ratios = {
            "step_time_ours_over_trl": summary[OURS]["median_step_seconds"]
            / summary[TRL]["median_step_seconds"],
            "peak_ours_over_trl": summary[OURS]["peak_mib"] / summary[TRL]["peak_mib"],
        }
    threads = sorted({r["threads"] for rounds in runs.values() for r in rounds})
    return {
        "settings": settings_of(args),
        "device": args.device,
        "tiny": args.tiny,
        "threads": threads[0] if len(threads) == 1 else threads,
        "rounds": rounds_done,
        "load_average_1min": [load[0] for load in loads],
        "load_average_1_5_15_between_rounds": loads,
        "cpu_count": os.cpu_count(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
        },
        "summary": summary,
        "ratios": ratios,
        "goal": "our on-policy step no slower than TRL's, at no more memory (issue 22, item 6)",
        "caveats": list(CAVEATS),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="1 round, 3 steps, 2 rows, 8 new tokens: checks it runs."
    )
    parser.add_argument(
        "--tiny", action="store_true", help="Tiny in-process models (tests' fixtures), no GGUF."
    )
    parser.add_argument("--steps", type=int, default=6, help="Steps per process; the first is left out.")
    parser.add_argument(
        "--rounds", type=int, default=3, help="Interleaved rounds; one fresh process per variant."
    )
    parser.add_argument("--batch", type=int, default=4, help="Prompts per step (the recipe's batch).")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="The recipe's rollout length.")
    parser.add_argument("--max_prompt_length", type=int, default=192)
    parser.add_argument("--lmbda", type=float, default=1.0, help="Must be 1: every step generates in both.")
    parser.add_argument("--jsd_mixture", type=float, default=0.5, help="TRL beta = our jsd_mixture.")
    parser.add_argument("--temperature", type=float, default=0.9, help="Sampling temperature of both.")
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--student_layers", type=int, default=10)
    parser.add_argument("--lm_chunk_size", type=int, default=1024, help="Ours only (the fused loss's chunk).")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per process (0: torch's default)."
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--variants", nargs="+", default=list(WORKER_NAMES), choices=list(WORKER_NAMES))
    parser.add_argument(
        "--cache_dir", default=os.environ.get("HF_DISTILL_CACHE", str(Path.home() / ".cache/hf_distill"))
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON file written.")
    parser.add_argument("--worker", default=None, choices=list(WORKER_NAMES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.steps, args.batch, args.max_new_tokens = 1, 3, 2, 8
    if args.lmbda != 1.0 or args.steps < 2:
        parser.error(
            "--lmbda must be 1.0 (one generation per timed step) and --steps at least 2 (the first is left out)."
        )
    if args.worker:
        return worker(args)

    shared = [f"--{name}={getattr(args, name)}" for name in (*settings_of(args), "threads", "cache_dir")] + (
        ["--tiny"] if args.tiny else []
    )
    runs: dict[str, list[dict]] = {WORKER_NAMES[v]: [] for v in args.variants}
    loads = [_load()]
    env = os.environ | WORKER_ENV | {"PYTHONPATH": str(ROOT)}
    for r in range(args.rounds):
        shift = r % len(args.variants)
        for key in args.variants[shift:] + args.variants[:shift]:
            done = subprocess.run(
                [sys.executable, __file__, f"--worker={key}", *shared],
                capture_output=True,
                text=True,
                env=env,
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"{WORKER_NAMES[key]} failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
                )
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            runs[WORKER_NAMES[key]].append(measured | {"load_1min": _load()[0]})
            print(
                f"round {r} {WORKER_NAMES[key]:32s} step {statistics.median(measured['step_seconds']):7.2f} s  "
                f"generation {sum(measured['generation_seconds']) / sum(measured['step_seconds']):4.0%}  "
                f"peak {measured['peak_mib']:8.1f} MiB",
                flush=True,
            )
        loads.append(_load())
        results = results_of(args, runs, loads, r + 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")  # after every round: a long run keeps them
    print()
    print(table(results))
    return results


if __name__ == "__main__":
    result = main()
    if any(a.startswith("--worker") for a in sys.argv):
        print(json.dumps(result))
