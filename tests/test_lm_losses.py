"""The chunked language-model losses equal the dense ones, values and gradients; RS-KD is unbiased."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hf_distill import losses
from hf_distill.losses import chunked_lm_losses, sample_teacher_tokens
from hf_distill.vocab_losses import head_tail_weights, sample_head_and_tail, sample_sparse_target

N, D, DT, V = 13, 6, 5, 17  # 13 positions: chunk sizes 4 and 5 do not divide it, 13 and 64 hold it whole


def _inputs(seed=0, k=4, num_samples=6, with_ignored=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g)
    head = torch.randn(V, D, generator=g)
    teacher_hidden = torch.randn(N, DT, generator=g)
    teacher_head = torch.randn(V, DT, generator=g)
    teacher_logits = teacher_hidden @ teacher_head.T
    topk = teacher_logits.topk(k, dim=-1)
    ids, counts = sample_teacher_tokens(teacher_logits, num_samples, 2.0, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    if with_ignored:
        labels[[0, 5, 6]] = -100
    return {
        "hidden": hidden,
        "head": head,
        "teacher_hidden": teacher_hidden,
        "teacher_head": teacher_head,
        "topk_ids": topk.indices,
        "topk_values": topk.values,
        "sampled_ids": ids,
        "sampled_counts": counts,
        "labels": labels,
    }


def _dense_kd(kd, student_logits, x, T):
    """The dense reference: the library's dense losses, or RS-KD written out by hand."""
    teacher_logits = x["teacher_hidden"] @ x["teacher_head"].T
    if kd in ("kl", "reverse_kl", "jsd"):
        return losses.kd_loss(kd, student_logits, teacher_logits, T)
    if kd == "topk":
        return losses.topk_kl_div_loss(student_logits, x["topk_values"], x["topk_ids"], T)
    counts = x["sampled_counts"].double()
    log_p_s = F.log_softmax(student_logits.double() / T, dim=-1).gather(-1, x["sampled_ids"])
    return T**2 * (-(counts / counts.sum(-1, keepdim=True)) * log_p_s).sum(-1).mean()


def _chunked(kd, hidden, head, x, T, chunk_size, labels=None, **kwargs):
    sparse = {"topk": ("topk_ids", "topk_values"), "sampled": ("sampled_ids", "sampled_counts")}.get(kd)
    return chunked_lm_losses(
        hidden,
        head,
        kd=kd,
        temperature=T,
        teacher_hidden=x["teacher_hidden"],
        teacher_head=x["teacher_head"],
        teacher_ids=x[sparse[0]] if sparse else None,
        teacher_values=x[sparse[1]] if sparse else None,
        labels=labels,
        chunk_size=chunk_size,
        **kwargs,
    )


def _leaves(x):
    return x["hidden"].clone().requires_grad_(), x["head"].clone().requires_grad_()


