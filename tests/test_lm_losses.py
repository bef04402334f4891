"""The chunked language-model losses equal the dense ones, values and gradients; RS-KD is unbiased."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import load_module

from hf_distill import losses
from hf_distill.losses import chunked_lm_losses, sample_teacher_tokens
from hf_distill.vocab_losses import (
    allocate_draws,
    dequantize_probs,
    draws_of,
    head_tail_weights,
    normalised,
    quantize_probs,
    regroup_draws,
    sample_head_and_tail,
    sample_sparse_target,
)

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
    torch.testing.assert_close(out.kd, losses.kl_div_loss(x["hidden"] @ x["head"].T, _teacher_logits(x), 2.0))


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


KD_NAMES = "('kl', 'reverse_kl', 'jsd', 'topk', 'sampled')"


def _student_shapes(hidden: str, head: str) -> str:
    return (
        f"student_hidden must be (N, D) and student_head (V, D); got {hidden} and {head}. "
        "Flatten the batch: hidden[mask] or hidden.flatten(0, 1)."
    )


def _teacher_shapes(hidden: str, head: str) -> str:
    return (
        f"teacher_hidden must be (N, Dt) = ({N}, Dt) and teacher_head (V, Dt) = ({V}, Dt); got {hidden} and {head}. "
        "Teacher and student must share the vocabulary."
    )


def _sparse_shapes(ids: str, values: str) -> str:
    return f"teacher_ids and teacher_values must both be (N, k) with N = {N}; got {ids} and {values}."


def _weights(kd_weight, ce_weight) -> str:
    return f"kd_weight={kd_weight} and ce_weight={ce_weight} must be finite, >= 0 and not both zero."


def _ids(*shape, dtype=torch.long):
    return torch.zeros(*shape, dtype=dtype)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        pytest.param(
            {"kd": "forward_kl"},
            ValueError,
            f"kd='forward_kl' is not one of {KD_NAMES} (or None for the hard-label CE only).",
            id="unknown kd",
        ),
        pytest.param(
            {"kd": None},
            ValueError,
            f"chunked_lm_losses needs kd (one of {KD_NAMES}) or labels, or both; got neither.",
            id="neither kd nor labels",
        ),
        pytest.param(
            {"hidden": torch.zeros(2, D, 3)},
            ValueError,
            _student_shapes("(2, 6, 3)", "(17, 6)"),
            id="3-D hidden",
        ),
        pytest.param(
            {"head": torch.zeros(V, D, 1)},
            ValueError,
            _student_shapes("(13, 6)", "(17, 6, 1)"),
            id="3-D head",
        ),
        pytest.param(
            {"head": torch.zeros(V, D + 1)},
            ValueError,
            _student_shapes("(13, 6)", "(17, 7)"),
            id="head width",
        ),
        pytest.param({"temperature": 0.0}, ValueError, "temperature=0.0 must be positive.", id="T=0"),
        pytest.param({"temperature": -1.0}, ValueError, "temperature=-1.0 must be positive.", id="T<0"),
        pytest.param(
            {"chunk_size": 0}, ValueError, "chunk_size=0 must be at least 1 position.", id="chunk 0"
        ),
        # -0.5 with the other weight 1: a sum that is not 0, so only the sign refuses it
        pytest.param({"kd_weight": -0.5}, ValueError, _weights(-0.5, 1.0), id="kd_weight<0"),
        pytest.param({"ce_weight": -0.5}, ValueError, _weights(1.0, -0.5), id="ce_weight<0"),
        pytest.param({"kd_weight": math.inf}, ValueError, _weights(math.inf, 1.0), id="kd_weight=inf"),
        pytest.param({"ce_weight": math.inf}, ValueError, _weights(1.0, math.inf), id="ce_weight=inf"),
        pytest.param({"kd_weight": math.nan}, ValueError, _weights(math.nan, 1.0), id="kd_weight=nan"),
        pytest.param(
            {"kd_weight": 0.0, "ce_weight": 0.0}, ValueError, _weights(0.0, 0.0), id="both weights 0"
        ),
        pytest.param(
            {"labels": _ids(3)}, ValueError, f"labels must be (N,) = ({N},), got (3,).", id="labels length"
        ),
        pytest.param(
            {"labels": _ids(1, N)},
            ValueError,
            f"labels must be (N,) = ({N},), got (1, {N}).",
            id="2-D labels",
        ),
        pytest.param(
            {"kd": None, "labels": torch.zeros(N)},
            TypeError,
            "labels must be integer token ids (-100 to ignore), got dtype torch.float32.",
            id="float labels",
        ),
        pytest.param(
            {"kd": None, "labels": _ids(N, dtype=torch.bool)},
            TypeError,
            "labels must be integer token ids (-100 to ignore), got dtype torch.bool.",
            id="bool labels",
        ),
        pytest.param(
            {"teacher_hidden": None},
            ValueError,
            "kd='kl' needs the live teacher's teacher_hidden (N, Dt) and teacher_head (V, Dt).",
            id="no teacher hidden",
        ),
        pytest.param(
            {"kd": "jsd", "teacher_head": None},
            ValueError,
            "kd='jsd' needs the live teacher's teacher_hidden (N, Dt) and teacher_head (V, Dt).",
            id="no teacher head",
        ),
        pytest.param(
            {"teacher_head": torch.zeros(V + 1, DT)},
            ValueError,
            _teacher_shapes("(13, 5)", "(18, 5)"),
            id="teacher vocabulary",
        ),
        pytest.param(
            {"teacher_hidden": torch.zeros(N, DT, 1)},
            ValueError,
            _teacher_shapes("(13, 5, 1)", "(17, 5)"),
            id="3-D teacher hidden",
        ),
        pytest.param(
            {"teacher_hidden": torch.zeros(N + 1, DT)},
            ValueError,
            _teacher_shapes("(14, 5)", "(17, 5)"),
            id="teacher positions",
        ),
        pytest.param(
            {"teacher_head": torch.zeros(V, DT + 1)},
            ValueError,
            _teacher_shapes("(13, 5)", "(17, 6)"),
            id="teacher width",
        ),
        pytest.param(
            {"kd": "topk"},
            ValueError,
            "kd='topk' needs teacher_ids (N, k) and teacher_values (N, k), the top-k logits.",
            id="no top-k",
        ),
        pytest.param(
            {"kd": "sampled"},
            ValueError,
            "kd='sampled' needs teacher_ids (N, k) and teacher_values (N, k), the sample counts.",
            id="no samples",
        ),
        pytest.param(
            {"kd": "topk", "teacher_values": torch.zeros(N, 4)},
            ValueError,
            "kd='topk' needs teacher_ids (N, k) and teacher_values (N, k), the top-k logits.",
            id="top-k values without ids",
        ),
        pytest.param(
            {"kd": "sampled", "teacher_ids": _ids(N, 4)},
            ValueError,
            "kd='sampled' needs teacher_ids (N, k) and teacher_values (N, k), the sample counts.",
            id="sample ids without counts",
        ),
        pytest.param(
            {"kd": "topk", "teacher_ids": _ids(N + 1, 4), "teacher_values": torch.zeros(N + 1, 4)},
            ValueError,
            _sparse_shapes("(14, 4)", "(14, 4)"),
            id="sparse positions",
        ),
        pytest.param(
            {"kd": "sampled", "teacher_ids": _ids(N, 4), "teacher_values": torch.zeros(N, 3)},
            ValueError,
            _sparse_shapes("(13, 4)", "(13, 3)"),
            id="ids and values differ",
        ),
        pytest.param(
            {"kd": "sampled", "teacher_ids": _ids(N), "teacher_values": torch.zeros(N)},
            ValueError,
            _sparse_shapes("(13,)", "(13,)"),
            id="1-D sparse",
        ),
        pytest.param(
            {"kd": "topk", "teacher_ids": torch.zeros(N, 4), "teacher_values": torch.zeros(N, 4)},
            TypeError,
            "teacher_ids must be integer token ids, got dtype torch.float32.",
            id="float ids",
        ),
        pytest.param(
            {
                "kd": "sampled",
                "teacher_ids": _ids(N, 4, dtype=torch.bool),
                "teacher_values": torch.zeros(N, 4),
            },
            TypeError,
            "teacher_ids must be integer token ids, got dtype torch.bool.",
            id="bool ids",
        ),
        pytest.param(
            {"kd": "jsd", "jsd_mixture": 1.5},
            ValueError,
            "jsd_mixture=1.5 must be in [0, 1] (0: forward KL, 1: reverse KL).",
            id="mixture above 1",
        ),
        pytest.param(
            {"kd": "jsd", "jsd_mixture": -0.1},
            ValueError,
            "jsd_mixture=-0.1 must be in [0, 1] (0: forward KL, 1: reverse KL).",
            id="mixture below 0",
        ),
    ],
)
def test_bad_inputs_are_refused_with_one_message_saying_what_is_wrong(change, error, message):
    x = _inputs()
    arguments = {
        "hidden": x["hidden"],
        "head": x["head"],
        "kd": "kl",
        "teacher_hidden": x["teacher_hidden"],
        "teacher_head": x["teacher_head"],
    } | change
    with pytest.raises(error, match="^" + re.escape(message) + "$"):
        chunked_lm_losses(arguments.pop("hidden"), arguments.pop("head"), **arguments)


def test_the_edges_of_the_accepted_ranges_are_accepted():
    """One position a chunk gives the losses of one chunk; a weight of 0 (the other not) drops its term."""
    x = _inputs(seed=12)
    whole = _chunked("kl", x["hidden"], x["head"], x, 2.0, N, x["labels"])
    torch.testing.assert_close(_chunked("kl", x["hidden"], x["head"], x, 2.0, 1, x["labels"]), whole)
    kd_off = _chunked("kl", x["hidden"], x["head"], x, 2.0, 4, x["labels"], kd_weight=0.0)
    torch.testing.assert_close(kd_off.loss, whole.ce)
    ce_off = _chunked("kl", x["hidden"], x["head"], x, 2.0, 4, x["labels"], ce_weight=0.0)
    torch.testing.assert_close(ce_off.loss, whole.kd)


def test_one_position_with_one_label_is_its_own_mean():
    """N = 1 and one labelled position: the means divide by 1, in the value and in the gradient."""
    x = _inputs(seed=13)
    one = x | {key: x[key][1:2] for key in ("hidden", "teacher_hidden", "labels")}
    assert one["labels"].item() != -100
    hidden, head = _leaves(one)
    out = _chunked("kl", hidden, head, one, 2.0, 4, one["labels"])
    out.loss.backward()
    ref_hidden, ref_head = _leaves(one)
    logits = ref_hidden @ ref_head.T
    kd = losses.kl_div_loss(logits, _teacher_logits(one), 2.0)
    ce = F.cross_entropy(logits, one["labels"])
    (kd + ce).backward()
    torch.testing.assert_close((out.kd, out.ce), (kd.detach(), ce.detach()))
    torch.testing.assert_close(
        (hidden.grad, head.grad), (ref_hidden.grad, ref_head.grad), atol=1e-6, rtol=1e-5
    )


def test_half_precision_gradients_sum_over_every_chunk():
    """bfloat16 inputs: the head's gradient, accumulated over three chunks, is close to the float32 one."""
    x = _inputs(seed=14)
    rounded = {key: x[key].bfloat16() for key in ("hidden", "head", "teacher_hidden", "teacher_head")}
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        hidden, head = (rounded[key].to(dtype).requires_grad_() for key in ("hidden", "head"))
        teacher = x | {key: rounded[key].to(dtype) for key in ("teacher_hidden", "teacher_head")}
        _chunked("kl", hidden, head, teacher, 2.0, 5, x["labels"]).loss.backward()
        assert head.grad.dtype == dtype
        grads[dtype] = (hidden.grad.float(), head.grad.float())
    for low, high in zip(grads[torch.bfloat16], grads[torch.float32], strict=True):
        assert (low - high).norm() < 0.02 * high.norm()


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
    message = (
        "chunked_lm_losses keeps one copy of its gradients, used by the first backward; "
        "compute the losses again for a second backward (retain_graph=True cannot reuse them)."
    )
    with pytest.raises(RuntimeError, match="^" + re.escape(message) + "$"):
        kd_value.backward()


