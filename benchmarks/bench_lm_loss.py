"""Peak memory and time of a language model's KD + CE loss, forward and backward: dense vs chunked.

Dense is what a trainer does without :func:`hf_distill.losses.chunked_lm_losses`: the student's
logits ``h @ W.T`` for every position (and the live teacher's likewise, without grad), then the
library's dense loss (``kl_div_loss``, ``topk_kl_div_loss``, or RS-KD written densely) plus
``F.cross_entropy``, then ``backward()``. Chunked is ``chunked_lm_losses`` on the same tensors, its
``loss`` (KD + CE, the weights given once) backpropagated.

Sizes default to a batch of 8 x 1,024 tokens with SmolLM2-135M's width and vocabulary (D = 576,
V = 49,152), float32 on CPU; the teacher has the same width. Every measurement runs in a fresh
subprocess (``MALLOC_MMAP_THRESHOLD_=1048576``, see ``WORKER_ENV``): it builds the inputs, runs the
variant once on tiny inputs (warm-up), hands freed heap memory back (``malloc_trim``) and resets
the peak resident size, runs the variant once at full
size, and reports the peak resident size minus the resident size before the call (the peak memory
of the loss above its inputs; ``VmHWM - VmRSS`` from ``/proc/self/status``) and the call's time. Rounds interleave the
variants in a rotating order, so that load from other processes hits each alike; times are the
median over rounds (wall, and the process's CPU time, which other processes disturb less), and
the load average is recorded beside them. Goal (issue 16): chunked peak
at most 20% of dense, at no more than 1.2x its time.

    python benchmarks/bench_lm_loss.py                # ~15-25 min on one shared CPU core
    python benchmarks/bench_lm_loss.py --small        # seconds: 2 x 256 tokens, V = 4,096
    python benchmarks/bench_lm_loss.py --device cuda  # peak from torch.cuda.max_memory_allocated

Results: ``benchmarks/results/lm_loss.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

VARIANTS = (
    "dense_kl",
    "chunked_kl",
    "dense_topk",
    "chunked_topk",
    "dense_sampled",
    "chunked_sampled",
)
PAIRS = {"kl": ("dense_kl", "chunked_kl"), "topk": ("dense_topk", "chunked_topk")}
PAIRS["sampled"] = ("dense_sampled", "chunked_sampled")
RESULTS = Path(__file__).parent / "results" / "lm_loss.json"
PACKAGE = Path(__file__).resolve().parent.parent / "hf_distill"
# glibc serves every block of 1 MiB or more with its own mmap and unmaps it when freed, so the resident
# size follows the tensors alive. Left to itself, it raises that threshold as blocks are freed and serves
# later blocks from a heap whose freed pages stay resident: the peak then depends on the history.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


def _losses() -> types.ModuleType:
    """``hf_distill.losses``; in a worker, without the package's ``__init__``, which imports transformers
    (15-20 s per fresh process on the loaded CPU here, for nothing the loss uses)."""
    if "hf_distill" not in sys.modules:
        package = types.ModuleType("hf_distill")
        package.__path__ = [str(PACKAGE)]
        sys.modules["hf_distill"] = package
    return importlib.import_module("hf_distill.losses")


def dense_inputs(n: int, dim: int, vocab: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random hidden states and heads of a student and a live teacher, and labels, drawn from ``g`` (on CPU)."""
    return {
        "hidden": torch.randn(n, dim, generator=g) * 0.5,
        "head": torch.randn(vocab, dim, generator=g) * 0.1,
        "teacher_hidden": torch.randn(n, dim, generator=g) * 0.5,
        "teacher_head": torch.randn(vocab, dim, generator=g) * 0.1,
        "labels": torch.randint(0, vocab, (n,), generator=g),
    }


