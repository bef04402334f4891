"""The levers of benchmarks/bench_rskd_floor.py: closed forms against draws, allocations and plans against their
constraints and against brute force, and the embedding-ordered CDF still unbiased."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_benchmarks import load_module

from hf_distill.vocab_losses import allocate_draws


@pytest.fixture(scope="module")
def bench():
    return load_module("benchmarks/bench_rskd_floor.py")


def _probs(rows: int, vocab: int, seed: int = 3) -> torch.Tensor:
    scale = torch.linspace(0.3, 3.0, rows)[:, None]
    return (
        (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale).softmax(-1).double()
    )


def test_the_systematic_error_table_equals_the_exact_sum_with_or_without_the_small_ids_in_closed_form(bench):
    p = _probs(5, 400)
    tail = p.scatter(-1, p.topk(2, dim=-1).indices, 0.0)
    exact = bench.systematic_errors(tail, 12, keep=400)
    cut = bench.systematic_errors(tail, 12, keep=60)  # the small ids (n q < 1 up to n = 12) in closed form
    assert torch.isinf(exact[:, 0]).all()
    torch.testing.assert_close(cut[:, 1:], exact[:, 1:], rtol=1e-9, atol=1e-12)
    for n in (1, 5, 12):
        torch.testing.assert_close(exact[:, n], bench.target_error_of_tail(tail, torch.full((5,), n)))


def test_the_closed_form_tail_error_is_the_libraries_mean_squared_error(bench):
    """Sampling only the tail (the rest exact) with each row's own draws: the closed form against the sampler."""
    from hf_distill.vocab_losses import _systematic_points

    p = _probs(3, 30)
    tail = p.scatter(-1, p.topk(2, dim=-1).indices, 0.0).float()
    draws = torch.tensor([3, 7, 11])
    repeats = 20000
    points = _systematic_points(tail.repeat(repeats, 1), draws.repeat(repeats)[:, None], 11,
                                torch.Generator().manual_seed(1))  # fmt: skip
    kept = torch.arange(11) < draws.repeat(repeats)[:, None]
    mass = tail.sum(-1).repeat(repeats)[:, None].double()
    estimate = torch.zeros(repeats * 3, 30, dtype=torch.float64)
    estimate.scatter_add_(-1, points, kept.double() * mass / draws.repeat(repeats)[:, None].double())
    measured = (estimate.view(repeats, 3, 30) - tail.double()).pow(2).sum(-1).mean(0)
    torch.testing.assert_close(
        measured, bench.target_error_of_tail(tail.double(), draws), rtol=0.05, atol=1e-7
    )


def test_greedy_allocation_spends_every_draw_keeps_one_a_row_and_finds_the_optimum_of_a_small_table(bench):
    p = _probs(4, 200)
    errors = bench.systematic_errors(p.scatter(-1, p.topk(1, dim=-1).indices, 0.0), 9)
    counts = bench.greedy_allocation(errors, 16)
    assert counts.sum().item() == 16 and counts.min().item() >= 1 and counts.max().item() <= 9
    best = min(
        sum(errors[i, n].item() for i, n in enumerate(c))
        for c in itertools.product(range(1, 10), repeat=4)
        if sum(c) == 16
    )
    assert sum(errors[i, n].item() for i, n in enumerate(counts.tolist())) == pytest.approx(best, rel=1e-9)
    with pytest.raises(ValueError, match="cannot give 4 rows"):
        bench.greedy_allocation(errors, 3)


def test_greedy_allocation_is_no_worse_than_neymans_on_the_systematic_error(bench):
    p = _probs(16, 300, seed=7)
    tail = p.scatter(-1, p.topk(3, dim=-1).indices, 0.0)
    errors = bench.systematic_errors(tail, 80)
    neyman = allocate_draws(tail.float(), 6)
    greedy = bench.greedy_allocation(errors, 6 * 16)
    assert greedy.sum() == neyman.sum()
    assert errors.gather(1, greedy[:, None]).sum() <= errors.gather(1, neyman[:, None]).sum() * (1 + 1e-12)


def test_the_head_plan_stays_within_its_bytes_and_stores_heads_where_a_few_tokens_hold_the_mass(bench):
    p = _probs(32, 500, seed=11)
    k, n = bench.head_plan(p, 20.0, most_head=12)
    assert bench.plan_bytes(k, n) <= 20.0 + 1e-9
    assert bench.plan_bytes(k, n) > 18.0  # it spends what it is given
    assert (n >= 1).all() and (k >= 0).all() and (k <= 12).all()
    # _probs sharpens row by row: a near-uniform row gains nothing from exact tokens, a peaked one does
    assert k[:4].sum().item() == 0 and k[-8:].double().mean().item() >= 1.0
    fixed = bench.head_error(
        p, torch.full((32,), 3), torch.full((32,), int((20.0 - 1.5 - 3 * 17.4 / 8) / 1.1))
    )
    assert bench.head_error(p, k, n).mean() < fixed.mean()


def test_the_embedding_order_is_a_permutation_that_puts_near_rows_side_by_side(bench):
    weight = torch.cat([torch.randn(50, 8) * 0.1 + 5.0, torch.randn(50, 8) * 0.1 - 5.0])[torch.randperm(100)]
    order = bench.embedding_order(weight)
    assert sorted(order.tolist()) == list(range(100))
    side = (weight[order, 0] > 0).long()
    assert (side[1:] != side[:-1]).sum().item() == 1  # the two clusters are two runs


def test_the_target_along_the_embedding_order_is_unbiased(bench, monkeypatch):
    """The default's sampler with its CDF taken along a permutation: the mean target over many draws is ``p``."""
    monkeypatch.setattr(bench, "DRAWS", 5)
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(2)) * 1.5
    order = torch.randperm(40, generator=torch.Generator().manual_seed(4))
    mean = sum(bench.sparse_target(logits, order, seed=s) for s in range(3000)) / 3000
    torch.testing.assert_close(mean, logits.double().softmax(-1), rtol=0.0, atol=6e-3)
    assert not torch.equal(bench.sparse_target(logits, order, 0), bench.sparse_target(logits, None, 0))