def _bench():
    return load_module("benchmarks/bench_lm_loss.py")


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


DRAWS = [
    pytest.param(lambda z, **kw: sample_teacher_tokens(z, **kw), id="plain"),
    pytest.param(lambda z, **kw: sample_head_and_tail(z, 2, **kw), id="head"),
    pytest.param(lambda z, **kw: sample_sparse_target(z, **kw, proposal_temperature=2.0), id="tempered"),
    pytest.param(
        lambda z, **kw: sample_sparse_target(z, **kw, head=2, proposal_temperature=0.5), id="head-tempered"
    ),
]


@pytest.mark.parametrize("draw", DRAWS)
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        pytest.param(
            {"batched": True, "num_samples": 4},
            "teacher_logits must be (N, V), got shape (1, 3, 7); flatten the batch and sequence dimensions "
            "first (logits.flatten(0, -2)).",
            id="3-D logits",
        ),
        pytest.param({"num_samples": 0}, "num_samples=0 must be at least 1.", id="no draws"),
        pytest.param({"num_samples": 4, "temperature": 0.0}, "temperature=0.0 must be positive.", id="T=0"),
        pytest.param({"num_samples": 4, "temperature": -1.0}, "temperature=-1.0 must be positive.", id="T<0"),
    ],
)
def test_sampling_refuses_bad_settings_with_one_message(draw, setting, message):
    z = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    setting = dict(setting)
    batched = setting.pop("batched", False)
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        draw(z[None] if batched else z, **setting)