@pytest.mark.parametrize("with_labels", [False, True], ids=["no_labels", "labels"])
@pytest.mark.parametrize("chunk_size", [4, 5, 13, 64])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("kd", ["kl", "reverse_kl", "jsd", "topk", "sampled"])
def test_chunked_equals_dense_values_and_gradients(kd, T, chunk_size, with_labels):
    x = _inputs()
    labels = x["labels"] if with_labels else None
    # Weights that differ, so that a gradient given to the wrong loss would show.
    alpha, beta = 0.7, 1.9

    hidden, head = _leaves(x)
    logits = hidden @ head.T
    dense_kd = _dense_kd(kd, logits, x, T)
    dense_ce = F.cross_entropy(logits, labels, ignore_index=-100) if with_labels else None
    (alpha * dense_kd + (beta * dense_ce if with_labels else 0)).backward()
    dense_grads = hidden.grad, head.grad

    hidden, head = _leaves(x)
    out = _chunked(kd, hidden, head, x, T, chunk_size, labels, kd_weight=alpha, ce_weight=beta)
    out.loss.backward()

    torch.testing.assert_close(out.kd, dense_kd.float(), atol=1e-5, rtol=1e-5)
    if with_labels:
        torch.testing.assert_close(out.ce, dense_ce, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.loss, alpha * out.kd + beta * out.ce)
    else:
        assert out.ce is None
        torch.testing.assert_close(out.loss, alpha * out.kd)
    torch.testing.assert_close(hidden.grad, dense_grads[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head.grad, dense_grads[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kd", ["kl", "sampled"])
def test_the_weights_go_down_once_and_the_parts_are_detached(kd):
    """``loss`` carries ``kd_weight * kd + ce_weight * ce`` and its gradient; a common factor on it (gradient
    accumulation's scaling) scales the gradient; the parts are for logging only."""
    x = _inputs(seed=1)
    grads = []
    for factor, weights in ((1.0, (2.1, 5.7)), (3.0, (0.7, 1.9))):
        hidden, head = _leaves(x)
        out = _chunked(kd, hidden, head, x, 2.0, 5, x["labels"], kd_weight=weights[0], ce_weight=weights[1])
        assert not out.kd.requires_grad and not out.ce.requires_grad
        (factor * out.loss).backward()
        grads.append((hidden.grad, head.grad))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-6)

    hidden, head = _leaves(x)
    kd_only = _chunked(kd, hidden, head, x, 2.0, 5, x["labels"], kd_weight=1.0, ce_weight=0.0)
    torch.testing.assert_close(kd_only.loss, kd_only.kd)
    kd_only.loss.backward()
    reference = _leaves(x)
    _chunked(kd, *reference, x, 2.0, 5).loss.backward()
    torch.testing.assert_close(hidden.grad, reference[0].grad, atol=1e-6, rtol=1e-6)


def test_cross_entropy_alone_matches_torch_and_all_ignored_gives_zero():
    x = _inputs(seed=2)
    hidden, head = _leaves(x)
    out = _chunked(None, hidden, head, x, 1.0, 4, x["labels"])
    assert out.kd.item() == 0.0
    dense = F.cross_entropy(x["hidden"] @ x["head"].T, x["labels"], ignore_index=-100)
    torch.testing.assert_close(out.ce, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, out.ce)
    out.loss.backward()
    assert hidden.grad.abs().sum() > 0 and head.grad.abs().sum() > 0

    out = _chunked(None, *_leaves(x), x, 1.0, 4, torch.full((N,), -100))
    assert out.ce.item() == 0.0


def test_no_gradient_work_without_requires_grad():
    x = _inputs(seed=3)
    out = _chunked("kl", x["hidden"], x["head"], x, 2.0, 4, x["labels"])
    assert not out.loss.requires_grad
    torch.testing.assert_close(
        out.kd, losses.kl_div_loss(x["hidden"] @ x["head"].T, _teacher_logits(x), 2.0)
    )


def _teacher_logits(x):
    return x["teacher_hidden"] @ x["teacher_head"].T


def test_bfloat16_inputs_close_to_float32():
    x = _inputs(seed=4)
    hidden, head = (t.bfloat16().requires_grad_() for t in (x["hidden"], x["head"]))
    kd_value = _chunked(
        "kl",
        hidden,
        head,
        x | {"teacher_hidden": x["teacher_hidden"].bfloat16(), "teacher_head": x["teacher_head"].bfloat16()},
        2.0,
        5,
    ).loss
    kd_value.backward()
    assert kd_value.dtype == torch.float32 and hidden.grad.dtype == torch.bfloat16
    reference = losses.kl_div_loss(
        hidden.float() @ head.float().T, _teacher_logits(x).bfloat16().float(), 2.0
    )
    torch.testing.assert_close(kd_value, reference, atol=2e-2, rtol=2e-2)


def test_sampler_counts_distinct_ids_and_pads():
    logits = torch.randn(50, 9, generator=torch.Generator().manual_seed(5)) * 2
    ids, counts = sample_teacher_tokens(logits, 7, 1.5, generator=torch.Generator().manual_seed(6))
    assert ids.shape == counts.shape == (50, 7)
    assert (counts.sum(-1) == 7).all()
    for row_ids, row_counts in zip(ids.tolist(), counts.tolist(), strict=True):
        used = [i for i, c in zip(row_ids, row_counts, strict=True) if c > 0]
        assert used == sorted(set(used))  # distinct, ascending, left-aligned
        assert row_counts[len(used) :] == [0] * (7 - len(used)) and row_ids[len(used) :] == [0] * (
            7 - len(used)
        )


def test_sampler_frequencies_follow_the_tempered_softmax():
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0]]).repeat(4000, 1)
    ids, counts = sample_teacher_tokens(logits, 5, 2.0, generator=torch.Generator().manual_seed(7))
    frequency = torch.zeros(4).scatter_add_(0, ids.flatten(), counts.flatten().float()) / counts.sum()
    expected = F.softmax(logits[0] / 2.0, dim=-1)
    # 20,000 draws: the standard error of each frequency is below 0.004.
    torch.testing.assert_close(frequency, expected, atol=0.015, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kd": "forward_kl"}, "not one of"),
        ({"kd": None}, "got neither"),
        ({"kd": "kl", "teacher_hidden": None}, "needs the live teacher"),
        ({"kd": "topk"}, "needs teacher_ids"),
        ({"kd": "kl", "chunk_size": 0}, "chunk_size"),
        ({"kd": "kl", "temperature": 0.0}, "temperature"),
        ({"kd": "kl", "labels": torch.zeros(3, dtype=torch.long)}, "labels must be"),
        ({"kd": "kl", "teacher_head": torch.zeros(V + 1, DT)}, "share the vocabulary"),
        ({"kd": "kl", "kd_weight": 0.0, "ce_weight": 0.0}, "not both zero"),
        ({"kd": "kl", "kd_weight": -1.0}, "kd_weight=-1.0"),
    ],
)
def test_bad_inputs_say_what_is_wrong(kwargs, message):
    x = _inputs()
    arguments = {"teacher_hidden": x["teacher_hidden"], "teacher_head": x["teacher_head"]} | kwargs
    with pytest.raises(ValueError, match=message):
        chunked_lm_losses(x["hidden"], x["head"], **arguments)


