"""How low an unbiased RS-KD cache's target error can go at the default's 39.5 bytes/token: four more levers, measured.

The default cache (3 exact head tokens in 8 bits, 29 systematic tail draws a token shared by need within each
block, format 8) keeps >= 90% of dense KD's gain in 8 of 10 seeds; with 46 draws (53 B/token) the worst seed
keeps 94.6%. This benchmark asks whether any unbiased change at the same bytes comes near the 46-draw cache's
target error. For each of the recipe's first ``--blocks`` training blocks (the teacher's distribution ``p`` at
T = 1), in closed form where one exists (``benchmarks/bench_rskd_variance.py``'s formulas):

- ``default``: the cache as shipped, ``E||t - p||^2`` with each token's ``n_t`` from
  :func:`hf_distill.vocab_losses.allocate_draws` (Neyman's allocation, optimal for iid draws);
- ``46 draws``: the same at 46 draws a token, the layout that passed every seed tried (its bytes here are at the
  default's rates; on the cache, where more draws cost fewer bits each, it measured 53.0 B/token);
- ``allocation for systematic draws``: the block's draws given greedily to the tokens whose systematic error
  ``m^2 sum_j f_j (1 - f_j) / n^2`` falls most per draw (:func:`greedy_allocation`), instead of Neyman's;
- ``head per token``: each token's own head size ``k_t`` and draws ``n_t``, chosen jointly within each block for
  the least error at the same bytes (:func:`head_plan`), charged the default's measured format-8 rates:
  9.4 bits a head id, 8 a head probability, 8.8 a draw, 1 byte for the draw count and 4 bits for ``k_t``;
- ``label exact``: the training label's probability stored exactly as a fourth head token (its id is free: the
  collator has the labels), paid for with one draw;
- ``CDF by embedding``: the tail's systematic points taken along a fixed order of the vocabulary in which
  neighbours have near embeddings (recursive bisection on the teacher's output embeddings' principal directions,
  :func:`embedding_order`) instead of token-id order. Unbiased in any order; it cannot lower the per-token
  error, only that of the hidden-state gradient ``(t - p) W`` (``W`` the teacher's output embeddings), so both are
  measured, over ``--repeats`` draws of the library's own sampler (Monte Carlo).

The closed forms leave out the head's 8-bit rounding (about 1e-5 a token), the same for every lever.

    python benchmarks/bench_rskd_floor.py --blocks 4

Results: ``benchmarks/results/rskd_floor.json`` (``--out`` to change). The teacher's time is not reported.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rskd_variance import (  # noqa: E402
    RECIPE,
    ROOT,
    allocate_by_block,
    count_variance,
    recipe_teacher,
    target_error,
)

import hf_distill.vocab_losses as vocab_losses  # noqa: E402

HEAD, DRAWS = 3, 29
# the default cache's measured rates (format 8, README "RS-KD levers"), bits
HEAD_ID_BITS, HEAD_PROB_BITS, DRAW_BITS, COUNT_BITS, HEAD_SIZE_BITS = 9.4, 8.0, 8.8, 8.0, 4.0


def systematic_errors(tail: torch.Tensor, most: int, keep: int = 2048) -> torch.Tensor:
    """``E_t(n) = m_t^2 sum_j f_j (1 - f_j) / n^2`` (``f_j = frac(n q_j)``) for ``n = 0..most``, ``(N, most + 1)``
    float64 (``E_t(0) = inf``): the systematic tail error of each row of ``tail`` ``(N, V)`` (unnormalised). Only the
    ``keep`` largest ``q_j`` are summed exactly; the rest (``n q_j < 1`` for ``n <= most`` when ``keep`` is large
    enough) give ``n q_j (1 - n q_j)`` each, summed in closed form."""
    tail = tail.double()
    mass = tail.sum(-1)
    q = tail / mass.clamp_min(1e-300)[:, None]
    big = q.topk(min(keep, q.shape[-1]), dim=-1).values
    rest, rest_sq = (1.0 - big.sum(-1)).clamp_min(0.0), ((q**2).sum(-1) - (big**2).sum(-1)).clamp_min(0.0)
    errors = torch.empty(q.shape[0], most + 1, dtype=torch.float64)
    errors[:, 0] = math.inf
    for n in range(1, most + 1):
        f = torch.frac(n * big)
        errors[:, n] = mass**2 * ((f * (1.0 - f)).sum(-1) + n * rest - n * n * rest_sq) / n**2
    return errors


def greedy_allocation(errors: torch.Tensor, total: int, lookahead: int = 8) -> torch.Tensor:
    """``n_t >= 1`` summing to ``total`` for the rows of ``errors`` ``(N, most + 1)`` (``E_t(n)``), each draw given to
    the row whose error falls most per draw over its next ``1..lookahead`` draws (systematic errors are not convex
    in ``n``). ``(N,)`` int64."""
    rows, most = errors.shape[0], errors.shape[1] - 1
    if not rows <= total <= rows * most:
        raise ValueError(f"total={total} draws cannot give {rows} rows between 1 and {most} each.")
    counts = [1] * rows

    def best(i: int) -> tuple[float, int]:
        gain, step = -math.inf, 1
        for k in range(1, lookahead + 1):
            if counts[i] + k > most:
                break
            per_draw = (errors[i, counts[i]] - errors[i, counts[i] + k]).item() / k
            if per_draw > gain:
                gain, step = per_draw, k
        return gain, step

    heap = [(-best(i)[0], i) for i in range(rows) if counts[i] < most]
    heapq.heapify(heap)
    left = total - rows
    while left > 0 and heap:
        stale, i = heapq.heappop(heap)
        gain, step = best(i)
        if -stale != gain:  # its gain changed since it was pushed: push it back with the current one
            heapq.heappush(heap, (-gain, i))
            continue
        step = min(step, left)
        counts[i] += step
        left -= step
        if counts[i] < most:
            heapq.heappush(heap, (-best(i)[0], i))
    return torch.tensor(counts)


def head_plan(
    probs: torch.Tensor, bytes_per_token: float, most_head: int = 24
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's head size ``k_t`` and draws ``n_t`` for the least summed error within ``bytes_per_token`` on average
    (the module's bit rates), by a Lagrange multiplier on bytes with the iid error ``(m_k^2 - ||tail_k||^2) / n``
    (systematic errors are measured after). ``probs`` ``(N, V)``; returns ``(k, n)``, ``(N,)`` int64 each."""
    p = probs.double()
    top = p.topk(most_head + 1, dim=-1).values
    zero = torch.zeros(p.shape[0], 1, dtype=torch.float64)
    mass = 1.0 - torch.cat([zero, top.cumsum(-1)], -1)[:, : most_head + 1]
    squares = (p**2).sum(-1, keepdim=True) - torch.cat([zero, (top**2).cumsum(-1)], -1)[:, : most_head + 1]
    weight = (mass**2 - squares).clamp_min(0.0)  # n times the iid error, head size k = 0..most_head
    head_bytes, draw_bytes = (HEAD_ID_BITS + HEAD_PROB_BITS) / 8, DRAW_BITS / 8
    fixed = (COUNT_BITS + HEAD_SIZE_BITS) / 8

    def solve(lam: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        sizes = torch.arange(most_head + 1, dtype=torch.float64)
        draws = (weight / (lam * draw_bytes)).sqrt().clamp(1.0, 255.0).round()
        objective = weight / draws + lam * (sizes * head_bytes + draws * draw_bytes)
        k = objective.argmin(-1)
        n = draws.gather(1, k[:, None])[:, 0]
        return k, n.long(), (fixed + k * head_bytes + n * draw_bytes).mean().item()

    low, high = 1e-14, 1.0
    for _ in range(80):  # bytes fall as lam grows
        middle = math.sqrt(low * high)
        if solve(middle)[2] > bytes_per_token:
            low = middle
        else:
            high = middle
    k, n, _ = solve(high)
    return k, n


def plan_bytes(k: torch.Tensor, n: torch.Tensor) -> float:
    """Bytes per token of a :func:`head_plan` at the module's bit rates."""
    bits = COUNT_BITS + HEAD_SIZE_BITS + k.double() * (HEAD_ID_BITS + HEAD_PROB_BITS) + n.double() * DRAW_BITS
    return (bits / 8).mean().item()


def layout_bytes(draws: int) -> float:
    """Bytes per token of the default's layout (``HEAD`` exact tokens, ``draws`` a token) at the module's bit rates."""
    return (COUNT_BITS + HEAD * (HEAD_ID_BITS + HEAD_PROB_BITS) + draws * DRAW_BITS) / 8


def target_error_of_tail(tail: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """The systematic error of sampling ``tail`` ``(N, V)`` (the rest stored exactly) with ``draws`` ``(N,)``."""
    mass = tail.sum(-1)
    draws = draws[:, None].double()
    return (
        mass**2
        * count_variance(tail / mass.clamp_min(1e-300)[:, None], draws, "systematic")
        / draws[:, 0] ** 2
    )


def head_error(probs: torch.Tensor, k: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The systematic tail error of each row with its own head size ``k_t`` and ``n_t`` draws, ``(N,)`` float64."""
    out = torch.empty(probs.shape[0], dtype=torch.float64)
    for size in k.unique().tolist():
        rows = (k == size).nonzero()[:, 0]
        p = probs[rows].double()
        out[rows] = target_error_of_tail(
            p.scatter(-1, p.topk(size, dim=-1).indices, 0.0) if size else p, n[rows]
        )
    return out


def embedding_order(weight: torch.Tensor, leaf: int = 2, seed: int = 0) -> torch.Tensor:
    """A permutation of the vocabulary in which neighbours have near rows of ``weight`` ``(V, d)``: split at the
    median of the top principal direction (power iteration), recursively, down to ``leaf`` ids. ``(V,)`` int64."""
    generator = torch.Generator().manual_seed(seed)
    weight = weight.float()

    def split(ids: torch.Tensor) -> list[torch.Tensor]:
        if ids.numel() <= leaf:
            return [ids]
        centred = weight[ids] - weight[ids].mean(0)
        direction = torch.randn(weight.shape[1], generator=generator)
        for _ in range(15):
            direction = centred.T @ (centred @ direction)
            direction = direction / direction.norm().clamp_min(1e-30)
        order = ids[(centred @ direction).argsort()]
        half = order.numel() // 2
        return split(order[:half]) + split(order[half:])

    return torch.cat(split(torch.arange(weight.shape[0])))


def sparse_target(logits: torch.Tensor, order: torch.Tensor | None, seed: int) -> torch.Tensor:
    """The default cache's dense target ``t`` for a block's ``logits`` ``(L, V)`` (the library's sampler: head 3, 29
    adaptive systematic draws), its CDF taken along ``order`` (``None``: token ids). ``(L, V)`` float64."""
    systematic = vocab_losses._systematic_points

    def along(probs: torch.Tensor, num: Any, width: int, generator: Any) -> torch.Tensor:
        return order[systematic(probs[:, order], num, width, generator)]

    if order is not None:
        vocab_losses._systematic_points = along
    try:
        generator = torch.Generator().manual_seed(seed)
        head_ids, head_probs, pooled, lengths = vocab_losses.sample_head_and_tail(
            logits, HEAD, DRAWS, generator=generator, scheme="systematic", allocation="adaptive"
        )
    finally:
        vocab_losses._systematic_points = systematic
    ids, kept = vocab_losses.regroup_draws(pooled, lengths)
    tail_mass = (1.0 - head_probs.double().sum(-1, keepdim=True)).clamp_min(0.0)
    target = torch.zeros(logits.shape, dtype=torch.float64).scatter_(-1, head_ids, head_probs.double())
    return target.scatter_add_(-1, ids, kept.double() * tail_mass / lengths.double())


def teacher_blocks(blocks: int) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The default teacher's logits ``(L, V)`` and next-token labels ``(L,)`` on the recipe's first ``blocks``
    training blocks (each block's last position, which has no label, dropped), and its output embeddings."""
    teacher, rows, _ = recipe_teacher(blocks)  # the recipe's T is 1: the logits are its distribution's
    logits, labels = [], []
    with torch.no_grad():
        for row in rows:
            logits.append(teacher.model(input_ids=torch.tensor([row])).logits[0, :-1].float())
            labels.append(torch.tensor(row[1:]))
    return logits, labels, teacher.model.get_output_embeddings().weight.detach().float()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument(
        "--repeats", type=int, default=4, help="Monte Carlo draws per block for the CDF order"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/rskd_floor.json")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logits, labels, weight = teacher_blocks(args.blocks)
    probs = torch.cat([torch.softmax(block.double(), -1) for block in logits])
    label = torch.cat(labels)
    block = logits[0].shape[0]
    head_ids = probs.topk(HEAD, dim=-1).indices
    tail = probs.scatter(-1, head_ids, 0.0)
    rows: list[dict[str, Any]] = []

    def row(name: str, bytes_per_token: float, error: torch.Tensor, **extra: Any) -> None:
        rows.append({"lever": name, "bytes_per_token": round(bytes_per_token, 2),
                     "mean_squared_error": error.mean().item(), **extra})  # fmt: skip

    default_bytes = layout_bytes(DRAWS)
    for draws in (DRAWS, 46):
        error = target_error(probs, HEAD, allocate_by_block(tail, draws, block), "systematic", False)
        row("default" if draws == DRAWS else "46 draws", layout_bytes(draws), error)
    errors = systematic_errors(tail, 160)
    greedy = torch.cat([greedy_allocation(errors[i : i + block], DRAWS * min(block, errors.shape[0] - i))
                        for i in range(0, errors.shape[0], block)])  # fmt: skip
    row("allocation for systematic draws", default_bytes, errors.gather(1, greedy[:, None])[:, 0])
    k, n = torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    for i in range(0, probs.shape[0], block):
        k_block, n_block = head_plan(probs[i : i + block], default_bytes)
        k, n = torch.cat([k, k_block]), torch.cat([n, n_block])
    row("head per token", plan_bytes(k, n), head_error(probs, k, n),
        mean_head=k.double().mean().item(), mean_draws=n.double().mean().item())  # fmt: skip
    labelled = tail.scatter(-1, label[:, None], 0.0)
    row("label exact", default_bytes, target_error_of_tail(labelled, allocate_by_block(labelled, DRAWS - 1, block)),
        label_in_head=(head_ids == label[:, None]).any(-1).double().mean().item())  # fmt: skip
    order = embedding_order(weight)
    for name, permutation in (("default", None), ("CDF by embedding", order)):
        squared, hidden = 0.0, 0.0
        for b, block_logits in enumerate(logits):
            p = probs[b * block : (b + 1) * block]
            for r in range(args.repeats):
                difference = sparse_target(block_logits, permutation, seed=1000 * b + r) - p
                squared += (difference**2).sum().item()
                hidden += ((difference.float() @ weight) ** 2).sum().item()
        tokens = probs.shape[0] * args.repeats
        rows.append({"lever": f"{name} (Monte Carlo)", "bytes_per_token": round(default_bytes, 2),
                     "mean_squared_error": squared / tokens, "hidden_gradient_squared_error": hidden / tokens})  # fmt: skip
    results = {"tokens": probs.shape[0], "blocks": args.blocks, "repeats": args.repeats,
               "recipe": str(RECIPE.relative_to(ROOT)), "levers": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    for r in rows:
        hidden = r.get("hidden_gradient_squared_error")
        print(f"{r['lever']}: {r['bytes_per_token']} B/token, E||t - p||^2 = {r['mean_squared_error']:.5f}"
              + (f", E||(t - p) W||^2 = {hidden:.5f}" if hidden is not None else ""))  # fmt: skip
    return results


if __name__ == "__main__":
    main()