@pytest.mark.parametrize("draw", DRAWS)
def test_sampling_accepts_one_draw(draw):
    z = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    ids, weights = (out := draw(z, num_samples=1))[-2:]
    assert ids.shape == weights.shape == (3, 1) and len(out) in (2, 4)


def _head_range(head: int) -> str:
    return f"head={head} must be between 1 and the vocabulary size minus one, 6."


def _proposal(tau: float) -> str:
    return f"proposal_temperature={tau} must be positive and finite."


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda z: sample_head_and_tail(z, 7, 4), _head_range(7), id="head = vocabulary"),
        pytest.param(lambda z: sample_head_and_tail(z, 0, 4), _head_range(0), id="head 0"),
        pytest.param(
            lambda z: sample_sparse_target(z, 4, head=7), _head_range(7), id="sparse head = vocabulary"
        ),
        pytest.param(lambda z: sample_sparse_target(z, 4, head=-1), _head_range(-1), id="sparse head < 0"),
        pytest.param(
            lambda z: sample_sparse_target(z, 4, proposal_temperature=0.0), _proposal(0.0), id="tau 0"
        ),
        pytest.param(
            lambda z: sample_sparse_target(z, 4, proposal_temperature=-1.0), _proposal(-1.0), id="tau<0"
        ),
        pytest.param(
            lambda z: sample_sparse_target(z, 4, proposal_temperature=math.inf),
            _proposal(math.inf),
            id="tau inf",
        ),
        pytest.param(
            lambda z: sample_sparse_target(z, 4, head=2, proposal_temperature=0.0),
            _proposal(0.0),
            id="head, tau 0",
        ),
    ],
)
def test_sampling_refuses_a_head_out_of_range_and_a_bad_proposal_temperature(call, message):
    z = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        call(z)


