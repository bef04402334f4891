"""GPU benchmark of hf-distill at BERT-base scale, every variant side by side in one run.

1. **Training steps**, rounds interleaved so that any drift hits every variant alike, at batch 32
   and 128, in bf16 on CUDA: a hand-written plain loop, a hand-written live-KD loop (student forward
   and backward, teacher forward, under autocast, fused AdamW; the teacher held in bf16),
   ``Trainer`` plain, ``DistillationTrainer`` with the live teacher and with cached logits. Median
   step time (wall time between optimizer steps, data loading included) and peak memory of each.
2. **Precompute**: ``precompute_teacher_logits`` (length-sorted batches under a token budget,
   written to a ``datasets`` cache) against a naive loop (original order, every row padded to
   ``max_length``, fixed batch), in examples/s and useful TFLOP/s
   (``2 x non-embedding parameters x real tokens / s``: padding is not useful work).
3. **Ceiling**: the same precompute around a teacher that costs nothing (its forward is a table
   lookup), for sequence classification, token classification and top-k masked LM: the rate the
   framework around the teacher allows, which a real teacher can only approach.

Synthetic data: random token ids with log-normal lengths (mean ~45 tokens, clipped to 128); the
teacher is BERT-base shaped with random weights (its head scaled so its soft labels have spread),
the student ``build_student``'s 6 layers. Results go to ``<out>/gpu.json`` (``gpu_tiny.json``).

    python benchmarks/bench_gpu.py                  # one H100/H200: about 3 minutes
    python benchmarks/bench_gpu.py --tiny           # CPU smoke test at toy sizes: seconds
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.modeling_outputs import MaskedLMOutput, SequenceClassifierOutput, TokenClassifierOutput

from hf_distill import DistillationConfig, DistillationTrainer, build_student, precompute_teacher_logits

NUM_LABELS = 3
MAX_LENGTH = 128
TEMPERATURE = 2.0
VARIANTS = ("hand_plain", "hand_live", "trainer_plain", "dt_live", "dt_cached")


@dataclasses.dataclass
class Scale:
    vocab: int = 30522
    hidden: int = 768
    layers: int = 12
    batch_sizes: tuple[int, ...] = (32, 128)
    steps: int = 50
    warmup: int = 10
    rounds: int = 2
    precompute_rows: int = 100_000
    naive_batch: int = 256
    budgets: tuple[int, ...] = (16384, 65536)
    ceiling_rows: int = 100_000


TINY = Scale(
    vocab=500,
    hidden=32,
    layers=2,
    batch_sizes=(8, 16),
    steps=4,
    warmup=1,
    rounds=1,
    precompute_rows=512,
    naive_batch=64,
    budgets=(2048,),
    ceiling_rows=4000,
)


class Device:
    def __init__(self, name: str):
        self.name, self.cuda = name, name == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None


# ---- data and models ------------------------------------------------------------------------------


def tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w1"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0")


def make_dataset(n: int, vocab: int, seed: int = 0) -> Dataset:
    """``n`` rows of random ids, [CLS] ... [SEP]-framed, log-normal lengths; built column-wise."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(40), 0.5, n).astype(np.int64), 8, MAX_LENGTH)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    ids = rng.integers(5, vocab, int(lengths.sum()))
    ids[offsets.to_numpy()[:-1]], ids[offsets.to_numpy()[1:] - 1] = 2, 3
    return Dataset.from_dict(
        {
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids)),
            "attention_mask": pa.ListArray.from_arrays(offsets, pa.array(np.ones(len(ids), np.int64))),
            "labels": rng.integers(0, NUM_LABELS, n),
        }
    )


def make_teacher(scale: Scale) -> BertForSequenceClassification:
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=scale.vocab,
        hidden_size=scale.hidden,
        num_hidden_layers=scale.layers,
        num_attention_heads=max(scale.hidden // 64, 2),
        intermediate_size=4 * scale.hidden,
        max_position_embeddings=512,
        num_labels=NUM_LABELS,
    )
    teacher = BertForSequenceClassification(config).eval()
    with torch.no_grad():  # a random head gives near-uniform soft labels: give them a spread
        teacher.classifier.weight.mul_(100.0)
    return teacher


