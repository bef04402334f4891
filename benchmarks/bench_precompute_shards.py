"""Precompute throughput with 1 against N processes: every process computes its own shard of the cache.

Each round launches ``accelerate launch`` with 1 process and with N (CPU: one thread each; ``--device
cuda``: one GPU each) in turn, each writing a fresh cache of the same dataset with the same teacher
(a BERT of 4 layers x 256 built from a config with a fixed seed: every process has the same weights).
A run is timed from a barrier before :func:`hf_distill.precompute_teacher_logits` to a barrier after it
(the shards, the main process's check and the provenance included; not the start of the processes).
Reported: examples/s, the ratio N / 1 (goal on two CPU cores: >= 1.8x), and process CPU seconds per
example summed over the processes (less sensitive than wall time to other load on the machine),
with the load average before and after. Run:

    python benchmarks/bench_precompute_shards.py                      # 1 vs 2 CPU processes, ~3 minutes
    python benchmarks/bench_precompute_shards.py --processes 4 --num_examples 8000 --sort_window 500
    python benchmarks/bench_precompute_shards.py --device cuda --processes 8 --num_examples 200000

Results go to ``benchmarks/results/precompute_shards_<device>_<N>.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification

VOCAB_SIZE, NUM_LABELS, MAX_LENGTH = 2000, 3, 128


def make_dataset(n: int, seed: int = 0) -> Dataset:
    """Random token ids with log-normal lengths (median ~30 tokens, clipped to MAX_LENGTH)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(30), 0.6, n).astype(int), 4, MAX_LENGTH)
    ids = [[2, *rng.integers(5, VOCAB_SIZE, length - 2).tolist(), 3] for length in lengths]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})


def make_teacher() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=MAX_LENGTH,
        num_labels=NUM_LABELS,
    )
    return BertForSequenceClassification(config).eval()


def worker(report: str, cache_dir: str, num_examples: int, sort_window: int, device: str) -> None:
    """One process of a launched run: time its share of one precompute and write the report (main process)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from hf_distill import precompute_teacher_logits

    state = PartialState(cpu=device == "cpu")
    teacher, dataset = make_teacher().to(state.device), make_dataset(num_examples)
    state.wait_for_everyone()
    wall, cpu = time.perf_counter(), time.process_time()
    out = precompute_teacher_logits(teacher, dataset, cache_dir=cache_dir, sort_window=sort_window)
    if state.device.type == "cuda":
        torch.cuda.synchronize()
    cpu = time.process_time() - cpu
    state.wait_for_everyone()
    wall = time.perf_counter() - wall
    cpus = gather_object([cpu])
    if state.is_main_process:
        assert len(out) == num_examples
        Path(report).write_text(json.dumps({"wall_s": wall, "cpu_s": cpus, "processes": state.num_processes}))


def launch(processes: int, args, workdir: Path, run: str) -> dict:
    report, cache = workdir / f"report-{run}.json", workdir / f"cache-{run}"
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mode = ["--multi_gpu", "--main_process_port", str(port)]
    else:
        mode = ["--cpu"] if args.device == "cpu" else []
    command = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(processes)]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", __file__]
    command += [
        "--worker",
        str(report),
        str(cache),
        str(args.num_examples),
        str(args.sort_window),
        args.device,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")]
    )
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(report.read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="N, compared with 1 process")
    parser.add_argument("--num_examples", type=int, default=2000)
    parser.add_argument("--sort_window", type=int, default=250, help="shards are whole windows")
    parser.add_argument("--rounds", type=int, default=3, help="1 and N processes alternate, this many times")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    runs: dict[int, list[dict]] = {1: [], args.processes: []}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for processes in runs:
                result = launch(processes, args, Path(tmp), f"{round_}-{processes}")
                runs[processes].append(result)
                print(
                    f"round {round_}: {processes} process(es): {args.num_examples / result['wall_s']:.0f} examples/s"
                )
    load_after = os.getloadavg()
    summary = {}
    for processes, results in runs.items():
        walls = [r["wall_s"] for r in results]
        cpu = [sum(r["cpu_s"]) / args.num_examples * 1e3 for r in results]
        summary[processes] = {
            "examples_per_s_best": args.num_examples / min(walls),
            "examples_per_s_median": args.num_examples / statistics.median(walls),
            "cpu_ms_per_example_median": statistics.median(cpu),
            "wall_s": walls,
        }
    one, many = summary[1], summary[args.processes]
    results = {
        "settings": vars(args) | {"teacher": "BERT 4 layers x 256, 4 heads, intermediate 1024"},
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "runs": {str(k): v for k, v in summary.items()},
        "ratio_best": many["examples_per_s_best"] / one["examples_per_s_best"],
        "ratio_median": many["examples_per_s_median"] / one["examples_per_s_median"],
    }
    print(json.dumps(results, indent=2))
    out = Path(args.out or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"precompute_shards_{args.device}_{args.processes}.json").write_text(
        json.dumps(results, indent=2) + "\n"
    )
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, report, cache, n, window, device = sys.argv
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        worker(report, cache, int(n), int(window), device)
    else:
        main()