def test_a_head_may_hold_more_tokens_than_there_are_rows():
    """The head is bounded by the vocabulary (7), not by the number of positions (3)."""
    z = torch.randn(3, 7, generator=torch.Generator().manual_seed(2))
    for head in (4, 6):
        head_ids, head_probs, tail_ids, tail_counts = sample_head_and_tail(
            z, head, 5, generator=torch.Generator().manual_seed(3)
        )
        torch.testing.assert_close(head_probs, F.softmax(z, dim=-1).topk(head).values)
        assert head_ids.shape == (3, head) and tail_counts.sum(-1).tolist() == [5, 5, 5]


def test_an_exact_head_with_a_tempered_tail_stores_importance_weights_not_counts():
    """``head > 0`` and ``proposal_temperature != 1``: the tail's float weights sum to 1 per position."""
    z = torch.randn(20, 9, generator=torch.Generator().manual_seed(1)) * 3
    *_, counts = sample_sparse_target(z, 5, head=2, generator=torch.Generator().manual_seed(4))
    *_, weights = sample_sparse_target(
        z, 5, head=2, proposal_temperature=2.0, generator=torch.Generator().manual_seed(4)
    )
    assert counts.dtype == torch.int64 and counts.sum(-1).eq(5).all()
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights.sum(-1), torch.ones(20))


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