def test_float_ids_or_labels_are_refused():
    x = _inputs()
    with pytest.raises(TypeError, match="teacher_ids must be integer"):
        chunked_lm_losses(
            x["hidden"],
            x["head"],
            kd="topk",
            teacher_ids=x["topk_ids"].float(),
            teacher_values=x["topk_values"],
        )
    with pytest.raises(TypeError, match="labels must be integer"):
        chunked_lm_losses(x["hidden"], x["head"], kd=None, labels=x["labels"].float())


def _gradients(kd_value, hidden, head):
    grads = torch.autograd.grad(kd_value, (hidden, head))
    return torch.cat([g.flatten() for g in grads])


def test_sampled_gradient_is_unbiased_for_the_forward_kl_gradient():
    """Mean gradient over many independent RS-KD draws = dense forward-KL gradient, within 4 standard errors.

    The same tolerance rejects top-k's gradient (k = 3 of 11), a biased estimate: the test can tell a
    biased estimate from an unbiased one at this number of draws.
    """
    T, draws, num_samples = 2.0, 400, 12
    g = torch.Generator().manual_seed(8)
    n, d, vocab = 3, 4, 11
    hidden = torch.randn(n, d, generator=g).requires_grad_()
    head = torch.randn(vocab, d, generator=g).requires_grad_()
    teacher_logits = torch.randn(n, vocab, generator=g) * 2
    # The dense teacher as hidden states and head: identity head, so teacher logits = teacher_hidden.
    dense = {"teacher_hidden": teacher_logits, "teacher_head": torch.eye(vocab)}
    kl_value = chunked_lm_losses(hidden, head, kd="kl", temperature=T, **dense, chunk_size=2).loss
    dense_grad = _gradients(kl_value, hidden, head)

    ids, counts = sample_teacher_tokens(teacher_logits.repeat(draws, 1), num_samples, T, generator=g)
    ids, counts = ids.view(draws, n, num_samples), counts.view(draws, n, num_samples)
    values, grads = [], []
    for r in range(draws):
        value = chunked_lm_losses(
            hidden,
            head,
            kd="sampled",
            temperature=T,
            teacher_ids=ids[r],
            teacher_values=counts[r],
            chunk_size=2,
        ).loss
        values.append(value.detach())
        grads.append(_gradients(value, hidden, head))
    grads = torch.stack(grads)
    mean, standard_error = grads.mean(0), grads.std(0) / draws**0.5
    tolerance = 4 * standard_error + 1e-6
    assert ((mean - dense_grad).abs() <= tolerance).all(), ((mean - dense_grad).abs() / standard_error).max()

    # The value estimates the cross-entropy T**2 * H(p_t, p_s) = KL + T**2 * H(p_t), not the KL.
    log_p_t = F.log_softmax(teacher_logits / T, dim=-1)
    teacher_entropy = T**2 * -(log_p_t.exp() * log_p_t).sum(-1).mean()
    values = torch.stack(values)
    expected = kl_value.detach() + teacher_entropy
    assert (values.mean() - expected).abs() <= 4 * values.std() / draws**0.5

    topk = teacher_logits.topk(3, dim=-1)
    topk_value = chunked_lm_losses(
        hidden,
        head,
        kd="topk",
        temperature=T,
        teacher_ids=topk.indices,
        teacher_values=topk.values,
        chunk_size=2,
    ).loss
    assert ((_gradients(topk_value, hidden, head) - dense_grad).abs() > tolerance).any()


