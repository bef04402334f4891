"""Benchmark of the teacher-logit cache, side by side in one run on one machine.

1. Training step time of the same student, same batches: plain fine-tuning (``Trainer``, hard
   labels), ``DistillationTrainer`` reading cached teacher logits, and ``DistillationTrainer`` with the
   live teacher. Rounds are interleaved so that load from other processes hits every variant alike;
   a step's time is the wall time between consecutive ``on_step_end`` callbacks (collation included).
   Goal: cached within 5% of plain fine-tuning.
2. Precompute throughput: ``precompute_teacher_logits`` (length-sorted batches under a token budget,
   written to a ``datasets`` cache) against a naive loop (original order, every example padded to
   ``max_length``, fixed batch size) with the same peak padded tokens per batch.

Synthetic data: random token ids with log-normal lengths (median ~30 tokens, clipped to
``max_length``), like short sentence(-pair) classification data. Run:

    python benchmarks/bench_teacher_cache.py            # ~3-5 minutes on one CPU core

(One thread by default: with two OpenMP threads on two cores that other processes also use, steps
ran 5-8x slower and far noisier here.)
    python benchmarks/bench_teacher_cache.py --device cuda --autocast_dtype bfloat16 --num_examples 20000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
from datasets import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_distill import DistillationConfig, DistillationTrainer
from hf_distill.teacher_cache import precompute_teacher_logits

VOCAB_SIZE = 2000
NUM_LABELS = 3


class StepTimer(TrainerCallback):
    """Wall and process CPU time between consecutive optimizer steps (data loading and collation included).

    CPU time (all threads of this process) is less sensitive than wall time to other processes
    competing for the cores."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._last: tuple[float, float] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = (time.perf_counter(), time.process_time())
        self.wall.append(now[0] - self._last[0])
        self.cpu.append(now[1] - self._last[1])
        self._last = now


def make_dataset(n: int, max_length: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(30), 0.6, n).astype(int), 4, max_length)
    ids = [[2, *rng.integers(5, VOCAB_SIZE, length - 2).tolist(), 3] for length in lengths]
    return Dataset.from_dict(
        {
            "input_ids": ids,
            "attention_mask": [[1] * len(x) for x in ids],
            "labels": rng.integers(0, NUM_LABELS, n),
        }
    )


def bert(hidden: int, layers: int, seed: int, max_length: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 2),
        intermediate_size=4 * hidden,
        max_position_embeddings=max_length,
        num_labels=NUM_LABELS,
    )
    return BertForSequenceClassification(config)


def tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB_SIZE)}, unk_token="w1"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0")


def time_training(kind: str, student_state, args, dataset, cached, teacher, tok, out_dir) -> StepTimer:
    student = bert(args.student_hidden, args.student_layers, 0, args.max_length)
    student.load_state_dict(student_state)
    common = dict(
        output_dir=out_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=1e-4,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        seed=0,
        data_seed=0,
        use_cpu=args.device == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    timer = StepTimer()
    if kind == "plain":
        trainer = Trainer(
            model=student,
            args=TrainingArguments(**common),
            train_dataset=dataset,
            data_collator=DataCollatorWithPadding(tok),
            callbacks=[timer],
        )
    else:
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher if kind == "live" else None,
            args=DistillationConfig(**common, temperature=2.0, alpha=0.5, beta=0.5),
            train_dataset=cached if kind == "cached" else dataset,
            processing_class=tok,
            callbacks=[timer],
        )
    trainer.train()
    timer.wall, timer.cpu = timer.wall[args.warmup_steps :], timer.cpu[args.warmup_steps :]
    return timer