@pytest.mark.parametrize("head", [0, 1])
def test_tempered_draws_of_a_confident_teacher_stay_finite(head):
    """A proposal at tau < 1 sharpens the teacher: p**(1/tau) of a confident row under- and overflows float32
    unless the row's maximum is taken out first. The weights stay finite and sum to 1 per row (with an exact head,
    the tail's weights sum to the tail's mass)."""
    from hf_distill.vocab_losses import head_tail_weights, normalised, sample_sparse_target

    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, -2.0], [60.0, 0.0, 0.1, 0.2, 0.3, 0.4]])
    drawn = sample_sparse_target(
        logits, 4, head=head, proposal_temperature=0.2, generator=torch.Generator().manual_seed(0)
    )
    values = drawn[-1]
    assert torch.isfinite(values).all()
    weights = head_tail_weights(drawn[1], values) if head else normalised(values)
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))


@pytest.mark.parametrize("head", [0, 2])
def test_draws_without_counts_are_the_counted_draws_and_unbiased(head):
    """``counts=False`` returns the ``n`` draws themselves (ascending, repeats kept): with the same generator
    they are the counted draws expanded, so at ``1/n`` each their target is the counted one, and its mean
    over many draws is the teacher's distribution (within 4 standard errors)."""
    T, n, vocab, draws = 2.0, 9, 13, 600
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(4)) * 2
    p_t = F.softmax(logits / T, dim=-1)
    counted = sample_sparse_target(logits, n, T, head=head, generator=torch.Generator().manual_seed(5))
    stored = sample_sparse_target(
        logits, n, T, head=head, generator=torch.Generator().manual_seed(5), counts=False
    )
    assert len(stored) == len(counted) - 1
    assert all(torch.equal(a, b) for a, b in zip(stored[:-1], counted[:-2], strict=True))
    ids, counts = counted[-2], counted[-1]
    assert stored[-1].shape == (3, n) and torch.equal(stored[-1], stored[-1].sort(-1).values)
    for row in range(3):  # id j appears c_j times
        assert stored[-1][row].tolist() == ids[row].repeat_interleave(counts[row]).tolist()
    ones = torch.ones(3, n)
    mine = torch.zeros(3, vocab).scatter_add_(-1, stored[-1], ones / n)
    theirs = torch.zeros(3, vocab).scatter_add_(-1, ids, counts.float() / n)
    if head:
        mine = head_tail_weights(stored[1], ones)[:, head:]
        theirs = head_tail_weights(counted[1], counts)[:, head:]
        mine = torch.zeros(3, vocab).scatter_add_(-1, stored[-1], mine)
        theirs = torch.zeros(3, vocab).scatter_add_(-1, ids, theirs)
    torch.testing.assert_close(mine, theirs)
    # unbiased: the mean target over many rows of draws
    g = torch.Generator().manual_seed(6)
    *front, tail = sample_sparse_target(logits.repeat(draws, 1), n, T, head=head, generator=g, counts=False)
    weights = torch.full(tail.shape, 1.0 / n)
    all_ids = tail
    if head:
        weights, all_ids = (
            head_tail_weights(front[1], torch.ones_like(weights)),
            torch.cat([front[0], tail], -1),
        )
    targets = torch.zeros(draws * 3, vocab).scatter_add_(-1, all_ids, weights).view(draws, 3, vocab)
    mean, standard_error = targets.mean(0), targets.std(0) / draws**0.5
    assert ((mean - p_t).abs() <= 4 * standard_error + 1e-6).all()
    with pytest.raises(ValueError, match="counts=False stores the draws themselves"):
        sample_sparse_target(logits, n, T, proposal_temperature=2.0, counts=False)