def _sparse_gradients(hidden, head, T, ids, values, draws):
    """The ``kd="sampled"`` gradient for each of ``draws`` sparse targets, stacked."""
    grads = []
    for r in range(draws):
        value = chunked_lm_losses(
            hidden,
            head,
            kd="sampled",
            temperature=T,
            teacher_ids=ids[r],
            teacher_values=values[r],
            chunk_size=2,
        ).loss
        grads.append(_gradients(value, hidden, head))
    return torch.stack(grads)


def test_exact_head_and_sampled_tail_is_unbiased_for_the_teacher_and_its_gradient():
    """Head ids weigh ``p_i``, each tail draw ``(1 - sum_head p) c_j / n``: the sparse target's mean over
    many draws is the teacher's distribution, and the loss gradient's mean the dense forward-KL
    gradient, within 4 standard errors; its gradient varies less than plain RS-KD's at about the same bytes."""
    T, draws, head_count, num_samples = 2.0, 400, 2, 10
    g = torch.Generator().manual_seed(8)
    n, d, vocab = 3, 4, 11
    hidden = torch.randn(n, d, generator=g).requires_grad_()
    head = torch.randn(vocab, d, generator=g).requires_grad_()
    teacher_logits = torch.randn(n, vocab, generator=g) * 2
    p_t = F.softmax(teacher_logits / T, dim=-1)
    dense = {"teacher_hidden": teacher_logits, "teacher_head": torch.eye(vocab)}
    kl_value = chunked_lm_losses(hidden, head, kd="kl", temperature=T, **dense, chunk_size=2).loss
    dense_grad = _gradients(kl_value, hidden, head)

    head_ids, head_probs, tail_ids, tail_counts = sample_head_and_tail(
        teacher_logits.repeat(draws, 1), head_count, num_samples, T, generator=g
    )
    assert torch.equal(head_ids, p_t.topk(head_count).indices.repeat(draws, 1))
    assert not (tail_ids.unsqueeze(-1) == head_ids.unsqueeze(-2))[tail_counts > 0].any()  # tail: not the head
    assert tail_counts.sum(-1).eq(num_samples).all()
    ids = torch.cat([head_ids, tail_ids], -1)
    weights = head_tail_weights(head_probs, tail_counts)
    torch.testing.assert_close(weights.sum(-1), torch.ones(len(weights)))
    # The sparse target as a distribution over the vocabulary: its mean over the draws is p_t.
    targets = torch.zeros(draws * n, vocab).scatter_add_(-1, ids, weights).view(draws, n, vocab)
    mean, standard_error = targets.mean(0), targets.std(0) / draws**0.5
    assert ((mean - p_t).abs() <= 4 * standard_error + 1e-6).all(), (
        (mean - p_t).abs() / standard_error
    ).max()
    torch.testing.assert_close(targets[0].gather(-1, head_ids[:n]), p_t.gather(-1, head_ids[:n]))

    width = head_count + num_samples
    grads = _sparse_gradients(
        hidden, head, T, ids.view(draws, n, width), weights.view(draws, n, width), draws
    )
    mean, standard_error = grads.mean(0), grads.std(0) / draws**0.5
    tolerance = 4 * standard_error + 1e-6
    assert ((mean - dense_grad).abs() <= tolerance).all(), ((mean - dense_grad).abs() / standard_error).max()

    # Plain RS-KD at about the same bytes per token (12 draws: 36 B; 2 head tokens + 10 draws: 38 B) varies more.
    plain_ids, plain_counts = sample_teacher_tokens(teacher_logits.repeat(draws, 1), 12, T, generator=g)
    plain = _sparse_gradients(
        hidden, head, T, plain_ids.view(draws, n, 12), plain_counts.view(draws, n, 12), draws
    )
    assert (grads - dense_grad).pow(2).mean() < (plain - dense_grad).pow(2).mean()


