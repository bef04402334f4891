"""How far an RS-KD cache's sparse target is from the teacher's distribution, per layout, on the LM default's teacher.

For each layout (exact head ``h``, ``n`` tail draws, iid or systematic, the head in float16 or in 8 bits, the draws
even or allocated by need within each block) and each
training token of the recipe, the expected squared error of the sparse target ``t`` against the teacher's
distribution ``p`` (the trace of its covariance: ``t`` is unbiased), in closed form from ``p`` (no draws):

- the tail, mass ``m = 1 - sum_head p`` and shape ``q = p_tail / m``, ``n`` draws with counts ``c``:
  ``E||m c / n - m q||^2 = m^2 sum_j Var(c_j) / n^2``, with ``Var(c_j) = n q_j (1 - q_j)`` for iid draws and
  ``f_j (1 - f_j)``, ``f_j = frac(n q_j)``, for systematic ones (each count is ``floor(n q_j)`` or ``ceil``);
- a head in 8 bits (:func:`hf_distill.vocab_losses.quantize_probs`, ``k_i`` is ``floor(255 p_i)`` or ``ceil``):
  ``sum_i f_i (1 - f_i) / 255^2`` (``f_i = frac(255 p_i)``) on the head, and the tail mass ``1 - sum_i k_i /
  255`` varies by ``v = f (1 - f) / 255^2``, ``f = frac(255 sum_head p)``, independently of the draws:
  ``+ v (sum_j Var(c_j) / n^2 + ||q||^2)`` on the tail.

With ``sample_allocation: adaptive`` token ``t`` has ``n_t`` draws instead of ``n``
(:func:`hf_distill.vocab_losses.allocate_draws`, each block of the recipe's ``block_size`` tokens sharing ``n`` a
token), and the same formulas hold with ``n_t``.

The gradient of the KD loss with respect to the student's logits is ``p_s - t``, so this is the noise the sparse
teacher adds to it, token by token. Bytes per token: 4 per float16 head token (uint16 id + float16), 3 in 8 bits,
2 per draw stored as itself (``sample_counts: false``); an adaptive allocation's draws and head ids as the cache
stores them, in one interpolative code (format 8, measured on the library's own draws), 1 or 2 per head probability,
and 1 for each token's count.

    python benchmarks/bench_rskd_variance.py --blocks 8

Results: ``benchmarks/results/rskd_variance.json`` (``--out`` to change). It runs the teacher on the first
``--blocks`` training blocks only; its time is not reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from hf_distill.draw_code import encode_draws
from hf_distill.vocab_losses import allocate_draws, sample_sparse_target

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/offline/smollm2.yaml"
# (head, draws, scheme, head in 8 bits, allocation): the layouts of benchmarks/bench_rskd_levers.py at <= 40
# bytes/token
LAYOUTS = [
    (0, 19, "iid", False, "even"),
    (1, 17, "iid", False, "even"),
    (2, 15, "iid", False, "even"),
    (3, 13, "iid", False, "even"),
    (4, 11, "iid", False, "even"),
    (6, 7, "iid", False, "even"),
    (3, 13, "systematic", False, "even"),
    (3, 15, "systematic", True, "even"),
    (3, 14, "iid", True, "adaptive"),
    (3, 14, "systematic", True, "adaptive"),
    (3, 19, "systematic", True, "adaptive"),
    (3, 23, "systematic", True, "adaptive"),
    (3, 24, "systematic", True, "adaptive"),
    (3, 28, "systematic", True, "adaptive"),
    (3, 29, "systematic", True, "adaptive"),
    (3, 30, "systematic", True, "adaptive"),
    (3, 31, "systematic", True, "adaptive"),
    (3, 255, "iid", False, "even"),
]


def layout_bytes(head: int, draws: int, quantized: bool) -> int:
    """Bytes per token of an even layout, without the lists' offsets: ``(3 or 4) h + 2 n``."""
    return (3 if quantized else 4) * head + 2 * draws


def coded_bytes(probs: torch.Tensor, head: int, draws: int, scheme: str, quantized: bool, block: int) -> float:
    """Bytes per token of an adaptive layout, without the lists' offsets, as the cache stores it (format 8): ``(1
    or 2) h`` for the head's probabilities, 1 for each token's count, and each block's draws with its head's ids in
    their code (:func:`hf_distill.draw_code.encode_draws`), with its header, the draws made by the library (seed
    0) from ``probs``."""
    generator, code = torch.Generator().manual_seed(0), 0
    for i in range(0, probs.shape[0], block):
        drawn = sample_sparse_target(probs[i : i + block].log(), draws, head=head, generator=generator,
                                     counts=False, scheme=scheme, allocation="adaptive")  # fmt: skip
        pooled, lengths = drawn[-2:]
        head_ids = drawn[0].sort(-1).values.numpy() if head else None
        code += encode_draws(pooled.reshape(-1).numpy(), lengths.reshape(-1).numpy(), probs.shape[-1],
                             head=head_ids).size  # fmt: skip
    return (1 if quantized else 2) * head + 1 + code / probs.shape[0]