@pytest.mark.parametrize("head", [0, 3])
def test_systematic_draws_are_unbiased_within_one_of_n_p_and_vary_less_than_iid(head):
    """``scheme="systematic"``: over many rows of draws the mean target is the teacher's distribution (within 4
    standard errors), every count is ``floor(n q_j)`` or ``ceil(n q_j)`` for the sampled distribution ``q``
    (``p``, or the tail ``p / m``), no token of probability 0 is drawn, and the target's squared error
    is smaller than iid draws' at the same ``n``."""
    T, n, vocab, draws = 1.0, 9, 40, 3000
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(4))  # every p > 1e-3: each one drawn
    logits[:, -5:] = -torch.inf  # probability 0: never drawn
    p_t = F.softmax(logits / T, dim=-1)
    targets = {}
    for scheme in ("iid", "systematic"):
        g = torch.Generator().manual_seed(6)
        drawn = sample_sparse_target(logits.repeat(draws, 1), n, T, head=head, generator=g, scheme=scheme)
        ids, counts = drawn[-2], drawn[-1]
        weights = head_tail_weights(drawn[1], counts) if head else normalised(counts)
        all_ids = torch.cat([drawn[0], ids], -1) if head else ids
        targets[scheme] = torch.zeros(draws * 3, vocab).scatter_add_(-1, all_ids, weights).view(draws, 3, vocab)
        if scheme == "systematic":
            assert not (ids[counts > 0] >= vocab - 5).any()
            q = p_t.scatter(-1, drawn[0][:3], 0.0) if head else p_t
            q = (q / q.sum(-1, keepdim=True)).repeat(draws, 1)
            per_token = torch.zeros(draws * 3, vocab).scatter_add_(-1, ids, counts.float())
            assert ((per_token >= (n * q).floor() - 1e-4) & (per_token <= (n * q).ceil() + 1e-4)).all()
    mean, standard_error = targets["systematic"].mean(0), targets["systematic"].std(0) / draws**0.5
    assert ((mean - p_t).abs() <= 4 * standard_error + 1e-6).all()
    error = {scheme: (t - p_t).pow(2).sum(-1).mean() for scheme, t in targets.items()}
    assert error["systematic"] < 0.75 * error["iid"], error
    with pytest.raises(ValueError, match=r"^scheme='sobol' must be one of \('iid', 'systematic'\)\.$"):
        sample_sparse_target(logits, n, T, scheme="sobol")


