"""The closed-form target error of benchmarks/bench_rskd_variance.py against the library's own draws."""

from __future__ import annotations

import pytest
import torch
from test_benchmarks import load_module

from hf_distill.vocab_losses import dequantize_probs, head_tail_weights, quantize_probs, sample_sparse_target


@pytest.mark.parametrize(
    ("head", "draws", "scheme", "quantized"),
    [(0, 9, "iid", False), (3, 9, "iid", False), (3, 9, "systematic", False), (2, 11, "systematic", True)],
)
def test_the_closed_form_error_is_the_mean_squared_error_of_the_caches_draws(head, draws, scheme, quantized):
    bench = load_module("benchmarks/bench_rskd_variance.py")
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(3)) * 1.5
    p = logits.softmax(-1)
    repeats, g = 20000, torch.Generator().manual_seed(5)
    out = sample_sparse_target(logits.repeat(repeats, 1), draws, head=head, generator=g, scheme=scheme)
    if head:
        head_probs = dequantize_probs(quantize_probs(out[1], g)) if quantized else out[1]
        weights, ids = head_tail_weights(head_probs, out[-1]), torch.cat([out[0], out[-2]], -1)
    else:
        weights, ids = out[-1].float() / draws, out[-2]
    targets = torch.zeros(repeats * 2, 30).scatter_add_(-1, ids, weights).view(repeats, 2, 30)
    measured = (targets - p).pow(2).sum(-1).mean(0).double()
    expected = bench.target_error(p, head, draws, scheme, quantized)
    torch.testing.assert_close(measured, expected, rtol=0.05, atol=1e-6)
    assert bench.layout_bytes(head, draws, quantized) == (3 if quantized else 4) * head + 2 * draws


def test_the_8_bit_heads_rounding_error_is_in_the_closed_form():
    """A head holding almost all the mass: the error is the head's rounding, ``sum f (1 - f) / 255^2``."""
    bench = load_module("benchmarks/bench_rskd_variance.py")
    logits = torch.full((1, 20), -12.0)
    logits[0, :3] = torch.tensor([0.3, 0.0, -0.4])
    p = logits.softmax(-1)
    g = torch.Generator().manual_seed(2)
    head_ids, head_probs, tail_ids, counts = sample_sparse_target(logits.repeat(40000, 1), 7, head=3, generator=g)
    weights = head_tail_weights(dequantize_probs(quantize_probs(head_probs, g)), counts)
    targets = torch.zeros(40000, 20).scatter_add_(-1, torch.cat([head_ids, tail_ids], -1), weights)
    measured = (targets - p).pow(2).sum(-1).mean().double()
    quantized, exact = (bench.target_error(p, 3, 7, "iid", q)[0] for q in (True, False))
    assert quantized > 100 * exact  # the rounding dominates
    torch.testing.assert_close(measured, quantized, rtol=0.05, atol=0.0)


@pytest.mark.parametrize("scheme", ["iid", "systematic"])
def test_the_closed_form_error_of_adaptive_draws_is_their_mean_squared_error(scheme):
    """``sample_allocation: adaptive``: the closed form with each token's allocated ``n_t`` (:func:`allocated_draws`,
    the library's allocation per block) against the library's pooled draws regrouped per token; and it is below
    the even allocation's at the same bytes."""
    from hf_distill.vocab_losses import regroup_draws

    bench = load_module("benchmarks/bench_rskd_variance.py")
    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(3)) * torch.tensor(
        [0.2, 1.0, 3.0, 0.5, 2.0, 1.5]
    )[:, None]
    p = logits.softmax(-1)
    head, draws, repeats, g = 2, 5, 8000, torch.Generator().manual_seed(5)
    lengths = bench.allocated_draws(p, head, draws, block=3)  # two blocks of three tokens
    assert lengths.view(2, 3).sum(-1).tolist() == [15, 15] and len(set(lengths.tolist())) > 1
    targets = []
    for _ in range(repeats):
        blocks = [sample_sparse_target(logits[i : i + 3], draws, head=head, generator=g, counts=False, scheme=scheme,
                                       allocation="adaptive") for i in (0, 3)]  # fmt: skip
        for i, (head_ids, head_probs, pooled, own) in zip((0, 3), blocks, strict=True):
            assert own.view(-1).tolist() == lengths[i : i + 3].tolist()
            ids, counts = regroup_draws(pooled, own)
            weights = head_tail_weights(head_probs, counts)
            targets.append(torch.zeros(3, 30).scatter_add_(-1, torch.cat([head_ids, ids], -1), weights))
    targets = torch.stack(targets).view(repeats, 6, 30)
    measured = (targets - p).pow(2).sum(-1).mean(0).double()
    expected = bench.target_error(p, head, lengths, scheme, False)
    torch.testing.assert_close(measured, expected, rtol=0.06, atol=1e-6)
    assert expected.sum() < bench.target_error(p, head, draws, scheme, False).sum()
    coded = bench.coded_bytes(p, head, draws, scheme, False, block=3)  # each block's code: its header and draws
    assert 4 * head + 1 + 4 / 3 < coded < 4 * head + 1 + 4 / 3 + 2 * draws