@torch.inference_mode()
def naive_precompute(
    teacher, dataset: Dataset, max_length: int, batch_size: int, device: str, autocast
) -> list:
    """Original order, every example padded to max_length, fixed batch size."""
    rows = []
    for start in range(0, len(dataset), batch_size):
        batch = dataset[start : start + batch_size]["input_ids"]
        ids = torch.zeros(len(batch), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(batch):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
            logits = teacher(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        rows.extend(logits.float().cpu().numpy().astype(np.float16))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--num_examples", type=int, default=1024, help="Rows precomputed (part 2).")
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument(
        "--batch_size", type=int, default=32, help="Training batch and naive precompute batch."
    )
    parser.add_argument("--steps", type=int, default=16, help="Training steps per round.")
    parser.add_argument(
        "--warmup_steps", type=int, default=4, help="Steps of each round left out of the timing."
    )
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds of each training variant.")
    parser.add_argument("--student_hidden", type=int, default=128)
    parser.add_argument("--student_layers", type=int, default=2)
    parser.add_argument("--teacher_hidden", type=int, default=256)
    parser.add_argument("--teacher_layers", type=int, default=4)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: stable when other processes share the cores).",
    )
    parser.add_argument("--autocast_dtype", default=None, choices=["bfloat16", "float16"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    autocast = getattr(torch, args.autocast_dtype) if args.autocast_dtype else None

    tok = tokenizer()
    teacher = bert(args.teacher_hidden, args.teacher_layers, 1, args.max_length).to(args.device).eval()
    student_state = bert(args.student_hidden, args.student_layers, 0, args.max_length).state_dict()
    print(f"device={args.device} torch threads={torch.get_num_threads()} teacher={args.teacher_hidden}x"
          f"{args.teacher_layers} student={args.student_hidden}x{args.student_layers}")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        # ---- 2. precompute throughput (first: it also builds the cache that part 1 trains from) ----
        dataset = make_dataset(args.num_examples, args.max_length)
        tokens = sum(len(x) for x in dataset["input_ids"])
        budget = args.batch_size * args.max_length  # the naive loop's padded tokens per batch
        naive_precompute(
            teacher, dataset.select(range(args.batch_size)), args.max_length, 8, args.device, autocast
        )
        start = time.perf_counter()
        naive = naive_precompute(teacher, dataset, args.max_length, args.batch_size, args.device, autocast)
        naive_s = time.perf_counter() - start
        start = time.perf_counter()
        cached = precompute_teacher_logits(
            teacher,
            dataset,
            tokenizer=tok,
            cache_dir=tmp,
            max_batch_tokens=budget,
            autocast_dtype=args.autocast_dtype,
        )
        sorted_s = time.perf_counter() - start
        diff = np.abs(
            np.stack(naive).astype(np.float32) - np.array(cached["teacher_logits"], dtype=np.float32)
        )
        print(f"\nprecompute, {len(dataset)} examples, {tokens / len(dataset):.1f} tokens/example, "
              f"{budget} padded tokens per batch at most:")  # fmt: skip
        print(f"  naive fixed padding : {len(dataset) / naive_s:9.1f} examples/s ({naive_s:.2f} s)")
        print(
            f"  length-sorted cache : {len(dataset) / sorted_s:9.1f} examples/s ({sorted_s:.2f} s, arrow write included)"
        )
        print(f"  speed-up            : {naive_s / sorted_s:.2f}x   (max |logit diff| {diff.max():.2e})")
        start = time.perf_counter()
        precompute_teacher_logits(teacher, dataset, tokenizer=tok, cache_dir=tmp, max_batch_tokens=budget,
                                  autocast_dtype=args.autocast_dtype)  # fmt: skip
        print(f"  second call (cache hit): {time.perf_counter() - start:.3f} s")

        # ---- 1. training step time: plain vs cached vs live, interleaved rounds ----
        train_rows = min(args.batch_size * args.steps, len(dataset))
        plain_ds, cached_ds = dataset.select(range(train_rows)), cached.select(range(train_rows))
        wall: dict[str, list[float]] = {"plain": [], "cached": [], "live": []}
        cpu: dict[str, list[float]] = {kind: [] for kind in wall}
        for round_ in range(args.rounds):  # alternate the order so no variant always runs first
            for kind in list(wall)[:: 1 if round_ % 2 == 0 else -1]:
                timer = time_training(kind, student_state, args, plain_ds, cached_ds, teacher, tok, tmp)
                wall[kind] += timer.wall
                cpu[kind] += timer.cpu
        print(
            f"\ntraining step time, batch {args.batch_size}, median of {len(wall['plain'])} steps per variant:"
        )
        labels = {"plain": "plain fine-tuning", "cached": "cached teacher logits", "live": "live teacher"}
        for name, times in (("wall", wall), ("cpu", cpu)):
            median = {kind: statistics.median(t) for kind, t in times.items()}
            for kind, label in labels.items():
                print(f"  {name:4s} {label:22s}: {1000 * median[kind]:8.1f} ms/step   "
                      f"ratio to plain {median[kind] / median['plain']:.3f}")  # fmt: skip
            verdict = "within" if median["cached"] <= 1.05 * median["plain"] else "NOT within"
            print(f"  {name:4s} cached / plain = {median['cached'] / median['plain']:.3f} ({verdict} the 5% goal); "
                  f"live / cached = {median['live'] / median['cached']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