def test_a_quantized_head_keeps_the_target_unbiased():
    """Head probabilities stored in 8 bits by systematic rounding of their running sum: ``k`` is within one of
    ``255 p``, ``sum k <= 255``, and the whole target, with the tail mass ``1 - sum k / 255`` spread over
    systematic tail draws, has the teacher's distribution as its mean (within 4 standard errors); rounding to
    nearest instead is biased, and the test sees it."""
    T, n, vocab, draws, head = 1.0, 13, 40, 4000, 3
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(4))
    p_t = F.softmax(logits / T, dim=-1)
    g = torch.Generator().manual_seed(7)
    head_ids, head_probs, tail_ids, counts = sample_sparse_target(
        logits.repeat(draws, 1), n, T, head=head, generator=g, scheme="systematic"
    )
    quanta = quantize_probs(head_probs, g)
    assert quanta.dtype == torch.int64 and 0 <= quanta.min() and quanta.max() <= 255
    assert ((quanta - 255 * head_probs).abs() < 1).all() and (quanta.sum(-1) <= 255).all()
    for rounding, unbiased in ((dequantize_probs(quanta), True), ((255 * head_probs).round() / 255, False)):
        weights = head_tail_weights(rounding, counts)
        targets = torch.zeros(draws * 3, vocab).scatter_add_(-1, torch.cat([head_ids, tail_ids], -1), weights)
        targets = targets.view(draws, 3, vocab)
        mean, standard_error = targets.mean(0), targets.std(0) / draws**0.5
        within = ((mean - p_t).abs() <= 4 * standard_error + 1e-6).all()
        assert bool(within) == unbiased, rounding


def test_a_quantized_head_holding_almost_all_the_mass_leaves_an_unbiased_tail_mass_never_below_0():
    """Where the head holds all but 3.5e-5 of the mass, rounding each probability on its own would give a negative
    tail mass about half the time; the running sum's rounding gives 0 or 1/255, with mean the true tail mass."""
    logits = torch.full((1, 20), -12.0)
    logits[0, :3] = torch.tensor([0.3, 0.0, -0.4])
    probs = logits.softmax(-1).topk(3).values.repeat(200000, 1)
    tail = 1 - dequantize_probs(quantize_probs(probs, torch.Generator().manual_seed(2))).sum(-1)
    true_tail = 1 - probs[0].sum()
    assert tail.min() >= 0 and set(torch.unique((tail * 255).round()).tolist()) <= {0.0, 1.0}
    assert abs(tail.mean() - true_tail) <= 4 * tail.std() / 200000**0.5


def test_draws_of_expands_distinct_ids_by_their_counts():
    ids = torch.tensor([[3, 7, 9, 0], [5, 0, 0, 0]])
    counts = torch.tensor([[1, 2, 1, 0], [4, 0, 0, 0]])
    assert draws_of(ids, counts).tolist() == [[3, 7, 7, 9], [5, 5, 5, 5]]