def non_embedding_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name)


# ---- 1. training steps ----------------------------------------------------------------------------


class StepTimer(TrainerCallback):
    def __init__(self, device: Device):
        self.device, self.times, self._last = device, [], None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._last is None:
            self.device.sync()
            self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.device.sync()
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now


def _training_args(out_dir: str, batch: int, scale: Scale, device: Device) -> dict:
    return dict(
        output_dir=out_dir,
        per_device_train_batch_size=batch,
        max_steps=scale.steps,
        learning_rate=5e-5,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        seed=0,
        data_seed=0,
        bf16=device.cuda,
        use_cpu=not device.cuda,
        disable_tqdm=True,
        dataloader_num_workers=2 if device.cuda else 0,
        dataloader_pin_memory=device.cuda,
    )


def run_trainer(kind, teacher, student_state, data, cached, tok, batch, scale, device, out_dir):
    student = build_student(teacher, num_layers=scale.layers // 2)
    student.load_state_dict(student_state)
    timer = StepTimer(device)
    common = _training_args(out_dir, batch, scale, device)
    if kind == "trainer_plain":
        trainer = Trainer(
            model=student,
            args=TrainingArguments(**common),
            train_dataset=data,
            data_collator=DataCollatorWithPadding(tok),
            callbacks=[timer],
        )
    else:
        trainer = DistillationTrainer(
            model=student,
            # A copy: the trainer casts its teacher to bf16 and wraps its forward in place.
            teacher_model=copy.deepcopy(teacher) if kind == "dt_live" else None,
            args=DistillationConfig(**common, temperature=TEMPERATURE, alpha=0.5, beta=0.5),
            train_dataset=cached if kind == "dt_cached" else data,
            processing_class=tok,
            callbacks=[timer],
        )
    device.reset_peak()
    trainer.train()
    return timer.times[scale.warmup :], device.peak_gib()


def run_hand(kind, teacher, student_state, data, tok, batch, scale, device):
    """The floor: a plain PyTorch loop, bf16 autocast, fused AdamW, the same batches."""
    student = build_student(teacher, num_layers=scale.layers // 2)
    student.load_state_dict(student_state)
    student.to(device.name).train()
    live = None
    if kind == "hand_live":
        live = copy.deepcopy(teacher).to(device.name, torch.bfloat16 if device.cuda else torch.float32)
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-5, fused=device.cuda)
    loader = torch.utils.data.DataLoader(
        data.with_format(columns=["input_ids", "attention_mask", "labels"]),
        batch_size=batch,
        shuffle=True,
        collate_fn=DataCollatorWithPadding(tok),
        num_workers=2 if device.cuda else 0,
        pin_memory=device.cuda,
    )
    batches = iter(loader)
    device.reset_peak()
    device.sync()
    times, last = [], time.perf_counter()
    for _ in range(scale.steps):
        inputs = {k: v.to(device.name, non_blocking=True) for k, v in next(batches).items()}
        with torch.autocast(device.name, dtype=torch.bfloat16, enabled=device.cuda):
            out = student(**inputs)
            loss = out.loss
            if live is not None:
                with torch.no_grad():
                    t = live(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
                kd = F.kl_div(
                    F.log_softmax(out.logits.float() / TEMPERATURE, -1),
                    F.log_softmax(t.float() / TEMPERATURE, -1),
                    log_target=True,
                    reduction="batchmean",
                )
                loss = 0.5 * kd * TEMPERATURE**2 + 0.5 * loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        device.sync()
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times[scale.warmup :], device.peak_gib()


def bench_steps(teacher, data, cached, tok, scale, device, out_dir) -> dict:
    student_state = build_student(teacher, num_layers=scale.layers // 2).state_dict()
    results = {}
    for batch in scale.batch_sizes:
        rows = min(batch * scale.steps, len(data))
        d, c = data.select(range(rows)), cached.select(range(rows))
        times: dict[str, list[float]] = {k: [] for k in VARIANTS}
        peaks: dict[str, float | None] = {}
        for round_ in range(scale.rounds):
            for kind in VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]:
                if kind.startswith("hand"):
                    t, peak = run_hand(kind, teacher, student_state, d, tok, batch, scale, device)
                else:
                    t, peak = run_trainer(
                        kind, teacher, student_state, d, c, tok, batch, scale, device, out_dir
                    )
                times[kind] += t
                peaks[kind] = peak if peaks.get(kind) is None else max(peaks[kind], peak)
        ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
        results[f"batch_{batch}"] = {
            "median_ms": ms,
            "peak_memory_gib": peaks,
            "dt_cached/trainer_plain": ms["dt_cached"] / ms["trainer_plain"],
            "dt_live/hand_live": ms["dt_live"] / ms["hand_live"],
            "trainer_plain/hand_plain": ms["trainer_plain"] / ms["hand_plain"],
            "hand_live/hand_plain": ms["hand_live"] / ms["hand_plain"],
            "steps_timed_per_variant": len(times["hand_plain"]),
        }
        print(f"steps, batch {batch}:", json.dumps(results[f"batch_{batch}"], indent=1), flush=True)
    return results


# ---- 2. precompute ----------------------------------------------------------------------------------


@torch.inference_mode()
def naive_precompute(teacher, data: Dataset, batch: int, device: Device) -> np.ndarray:
    """Original order, every row padded to MAX_LENGTH, a fixed batch size, per-row Python."""
    out = []
    for start in range(0, len(data), batch):
        rows = data[start : start + batch]["input_ids"]
        ids = torch.zeros(len(rows), MAX_LENGTH, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        with torch.autocast(device.name, dtype=torch.bfloat16, enabled=device.cuda):
            logits = teacher(input_ids=ids.to(device.name), attention_mask=mask.to(device.name)).logits
        out.append(logits.float().cpu().numpy().astype(np.float16))
    return np.concatenate(out)


def bench_precompute(teacher, data, tok, scale, device, cache_dir) -> tuple[dict, Dataset]:
    tokens = int(np.diff(data.data.column("input_ids").combine_chunks().offsets.to_numpy()).sum())
    flop = 2 * non_embedding_params(teacher) * tokens
    autocast = "bfloat16" if device.cuda else None
    naive_precompute(teacher, data.select(range(min(512, len(data)))), scale.naive_batch, device)  # warm-up
    device.sync()
    start = time.perf_counter()
    naive = naive_precompute(teacher, data, scale.naive_batch, device)
    naive_s = time.perf_counter() - start
    seconds, cached = {}, None
    for budget in scale.budgets:
        start = time.perf_counter()
        cached = precompute_teacher_logits(
            teacher, data, tokenizer=tok, cache_dir=f"{cache_dir}/{budget}", autocast_dtype=autocast,
            max_batch_tokens=budget,
        )  # fmt: skip
        device.sync()
        seconds[budget] = time.perf_counter() - start
    stored = np.asarray(cached.with_format("numpy")["teacher_logits"], dtype=np.float32)
    n = len(data)
    results = {
        "examples": n,
        "mean_tokens": tokens / n,
        "naive": {"batch": scale.naive_batch, "examples_per_s": n / naive_s, "useful_tflops": flop / naive_s / 1e12},
        **{
            f"cache_budget_{b}": {"examples_per_s": n / s, "useful_tflops": flop / s / 1e12}
            for b, s in seconds.items()
        },
        "best_cache/naive": naive_s / min(seconds.values()),
        "max_abs_diff_cache_vs_naive": float(np.abs(stored - naive.astype(np.float32)).max()),
        "argmax_agree": float((stored.argmax(1) == naive.argmax(1)).mean()),
    }  # fmt: skip
    print("precompute:", json.dumps(results, indent=1), flush=True)
    return results, cached


# ---- 3. ceiling: a teacher that costs nothing -------------------------------------------------------


# The near-free masked LM's vocabulary and k: small, so that its outputs cost little to make too.
FREE_VOCAB, FREE_TOP_K = 128, 8


def free_teacher(kind: str, device: Device) -> tuple[torch.nn.Module, dict]:
    """A teacher of the given head whose forward is a table lookup (its outputs have the real shapes)."""
    small = dict(vocab_size=FREE_VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
    small.update(intermediate_size=8, num_labels=NUM_LABELS)
    classes = {
        "sequence_classification": (BertForSequenceClassification, SequenceClassifierOutput, NUM_LABELS, {}),
        "token_classification": (BertForTokenClassification, TokenClassifierOutput, NUM_LABELS, {}),
        "masked_lm_top_k": (BertForMaskedLM, MaskedLMOutput, FREE_VOCAB, {"top_k": FREE_TOP_K}),
    }
    model_class, output_class, width, kwargs = classes[kind]
    model = model_class(BertConfig(**small)).to(device.name).eval()
    table = torch.randn(FREE_VOCAB, width, generator=torch.Generator().manual_seed(0)).to(device.name)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None):
        logits = table[input_ids % FREE_VOCAB]
        return output_class(logits=logits[:, 0] if output_class is SequenceClassifierOutput else logits)

    model.forward = types.MethodType(forward, model)
    return model, kwargs


def bench_ceiling(scale, device, cache_dir) -> dict:
    data = make_dataset(scale.ceiling_rows, scale.vocab, seed=1).remove_columns("labels")
    tokens = int(np.diff(data.data.column("input_ids").combine_chunks().offsets.to_numpy()).sum())
    results = {"examples": len(data), "mean_tokens": tokens / len(data), "max_batch_tokens": 65536}
    results["masked_lm"] = {"vocab": FREE_VOCAB, "top_k": FREE_TOP_K}
    for kind in ("sequence_classification", "token_classification", "masked_lm_top_k"):
        teacher, kwargs = free_teacher(kind, device)
        start = time.perf_counter()
        precompute_teacher_logits(
            teacher, data, cache_dir=f"{cache_dir}/free_{kind}", max_batch_tokens=65536, **kwargs
        )
        seconds = time.perf_counter() - start
        results[kind] = {"examples_per_s": len(data) / seconds, "tokens_per_s": tokens / seconds}
    print("ceiling (near-free teacher):", json.dumps(results, indent=1), flush=True)
    return results


# ---- main -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="Toy sizes on CPU: a smoke test.")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="Folder of the JSON.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs).")
    parser.add_argument("--skip", nargs="*", default=[], choices=["steps", "precompute", "ceiling"])
    parser.add_argument("--ceiling_rows", type=int, default=None, help="Rows of the ceiling run.")
    args = parser.parse_args(argv)
    if "precompute" in args.skip and "steps" not in args.skip:
        parser.error("the steps train from the precomputed cache: --skip precompute needs --skip steps too")
    scale = TINY if args.tiny else Scale()
    if args.ceiling_rows:
        scale = dataclasses.replace(scale, ceiling_rows=args.ceiling_rows)
    device = Device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if not device.cuda:
        torch.set_num_threads(args.threads)
    results = {
        "device": torch.cuda.get_device_name(0) if device.cuda else "cpu",
        "torch": torch.__version__,
        "scale": "tiny" if args.tiny else "bert-base",
        "cpu_threads": None if device.cuda else torch.get_num_threads(),
    }
    tok = tokenizer(scale.vocab)
    teacher = make_teacher(scale).to(device.name)
    results["teacher_non_embedding_params"] = non_embedding_params(teacher)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(scale.precompute_rows, scale.vocab)
        if "precompute" not in args.skip:
            results["precompute"], cached = bench_precompute(teacher, data, tok, scale, device, tmp)
        if "steps" not in args.skip:
            results["steps"] = bench_steps(teacher, data, cached, tok, scale, device, f"{tmp}/out")
        if "ceiling" not in args.skip:
            results["ceiling"] = bench_ceiling(scale, device, tmp)
    results["total_s"] = time.perf_counter() - start
    name = "gpu_tiny" if args.tiny else "gpu"
    ran = [section for section in ("precompute", "steps", "ceiling") if section not in args.skip]
    out = Path(args.out) / (f"{name}_{'_'.join(ran)}.json" if args.skip else f"{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written to {out} ({results['total_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