def make_inputs(n: int, dim: int, vocab: int, k: int, num_samples: int, device: str, seed: int = 0) -> dict:
    """Hidden states, heads, labels and both sparse caches (from the teacher's logits, in blocks)."""
    g = torch.Generator().manual_seed(seed)
    losses = _losses()
    x = dense_inputs(n, dim, vocab, g)
    topk_ids, topk_values, sampled_ids, sampled_counts = [], [], [], []
    for start in range(0, n, 64):  # the teacher's logits in small blocks, not to raise the baseline
        logits = x["teacher_hidden"][start : start + 64] @ x["teacher_head"].T
        top = logits.topk(k, dim=-1)
        topk_ids.append(top.indices)
        topk_values.append(top.values)
        ids, counts = losses.sample_teacher_tokens(logits, num_samples, 1.0, generator=g)
        sampled_ids.append(ids)
        sampled_counts.append(counts)
    x |= {
        "topk_ids": torch.cat(topk_ids),
        "topk_values": torch.cat(topk_values),
        "sampled_ids": torch.cat(sampled_ids),
        "sampled_counts": torch.cat(sampled_counts),
    }
    return {name: t.to(device) for name, t in x.items()}


def run_variant(variant: str, x: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward and backward of ``variant``'s KD + CE loss; returns the gradients w.r.t. hidden and head."""
    losses = _losses()
    hidden = x["hidden"].detach().requires_grad_()
    head = x["head"].detach().requires_grad_()
    kd = variant.split("_")[1]
    if variant.startswith("dense"):
        logits = hidden @ head.T
        if kd == "kl":
            with torch.no_grad():
                teacher_logits = x["teacher_hidden"] @ x["teacher_head"].T
            kd_value = losses.kl_div_loss(logits, teacher_logits)
        elif kd == "topk":
            kd_value = losses.topk_kl_div_loss(logits, x["topk_values"], x["topk_ids"])
        else:  # RS-KD, densely: -sum_j (c_j / n) log p_s[id_j]
            counts = x["sampled_counts"].float()
            log_p = F.log_softmax(logits, dim=-1).gather(-1, x["sampled_ids"])
            kd_value = -(counts / counts.sum(-1, keepdim=True) * log_p).sum(-1).mean()
        loss = kd_value + F.cross_entropy(logits, x["labels"])
    else:
        sparse = {"topk": ("topk_ids", "topk_values"), "sampled": ("sampled_ids", "sampled_counts")}.get(kd)
        loss = losses.chunked_lm_losses(
            hidden,
            head,
            kd=kd,
            teacher_hidden=x["teacher_hidden"] if kd == "kl" else None,
            teacher_head=x["teacher_head"] if kd == "kl" else None,
            teacher_ids=x[sparse[0]] if sparse else None,
            teacher_values=x[sparse[1]] if sparse else None,
            labels=x["labels"],
            chunk_size=x["chunk_size"],
        ).loss
    loss.backward()
    return hidden.grad, head.grad


def _status_bytes(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, from ``/proc/self/status``."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def _reset_peak_resident() -> int:
    """Give freed heap memory back to the system, reset the peak resident size to now, return now.

    Without ``malloc_trim``, memory freed while the inputs were built stays resident and the loss's
    blocks reuse it without the resident size growing; without the reset, the peak of building the
    inputs would hide the loss's peak. (Linux 4.0+: writing 5 to ``/proc/self/clear_refs``.)"""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def worker(args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process: warm up on tiny inputs, then peak and time at full size."""
    torch.set_num_threads(args.threads)
    device = args.device
    tiny = make_inputs(64, 16, 256, args.k, args.num_samples, device) | {"chunk_size": 16}
    run_variant(args.worker, tiny)
    x = make_inputs(args.tokens, args.dim, args.vocab, args.k, args.num_samples, device)
    x["chunk_size"] = args.chunk_size
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak_resident()
    start, cpu_start = time.perf_counter(), time.process_time()
    run_variant(args.worker, x)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_bytes("VmHWM") - base
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "peak_bytes": peak,
    }


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def summarise(args: argparse.Namespace, runs: dict[str, list[dict]], loads: list, rounds_done: int) -> dict:
    """Medians (min-max) over the rounds so far, chunked/dense ratios, and the settings."""
    summary = {
        v: {
            "median_seconds": statistics.median(m["seconds"] for m in ms),
            "min_seconds": min(m["seconds"] for m in ms),
            "max_seconds": max(m["seconds"] for m in ms),
            "median_cpu_seconds": statistics.median(m["cpu_seconds"] for m in ms),
            "peak_mib": statistics.median(m["peak_bytes"] for m in ms) / 2**20,
        }
        for v, ms in runs.items()
    }
    pairs = PAIRS
    ratios = {
        kd: {
            "peak_chunked_over_dense": summary[chunked]["peak_mib"] / summary[dense]["peak_mib"],
            "time_chunked_over_dense": summary[chunked]["median_seconds"] / summary[dense]["median_seconds"],
            "cpu_time_chunked_over_dense": summary[chunked]["median_cpu_seconds"]
            / summary[dense]["median_cpu_seconds"],
        }
        for kd, (dense, chunked) in pairs.items()
        if dense in summary and chunked in summary
    }
    results = {
        "sizes": {
            "tokens": args.tokens,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "dim": args.dim,
            "vocab": args.vocab,
            "chunk_size": args.chunk_size,
            "k": args.k,
            "num_samples": args.num_samples,
            "dtype": "float32",
        },
        "device": args.device,
        "threads": args.threads,
        "rounds": rounds_done,
        "load_average_1_5_15_between_rounds": loads,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "summary": summary,
        "ratios": ratios,
        "goal": "chunked peak <= 0.20 x dense, chunked time <= 1.2 x dense",
        "runs": runs,
    }
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="2 x 256 tokens, V = 4,096, D = 64: seconds.")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=576, help="Hidden size of student and teacher.")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--chunk_size", type=int, default=1024, help="Positions per chunk.")
    parser.add_argument("--k", type=int, default=64, help="Top-k entries per position.")
    parser.add_argument("--num_samples", type=int, default=12, help="RS-KD draws per position.")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds; one fresh process each.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CPU here is shared).")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON file written.")
    parser.add_argument("--worker", default=None, choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.small:
        args.batch, args.seq_len, args.dim, args.vocab, args.chunk_size = 2, 256, 64, 4096, 128
    args.tokens = args.tokens or args.batch * args.seq_len
    if args.worker:
        return worker(args)

    shared = [
        f"--{name}={getattr(args, name)}"
        for name in ("tokens", "dim", "vocab", "chunk_size", "k", "num_samples", "threads", "device")
    ]
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    loads = [_load()]
    for r in range(args.rounds):
        shift = r % len(args.variants)
        for variant in args.variants[shift:] + args.variants[:shift]:
            out = subprocess.run(
                [sys.executable, __file__, f"--worker={variant}", *shared],
                capture_output=True,
                text=True,
                env=os.environ | WORKER_ENV | {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
            )
            if out.returncode != 0:
                raise RuntimeError(f"{variant} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            runs[variant].append(measured | {"load_1min": _load()[0]})
            print(
                f"round {r} {variant:20s} {measured['seconds']:8.2f} s  {measured['peak_bytes'] / 2**20:9.1f} MiB",
                flush=True,
            )
        loads.append(_load())

        results = summarise(args, runs, loads, rounds_done=r + 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")  # after every round: a long run keeps them

    summary, ratios = results["summary"], results["ratios"]
    print(f"\n{'variant':22s} {'median s':>9s} {'(min-max)':>18s} {'CPU s':>8s} {'peak MiB':>10s}")
    for v, s in summary.items():
        spread = f"({s['min_seconds']:.2f}-{s['max_seconds']:.2f})"
        print(
            f"{v:22s} {s['median_seconds']:9.2f} {spread:>18s} {s['median_cpu_seconds']:8.2f} {s['peak_mib']:10.1f}"
        )
    for kd, r in ratios.items():
        print(
            f"{kd:12s} chunked/dense: peak {r['peak_chunked_over_dense']:.3f}, "
            f"time {r['time_chunked_over_dense']:.2f}, CPU time {r['cpu_time_chunked_over_dense']:.2f}"
        )
    print(f"load average (1, 5, 15 min) before and after each round: {loads}")
    return results


if __name__ == "__main__":
    result = main()
    if "--worker" in " ".join(sys.argv):
        print(json.dumps(result))