def _row_error(tail: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The summed squared error of iid draws' targets over a row: ``sum_t (m_t**2 - ||tail_t||**2) / n_t``."""
    tail = tail.double()
    return ((tail.sum(-1) ** 2 - (tail**2).sum(-1)) / lengths.double()).sum()


def test_adaptive_allocation_gives_uncertain_tokens_more_draws_for_less_error():
    """:func:`allocate_draws`: a row's ``n N`` draws, each token at least 1 and at most 255, more to a token whose
    tail is larger or flatter, within one of the clipped proportional share ``lambda w_t``; the row's summed iid
    error is the least of any allocation one draw away (moving a draw between two tokens never lowers it) and
    below an even allocation's; a row whose tails are each one token shares its draws evenly."""
    n, vocab = 6, 30
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, vocab, generator=g) * torch.linspace(0.1, 8.0, 40)[:, None]  # flat to peaked
    tail = F.softmax(logits, dim=-1) * torch.linspace(1.0, 0.02, 40)[:, None]  # and less mass left to sample
    lengths = allocate_draws(tail, n)
    assert lengths.dtype == torch.int64 and lengths.sum() == n * 40 and lengths.min() >= 1
    weight = ((tail.double().sum(-1) ** 2 - (tail.double() ** 2).sum(-1)).clamp_min(0)).sqrt()
    order = weight.argsort()
    assert (lengths[order].diff() >= 0).all()  # more weight, never fewer draws
    assert lengths.max() > 2 * n and lengths[weight.argmin()] < n
    error = _row_error(tail, lengths)
    assert error < 0.8 * _row_error(tail, torch.full((40,), n))
    for give in range(40):
        for take in range(40):
            if give != take and lengths[give] > 1:
                moved = lengths.clone()
                moved[give] -= 1
                moved[take] += 1
                assert _row_error(tail, moved) >= error - 1e-12
    one_token = torch.zeros(5, vocab).scatter_(-1, torch.arange(5)[:, None], 0.3)
    assert allocate_draws(one_token, 7).tolist() == [7] * 5
    capped = torch.cat([torch.full((1, vocab), 1.0 / vocab), one_token])  # one flat token, five single-token tails
    assert allocate_draws(capped, 200).tolist() == [255, *[(6 * 200 - 255) // 5] * 5]


@pytest.mark.parametrize("scheme", ["iid", "systematic"])
@pytest.mark.parametrize("head", [0, 3])
def test_adaptive_draws_are_unbiased_per_token_and_a_reader_of_even_draws_is_not(head, scheme):
    """``allocation="adaptive"``: the row's pooled draws (``(N, n)``) and counts (``(N, 1)``, summing to ``n N``),
    regrouped per token (:func:`regroup_draws`), give a target whose mean over many draws is the teacher's
    distribution at every token (within 4 standard errors). Reading the pooled draws as if each token held ``n``
    of its own (an older reader) is biased, and the test sees it."""
    T, n, vocab, repeats = 1.0, 5, 24, 1500
    g = torch.Generator().manual_seed(4)
    spread = torch.tensor([0.9, 0.2, 0.5, 0.1, 0.3, 0.7])[:, None]  # the mass off each row's peak: unequal needs
    peak = F.one_hot(torch.randint(vocab, (6,), generator=g), vocab)
    p_t = (1 - spread) * peak + spread * F.softmax(0.5 * torch.randn(6, vocab, generator=g), dim=-1)
    logits = p_t.log() * T  # every p above 1e-3: each token drawn
    g = torch.Generator().manual_seed(6)
    targets, naive = [], []
    for _ in range(repeats):
        drawn = sample_sparse_target(logits, n, T, head=head, generator=g, counts=False, scheme=scheme,
                                     allocation="adaptive")  # fmt: skip
        pooled, lengths = drawn[-2], drawn[-1]
        assert pooled.shape == (6, n) and lengths.shape == (6, 1) and int(lengths.sum()) == 6 * n
        for ids, counts in (regroup_draws(pooled, lengths), (pooled, torch.ones_like(pooled))):
            weights = head_tail_weights(drawn[1], counts) if head else normalised(counts)
            all_ids = torch.cat([drawn[0], ids], -1) if head else ids
            target = torch.zeros(6, vocab).scatter_add_(-1, all_ids, weights)
            (targets if counts is not None and len(naive) == len(targets) else naive).append(target)
    for stacked, unbiased in ((torch.stack(targets), True), (torch.stack(naive), False)):
        mean, standard_error = stacked.mean(0), stacked.std(0) / repeats**0.5
        assert bool(((mean - p_t).abs() <= 4 * standard_error + 1e-6).all()) == unbiased
    with pytest.raises(ValueError, match="allocation='adaptive' stores each token's draws themselves"):
        sample_sparse_target(logits, n, T, allocation="adaptive")
    with pytest.raises(ValueError, match=r"^allocation='fair' must be one of \('even', 'adaptive'\)\.$"):
        sample_sparse_target(logits, n, T, counts=False, allocation="fair")


def test_regroup_draws_gives_each_token_its_own_and_refuses_a_cut_row():
    pooled = torch.tensor([[4, 7, 7], [1, 2, 3], [5, 6, 9]])  # 9 draws: 2, 1, 6 a token
    ids, counts = regroup_draws(pooled, torch.tensor([[2], [1], [6]]), width=7)
    assert ids.tolist() == [[4, 7, 0, 0, 0, 0, 0], [7, 0, 0, 0, 0, 0, 0], [1, 2, 3, 5, 6, 9, 0]]
    assert counts.tolist() == [[1, 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]]
    with pytest.raises(ValueError, match="holds 6 draws for 2 tokens, but its per-token counts .* sum to 3"):
        regroup_draws(pooled[:2], torch.tensor([2, 1]))