def test_head_and_tail_when_the_head_holds_all_the_mass():
    logits = torch.tensor([[0.0, -1e4, -1e4, -1e4], [2.0, 1.0, 0.0, -1.0]])
    head_ids, head_probs, tail_ids, tail_counts = sample_head_and_tail(
        logits, 1, 3, generator=torch.Generator().manual_seed(0)
    )
    weights = head_tail_weights(head_probs, tail_counts)
    assert head_ids[:, 0].tolist() == [0, 0] and head_probs[0, 0] == 1.0
    assert weights[0, 1:].eq(0).all()  # the tail's draws (uniform) weigh nothing
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    with pytest.raises(ValueError, match="head=4 must be between 1 and the vocabulary size minus one"):
        sample_head_and_tail(logits, 4, 3)


def _mean_target(ids, weights, draws, n, vocab):
    return torch.zeros(draws * n, vocab).scatter_add_(-1, ids, weights).view(draws, n, vocab).mean(0)


def test_tempered_proposal_weights_are_self_normalised_and_consistent():
    """Draws from ``q ∝ p**(1/tau)`` weighted ``c_j p_j / q_j``, normalised: weights sum to 1, ``tau = 1`` is
    plain RS-KD draw for draw, and the mean target's error (the ratio estimator's bias) shrinks as ``1/n``."""
    g = torch.Generator().manual_seed(8)
    T, n, vocab, draws = 2.0, 3, 11, 2000
    logits = torch.randn(n, vocab, generator=g) * 2
    p_t = F.softmax(logits / T, dim=-1)
    plain = sample_teacher_tokens(logits, 7, T, generator=torch.Generator().manual_seed(1))
    same = sample_sparse_target(
        logits, 7, T, proposal_temperature=1.0, generator=torch.Generator().manual_seed(1)
    )
    assert all(torch.equal(a, b) for a, b in zip(plain, same, strict=True))
    for tau in (2.0, 0.5):
        errors = []
        for num_samples in (10, 40):
            ids, weights = sample_sparse_target(
                logits.repeat(draws, 1), num_samples, T, proposal_temperature=tau, generator=g
            )
            assert weights.dtype == torch.float32
            torch.testing.assert_close(weights.sum(-1), torch.ones(draws * n))
            errors.append((_mean_target(ids, weights, draws, n, vocab) - p_t).abs().max())
        assert errors[1] < 0.5 * errors[0] and errors[1] < 0.03, (tau, errors)
        # with an exact head: the head exact, the tail's weights in the counts' place
        head_ids, head_probs, tail_ids, tail_weights = sample_sparse_target(
            logits.repeat(draws, 1), 40, T, head=2, proposal_temperature=tau, generator=g
        )
        torch.testing.assert_close(head_probs[:n], p_t.topk(2).values)
        target = _mean_target(
            torch.cat([head_ids, tail_ids], -1), head_tail_weights(head_probs, tail_weights), draws, n, vocab
        )
        assert (target - p_t).abs().max() < 0.01


def test_a_second_backward_says_to_recompute():
    x = _inputs(seed=9)
    hidden, head = _leaves(x)
    kd_value = _chunked("kl", hidden, head, x, 1.0, 4).loss
    kd_value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="compute the losses again"):
        kd_value.backward()


