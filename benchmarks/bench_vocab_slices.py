"""Peak memory of the fused causal-LM loss with the heads read whole against read in S vocabulary slices.

One call of the trainer's fused KD + CE loss, forward and backward: ``kd="kl"`` against a live teacher of the
same width, ``0.5 * KL + 0.5 * CE`` at ``T = 2``. Whole: :func:`hf_distill.vocab_losses.chunked_lm_losses` on
the whole heads; sliced: :func:`hf_distill.vocab_slices.sliced_lm_losses` with ``S`` slices. Three settings:

- ``world 1``: one process holding both heads whole (as a plain run or DDP), the heads plain tensors;
- ``world 2``: two gloo processes, each head a ``DTensor`` sharded ``Shard(0)`` on the vocabulary, as FSDP2
  leaves a resharded head: whole gathers it with :func:`hf_distill.sharding.gathered_weight` (all-gather, the
  gradient reduce-scattered and averaged), sliced reads it with :func:`hf_distill.sharding.head_slices`.
  Each rank has its own ``N`` positions; the peak reported is the larger of the two ranks'.
- ``world 2, --engine zero3``: the same two processes, each head a DeepSpeed ZeRO-3 parameter partitioned by
  ``deepspeed.zero.Init`` (flat partitions, none kept whole): whole gathers it with ``GatheredParameters``
  (:func:`~hf_distill.sharding.gathered_weight`), sliced reads it with
  :class:`~hf_distill.sharding.Zero3HeadSlices`, whose student gradient is the whole ``(V, D)``, left in
  ``param.grad`` (no engine: ZeRO-3's reduce-scatter of it, the same on both paths, is not measured).

Sizes default to SmolLM2-135M's head (``V = 49,152``, ``D = 576``) and ``N = 1,024`` positions (one
``lm_chunk_size`` chunk at the default 1,024; ``--chunk_sizes`` adds others), float32 on CPU. Every
measurement runs in fresh processes (``world 2``: a fresh ``torchrun``), measured as
``benchmarks/bench_lm_loss.py`` measures (``MALLOC_MMAP_THRESHOLD_`` 1 MiB, warm-up on tiny inputs,
``malloc_trim``, the peak resident size reset, then one call): the peak resident size during the call minus
the resident size before it, i.e. above the inputs (hidden states, the heads or this rank's shards).

It also records each loss's head reads a step (:data:`hf_distill.vocab_slices.HEAD_READS`: 2, or 3 for
``jsd``; the whole path reads a head once).

    python benchmarks/bench_vocab_slices.py                 # memory only; a few minutes on a shared CPU
    python benchmarks/bench_vocab_slices.py --small         # seconds: V = 4,096, D = 64, N = 256
    python benchmarks/bench_vocab_slices.py --time          # also seconds per call (take on an idle machine)
    python benchmarks/bench_vocab_slices.py --device cuda   # world 1 only; peak from max_memory_allocated
    python benchmarks/bench_vocab_slices.py --worlds 2 --engine zero3   # needs deepspeed

Results: ``benchmarks/results/vocab_slices.json`` (``--out`` to change); a run of the same sizes, device and
threads already there keeps the measurements this one does not repeat.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
from bench_lm_loss import WORKER_ENV, _reset_peak_resident, _status_bytes, dense_inputs

RESULTS = Path(__file__).parent / "results" / "vocab_slices.json"
ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"kd": "kl", "temperature": 2.0, "kd_weight": 0.5, "ce_weight": 0.5}


def _library() -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    """``hf_distill.vocab_losses``, ``.vocab_slices`` and ``.sharding`` without the package's ``__init__`` (which
    imports transformers: seconds per fresh process, for nothing the loss uses)."""
    if "hf_distill" not in sys.modules:
        package = types.ModuleType("hf_distill")
        package.__path__ = [str(ROOT / "hf_distill")]
        sys.modules["hf_distill"] = package
    names = ("vocab_losses", "vocab_slices", "sharding")
    return tuple(importlib.import_module(f"hf_distill.{name}") for name in names)


def make_inputs(n: int, dim: int, vocab: int, device: str, seed: int = 0) -> dict:
    x = dense_inputs(n, dim, vocab, torch.Generator().manual_seed(seed))
    return {name: t.to(device) for name, t in x.items()}


def run_loss(x: dict, slices: int, chunk_size: int) -> None:
    """One forward and backward; ``x["head"]``/``x["teacher_head"]`` are tensors or (world 2) modules."""
    vocab_losses, vocab_slices, sharding = _library()
    hidden = x["hidden"].detach().requires_grad_()
    settings = SETTINGS | {
        "labels": x["labels"],
        "chunk_size": chunk_size,
        "teacher_hidden": x["teacher_hidden"],
    }
    head, teacher_head = x["head"], x["teacher_head"]
    if isinstance(head, torch.Tensor):  # world 1: the student's head is trained, as in the trainer
        head = head.detach().requires_grad_()
    if isinstance(head, torch.nn.Module):  # world 2: as DistillationTrainer.compute_fused_lm_loss
        if slices > 1:
            student, teacher = sharding.head_slices(head), sharding.head_slices(teacher_head)
            loss = vocab_slices.sliced_lm_losses(
                hidden, student, teacher_head=teacher, num_slices=slices, **settings
            )
        else:
            with sharding.gathered_weight(head) as w, sharding.gathered_weight(teacher_head) as t:
                loss = vocab_losses.chunked_lm_losses(hidden, w, teacher_head=t, **settings)
    elif slices > 1:
        loss = vocab_slices.sliced_lm_losses(
            hidden, head, teacher_head=teacher_head, num_slices=slices, **settings
        )
    else:
        loss = vocab_losses.chunked_lm_losses(hidden, head, teacher_head=teacher_head, **settings)
    loss.loss.backward()


def _shard(x: dict) -> dict:
    """The heads as ``DTensor`` parameters sharded ``Shard(0)`` over all ranks, each in a module (FSDP2's layout)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    out = dict(x)
    for name, grad in (("head", True), ("teacher_head", False)):
        module = torch.nn.Module()
        module.weight = torch.nn.Parameter(distribute_tensor(x[name], mesh, [Shard(0)]), requires_grad=grad)
        out[name] = module
    return out


class _Head(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, requires_grad: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=requires_grad)


def _zero3(x: dict) -> dict:
    """The heads as DeepSpeed ZeRO-3 parameters, each in a module built under ``deepspeed.zero.Init``, which
    partitions it over all ranks (``stage3_param_persistence_threshold`` 0: none kept whole)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero}
    out = dict(x)
    for name, grad in (("head", True), ("teacher_head", False)):
        # float32: the config enables neither fp16 nor bf16 (its dtype argument is not honoured on the CPU)
        with deepspeed.zero.Init(config_dict_or_path=config):
            out[name] = _Head(x[name], grad)
    return out


def worker(args: argparse.Namespace) -> dict:
    """One measurement in this fresh process (each rank of a ``torchrun`` under ``--world 2``)."""
    torch.set_num_threads(args.threads)
    distributed = args.world > 1
    if distributed:
        torch.distributed.init_process_group("gloo")
    place = _zero3 if args.engine == "zero3" else _shard
    tiny = make_inputs(64, 16, 256, args.device)
    run_loss(place(tiny) if distributed else tiny, args.slices, 16)  # warm-up
    x = make_inputs(args.tokens, args.dim, args.vocab, args.device)
    if distributed:
        x = place(x)  # each rank keeps its shards only: the whole heads are freed below
    gc.collect()
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak_resident()
    start = time.perf_counter()
    run_loss(x, args.slices, args.chunk_size)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated() - base if args.device == "cuda" else _status_bytes("VmHWM") - base
    )
    result = {"peak_bytes": peak} | ({"seconds": seconds} if args.time else {})
    if distributed:
        ranks = [None] * args.world
        torch.distributed.all_gather_object(ranks, result)
        torch.distributed.destroy_process_group()
        result = {"peak_bytes": max(r["peak_bytes"] for r in ranks), "ranks": ranks}
        if args.time:
            result["seconds"] = max(r["seconds"] for r in ranks)
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args: argparse.Namespace, world: int, slices: int, chunk_size: int) -> dict:
    """One fresh process (or ``torchrun`` of ``world``) measuring one setting."""
    flags = ["--worker", f"--world={world}", f"--slices={slices}", f"--chunk_size={chunk_size}"]
    names = ("tokens", "dim", "vocab", "threads", "device", "engine")
    flags += [f"--{name}={getattr(args, name)}" for name in names]
    flags += ["--time"] if args.time else []
    launcher = [sys.executable]
    if world > 1:
        launcher += [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(world),
            "--master_port",
            str(_free_port()),
        ]
    env = os.environ | WORKER_ENV | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run([*launcher, __file__, *flags], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"world {world}, S={slices} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="V = 4,096, D = 64, N = 256: seconds.")
    parser.add_argument("--tokens", type=int, default=1024, help="Positions N (per rank under world 2).")
    parser.add_argument("--dim", type=int, default=576, help="Hidden size of student and teacher.")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--slices", type=int, nargs="+", default=[1, 2, 4, 8], help="S; 1: the whole heads.")
    parser.add_argument("--chunk_sizes", type=int, nargs="+", default=[1024], help="Positions per chunk.")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument(
        "--engine", default="fsdp2", choices=["fsdp2", "zero3"], help="How world 2 shards the heads."
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (the CPU is shared)."
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--time", action="store_true", help="Also report seconds per call (on an idle machine)."
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON file written.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--chunk_size", type=int, default=1024, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.small:
        args.tokens, args.dim, args.vocab = 256, 64, 4096
    if args.worker:
        args.slices = args.slices[0]
        return worker(args)
    if args.device == "cuda" and args.worlds != [1]:
        parser.error("--device cuda measures world 1 only: pass --worlds 1.")
    _, vocab_slices, _ = _library()
    runs = []
    for world in args.worlds:
        engine = {"engine": args.engine} if world > 1 else {}
        for chunk_size in args.chunk_sizes:
            for slices in args.slices:
                measured = measure(args, world, slices, chunk_size)
                runs.append({"world": world, **engine, "chunk_size": chunk_size, "slices": slices} | measured)
                timing = f"  {measured['seconds']:.2f} s" if args.time else ""
                print(
                    f"world {world}{' ' + args.engine if engine else ''} chunk {chunk_size:5d} S={slices}: "
                    f"{measured['peak_bytes'] / 2**20:8.1f} MiB{timing}"
                )
    mib = 2**20
    sizes = {"tokens": args.tokens, "dim": args.dim, "vocab": args.vocab, "dtype": "float32"}
    runs = _merged(args.out, runs, {"sizes": sizes, "device": args.device, "threads": args.threads})
    results = {
        "sizes": sizes,
        "loss": SETTINGS | {"labels": "every position labelled", "teacher_dim": args.dim},
        "device": args.device,
        "threads": args.threads,
        "torch": torch.__version__,
        "head_reads_per_step": {
            "whole (chunked_lm_losses)": 1,
            **{f"sliced, kd={k}" if k else "sliced, CE only": v for k, v in vocab_slices.HEAD_READS.items()},
        },
        "head_mib": {
            "head_float32": args.vocab * args.dim * 4 / mib,
            "slice_float32_at_S": {s: args.vocab / s * args.dim * 4 / mib for s in args.slices},
            "logit_block_float32_chunk_x_V_over_S": {
                f"{c}x{s}": c * args.vocab / s * 4 / mib for c in args.chunk_sizes for s in args.slices
            },
        },
        "peak_mib": {_key(r): r["peak_bytes"] / mib for r in runs},
        "runs": runs,
        "note": "peak resident size of one call (forward + backward) above its inputs, fresh processes; world 2: "
        "the larger rank's (FSDP2 DTensors, or zero3: DeepSpeed ZeRO-3 partitions). Timings only with --time.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def _key(run: dict) -> str:
    """``world2_chunk1024_S4``; ZeRO-3: ``world2_zero3_chunk1024_S4``."""
    engine = "_zero3" if run.get("engine") == "zero3" else ""
    return f"world{run['world']}{engine}_chunk{run['chunk_size']}_S{run['slices']}"


def _merged(path: Path, runs: list[dict], same: dict) -> list[dict]:
    """``runs`` with the runs of the results at ``path`` that they do not repeat, when those were measured with the
    ``same`` sizes, device and threads (else ``runs`` alone)."""
    if not path.exists():
        return runs
    old = json.loads(path.read_text())
    if any(old.get(name) != value for name, value in same.items()):
        return runs
    new = {_key(r) for r in runs}
    return [r for r in old["runs"] if _key(r) not in new] + runs


if __name__ == "__main__":
    result = main()
    if "--worker" in sys.argv and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 reports both
        print(json.dumps(result))