def allocate_by_block(tail: torch.Tensor, draws: int, block: int) -> torch.Tensor:
    """Each row's ``n_t`` for sampling ``tail`` ``(N, V)`` (what is left to sample) under ``sample_allocation:
    adaptive``, every ``block`` rows sharing ``n`` a row, ``(N,)``."""
    return torch.cat([allocate_draws(tail[i : i + block].float(), draws) for i in range(0, tail.shape[0], block)])


def allocated_draws(probs: torch.Tensor, head: int, draws: int, block: int) -> torch.Tensor:
    """Each row's ``n_t`` under ``sample_allocation: adaptive``, every ``block`` rows sharing ``n`` a row, ``(N,)``."""
    top_ids = probs.topk(head, dim=-1).indices
    return allocate_by_block(probs.float().scatter(-1, top_ids, 0.0), draws, block)


def count_variance(q: torch.Tensor, draws: torch.Tensor, scheme: str) -> torch.Tensor:
    """``sum_j Var(c_j)`` of ``n`` draws from each row's shape ``q`` ``(N, V)`` (``draws``: ``n`` per row, ``(N, 1)``
    float64): ``n q_j (1 - q_j)`` for iid draws, ``f_j (1 - f_j)`` with ``f_j = frac(n q_j)`` for systematic ones."""
    if scheme == "iid":
        return (draws * q * (1.0 - q)).sum(-1)
    f = torch.frac(draws * q)
    return (f * (1.0 - f)).sum(-1)


def target_error(
    probs: torch.Tensor, head: int, draws: int | torch.Tensor, scheme: str, quantized: bool
) -> torch.Tensor:
    """``E||t - p||^2`` per row of ``probs`` ``(N, V)`` for one layout (the module's formulas), ``(N,)`` float64.
    ``draws``: ``n``, or each row's ``n_t`` ``(N,)`` (:func:`allocated_draws`)."""
    p = probs.double()
    top, top_ids = p.topk(head, dim=-1)
    tail = p.scatter(-1, top_ids, 0.0)
    m = (1.0 - top.sum(-1)).clamp_min(0.0)
    q = tail / m.clamp_min(1e-300)[:, None]
    draws = torch.as_tensor(draws, dtype=torch.float64).reshape(-1, 1)
    tail_error = count_variance(q, draws, scheme) / draws[:, 0] ** 2
    error = m**2 * tail_error
    if quantized and head:
        f = torch.frac(255.0 * top)
        f_mass = torch.frac(255.0 * top.sum(-1))
        v = f_mass * (1.0 - f_mass) / 255.0**2
        error = error + (f * (1.0 - f)).sum(-1) / 255.0**2 + v * (tail_error + (q**2).sum(-1))
    return error


def recipe_teacher(blocks: int) -> tuple[Any, list[list[int]], float]:
    """The offline default's teacher, the input ids of the recipe's first ``blocks`` training blocks, and its
    training T."""
    from hf_distill.language_modeling import LMRecipeParser
    from hf_distill.language_modeling.data import load_corpus, pack
    from hf_distill.language_modeling.teacher import load_teacher

    with tempfile.TemporaryDirectory() as tmp:
        script, args = LMRecipeParser().parse_recipe_and_args(["--config", str(RECIPE), "--output_dir", tmp])[:2]
    script.ood_dataset_name = None
    teacher = load_teacher(script)
    splits, _ = load_corpus(script)
    rows = pack(splits["train"], teacher.tokenizer, script.block_size, max_blocks=blocks)
    return teacher, rows["input_ids"], args.temperature


def teacher_probs(blocks: int) -> torch.Tensor:
    """The offline default teacher's next-token distributions on the recipe's first ``blocks`` training blocks."""
    teacher, rows, temperature = recipe_teacher(blocks)
    out = []
    with torch.no_grad():
        for row in rows:
            logits = teacher.model(input_ids=torch.tensor([row])).logits[0].float()
            out.append(torch.softmax(logits / temperature, dim=-1))  # the draws' T is the training T
    return torch.cat(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/rskd_variance.json")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    probs = teacher_probs(args.blocks)
    rows = []
    block = probs.shape[0] // args.blocks  # the recipe's block size: each block shares its draws
    for head, draws, scheme, quantized, allocation in LAYOUTS:
        own = allocated_draws(probs, head, draws, block) if allocation == "adaptive" else draws
        error = target_error(probs, head, own, scheme, quantized)
        rows.append({"head": head, "draws": draws, "scheme": scheme, "head_in_8_bits": quantized,
                     "allocation": allocation,
                     "bytes_per_token": coded_bytes(probs, head, draws, scheme, quantized, block)
                     if allocation == "adaptive" else layout_bytes(head, draws, quantized),
                     "mean_squared_error": error.mean().item()})  # fmt: skip
    results = {"tokens": probs.shape[0], "recipe": str(RECIPE.relative_to(ROOT)), "layouts": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    for row in rows:
        print(f"head {row['head']}{' (8 bits)' if row['head_in_8_bits'] else ''} + {row['draws']} {row['scheme']} "
              f"draws ({row['allocation']}), {row['bytes_per_token']} B/token: E||t - p||^2 = {row['mean_squared_error']:.5f}")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