def _bench():
    path = Path(__file__).parent.parent / "benchmarks" / "bench_lm_loss.py"
    spec = importlib.util.spec_from_file_location("bench_lm_loss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_variants_compute_the_same_gradients():
    """Dense and chunked variants of the memory benchmark compare like with like."""
    bench = _bench()
    x = bench.make_inputs(40, 8, 64, k=5, num_samples=4, device="cpu") | {"chunk_size": 16}
    grads = {variant: bench.run_variant(variant, x) for variant in bench.VARIANTS}
    for dense, chunked in bench.PAIRS.values():
        torch.testing.assert_close(grads[chunked], grads[dense], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_benchmark_small_writes_every_ratio(tmp_path):
    bench = _bench()
    results = bench.main(["--small", "--rounds", "1", "--out", str(tmp_path / "lm_loss.json")])
    assert json.loads((tmp_path / "lm_loss.json").read_text()) == json.loads(json.dumps(results))
    assert set(results["summary"]) == set(bench.VARIANTS)
    assert all(s["median_seconds"] > 0 and s["peak_mib"] > 0 for s in results["summary"].values())
    assert set(results["ratios"]) == {"kl", "topk", "sampled"}


# ---- gaps found by mutation testing (benchmarks/mutation_results.md, issue 21) --------------------------------


@pytest.mark.parametrize(
    "draw",
    [
        lambda z, **kw: sample_teacher_tokens(z, **kw),
        lambda z, **kw: sample_head_and_tail(z, 2, **kw),
        lambda z, **kw: sample_sparse_target(z, **kw, proposal_temperature=2.0),
        lambda z, **kw: sample_sparse_target(z, **kw, head=2, proposal_temperature=0.5),
    ],
    ids=["plain", "head", "tempered", "head-tempered"],
)
def test_sampling_refuses_bad_settings_and_accepts_one_draw(draw):
    z = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    with pytest.raises(
        ValueError, match=r"got shape \(1, 3, 7\); flatten the batch and sequence dimensions first"
    ):
        draw(z[None], num_samples=4)
    with pytest.raises(ValueError, match="num_samples=0 must be at least 1"):
        draw(z, num_samples=0)
    with pytest.raises(ValueError, match="temperature=0.0 must be positive"):
        draw(z, num_samples=4, temperature=0.0)
    ids, weights = (out := draw(z, num_samples=1))[-2:]
    assert ids.shape == weights.shape == (3, 1) and len(out) in (2, 4)


def test_sampling_refuses_a_head_out_of_range_and_a_bad_proposal_temperature():
    z = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="vocabulary size minus one, 6"):
        sample_head_and_tail(z, 7, 4)
    for tau in (0.0, float("inf")):
        with pytest.raises(ValueError, match=f"proposal_temperature={tau} must be positive and finite"):
            sample_sparse_target(z, 4, proposal_temperature=tau)


@pytest.mark.parametrize(
    "kwargs", [{}, {"head": 2}, {"proposal_temperature": 2.0}, {"head": 2, "proposal_temperature": 2.0}]
)
def test_draws_are_reproducible_from_the_generator_and_default_to_t_1(kwargs):
    """A cache's draws are a function of its generator's seed (and ``temperature`` defaults to 1)."""
    z = torch.randn(20, 9, generator=torch.Generator().manual_seed(1)) * 3
    first = sample_sparse_target(z, 5, generator=torch.Generator().manual_seed(4), **kwargs)
    again = sample_sparse_target(z, 5, 1.0, generator=torch.Generator().manual_seed(4), **kwargs)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    other = sample_sparse_target(z, 5, 2.0, generator=torch.Generator().manual_seed(4), **kwargs)
    assert any(not torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_tempered_weights_of_a_row_with_one_distinct_draw_are_one():
    """Padding slots (count 0) get no weight, and a row's weights sum to 1 whatever its scale."""
    z = torch.tensor([[30.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    ids, weights = sample_sparse_target(
        z, 6, proposal_temperature=0.5, generator=torch.Generator().manual_seed(0)
    )
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    assert weights[0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0] and ids[0, 0] == 0


def test_a_padded_position_without_draws_weighs_its_head_only():
    head_probs = torch.tensor([[0.5, 0.25], [0.5, 0.25]])
    tail_counts = torch.tensor([[2, 1, 1], [0, 0, 0]])
    weights = head_tail_weights(head_probs, tail_counts)
    torch.testing.assert_close(
        weights, torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625], [0.5, 0.25, 0, 0, 0]])
    )


@pytest.mark.parametrize("frozen", ["head", "hidden"])
def test_a_frozen_head_or_hidden_state_gets_no_gradient(frozen):
    """Backward scales only the gradients that forward formed (a frozen output embedding has none)."""
    x = _inputs(seed=11)
    hidden, head = _leaves(x)
    (head if frozen == "head" else hidden).requires_grad_(False)
    _chunked("kl", hidden, head, x, 2.0, 4, labels=x["labels"]).loss.mul(3.0).backward()
    ref_hidden, ref_head = _leaves(x)
    _chunked("kl", ref_hidden, ref_head, x, 2.0, 4, labels=x["labels"]).loss.mul(3.0).backward()
    trained, reference = (hidden, ref_hidden) if frozen == "head" else (head, ref_head)
    torch.testing.assert_close(trained.grad, reference.grad)
    assert (head if frozen == "head" else hidden).grad is None
