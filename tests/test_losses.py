"""Loss properties and golden values checked against an independent NumPy computation."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from scipy.special import log_softmax as np_log_softmax
from scipy.special import softmax as np_softmax

from hf_distill import losses

DIVERGENCES = ["kl", "reverse_kl", "jsd", "mse"]


def _logits(*shape, seed=0, scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("name", DIVERGENCES)
def test_identical_logits_give_zero(name):
    z = _logits(4, 7, 11)
    assert losses.kd_loss(name, z, z.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_different_logits_give_positive_loss(name):
    assert losses.kd_loss(name, _logits(4, 7, seed=0), _logits(4, 7, seed=1), 2.0).item() > 1e-3


def _np_kl(p_logits, q_logits, T):
    """KL(softmax(p/T) || softmax(q/T)) per row, by hand in float64."""
    log_p = np_log_softmax(p_logits / T, axis=-1)
    log_q = np_log_softmax(q_logits / T, axis=-1)
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kl_golden_against_numpy(T):
    s, t = _logits(5, 6, seed=2), _logits(5, 6, seed=3)
    expected = T**2 * _np_kl(t.double().numpy(), s.double().numpy(), T).mean()
    assert losses.kl_div_loss(s, t, T).item() == pytest.approx(expected, rel=1e-5)
    expected_rev = T**2 * _np_kl(s.double().numpy(), t.double().numpy(), T).mean()
    assert losses.reverse_kl_loss(s, t, T).item() == pytest.approx(expected_rev, rel=1e-5)


def test_jsd_golden_against_numpy():
    s, t, T = _logits(5, 6, seed=4), _logits(5, 6, seed=5), 2.0
    p, q = np_softmax(t.double().numpy() / T, -1), np_softmax(s.double().numpy() / T, -1)
    m = (p + q) / 2
    expected = T**2 * ((p * np.log(p / m)).sum(-1) / 2 + (q * np.log(q / m)).sum(-1) / 2).mean()
    assert losses.jsd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-5)
    assert losses.jsd_loss(s, t, T).item() <= T**2 * np.log(2)


def test_hinton_golden_value_by_hand():
    # Two classes, T = 2: p_t = softmax([2, 0] / 2), p_s = softmax([0, 0] / 2) = [0.5, 0.5].
    p1 = np.exp(1) / (np.exp(1) + 1)
    by_hand = 4 * (p1 * np.log(p1 / 0.5) + (1 - p1) * np.log((1 - p1) / 0.5))
    loss = losses.kl_div_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]]), 2.0)
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)


def test_temperature_squared_scaling():
    s, t = _logits(3, 5, seed=6), _logits(3, 5, seed=7)
    for T in (1.0, 3.0, 8.0):
        unscaled = _np_kl(t.double().numpy(), s.double().numpy(), T).mean()
        assert losses.kl_div_loss(s, t, T).item() == pytest.approx(T**2 * unscaled, rel=1e-5)


def test_mse_ignores_temperature_and_matches_numpy():
    s, t = _logits(3, 5, seed=8), _logits(3, 5, seed=9)
    expected = ((s - t).double().numpy() ** 2).mean()
    assert losses.mse_logits_loss(s, t, 1.0).item() == pytest.approx(expected, rel=1e-6)
    assert losses.mse_logits_loss(s, t, 5.0).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_mask_excludes_positions(name):
    s, t = _logits(2, 5, 9, seed=10), _logits(2, 5, 9, seed=11)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    masked = losses.kd_loss(name, s, t, 2.0, mask=mask)
    # Same as the loss over the kept positions alone.
    assert masked.item() == pytest.approx(losses.kd_loss(name, s[mask], t[mask], 2.0).item(), rel=1e-5)
    # Garbage at the excluded positions changes nothing.
    s2 = s.clone()
    s2[~mask] = 1e3
    assert losses.kd_loss(name, s2, t, 2.0, mask=mask).item() == pytest.approx(masked.item(), rel=1e-6)


def test_fully_masked_batch_is_zero_not_nan():
    s, t = _logits(2, 3, 4, seed=12), _logits(2, 3, 4, seed=13)
    loss = losses.kl_div_loss(s, t, 2.0, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0


def test_topk_with_full_vocabulary_equals_dense_kl():
    s, t = _logits(2, 3, 10, seed=14), _logits(2, 3, 10, seed=15)
    values, indices = t.topk(10, dim=-1)
    assert losses.topk_kl_div_loss(s, values, indices, 2.0).item() == pytest.approx(
        losses.kl_div_loss(s, t, 2.0).item(), rel=1e-5
    )


def test_topk_renormalises_teacher_over_its_top_k():
    s, t, T, k = _logits(4, 10, seed=16), _logits(4, 10, seed=17), 2.0, 3
    values, indices = t.topk(k, dim=-1)
    p_t = np_softmax(values.double().numpy() / T, -1)  # renormalised over the top k
    log_q = np_log_softmax(s.double().numpy() / T, -1)  # student over the full vocabulary
    log_q_k = np.take_along_axis(log_q, indices.numpy(), -1)
    expected = T**2 * (p_t * (np.log(p_t) - log_q_k)).sum(-1).mean()
    assert losses.topk_kl_div_loss(s, values, indices, T).item() == pytest.approx(expected, rel=1e-5)


def test_ensemble_logits_are_the_mixture_of_soft_labels():
    z1, z2, T = _logits(3, 4, seed=18), _logits(3, 4, seed=19), 3.0
    mixed = losses.ensemble_logits([z1, z2], [3.0, 1.0], T)
    expected = 0.75 * np_softmax(z1.numpy() / T, -1) + 0.25 * np_softmax(z2.numpy() / T, -1)
    np.testing.assert_allclose(torch.softmax(mixed / T, -1).numpy(), expected, rtol=1e-5)
    # One teacher: its own distribution.
    single = losses.ensemble_logits([z1], [1.0], T)
    np.testing.assert_allclose(
        torch.softmax(single / T, -1).numpy(), np_softmax(z1.numpy() / T, -1), rtol=1e-5
    )
    # Logit matching mixes logits linearly.
    mse_mix = losses.ensemble_logits([z1, z2], [3.0, 1.0], T, "mse")
    np.testing.assert_allclose(mse_mix.numpy(), (0.75 * z1 + 0.25 * z2).numpy(), rtol=1e-6)


@pytest.mark.parametrize("name", ["cosine", "mse"])
def test_hidden_state_loss(name):
    h = _logits(2, 5, 8, seed=20)
    assert losses.hidden_state_loss(name, h, h.clone()).item() == pytest.approx(0.0, abs=1e-6)
    other = _logits(2, 5, 8, seed=21)
    assert losses.hidden_state_loss(name, h, other).item() > 1e-3
    if name == "cosine":  # cosine ignores scale
        assert losses.hidden_state_loss(name, 3 * h, h).item() == pytest.approx(0.0, abs=1e-6)


def test_attention_loss_matches_numpy_and_masks_queries():
    a, b = torch.rand(2, 2, 4, 4), torch.rand(2, 2, 4, 4)
    expected = ((a - b).numpy() ** 2).mean()
    assert losses.attention_loss(a, b).item() == pytest.approx(expected, rel=1e-5)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    per_query = ((a - b) ** 2).mean(dim=(1, 3))
    assert losses.attention_loss(a, b, mask=mask).item() == pytest.approx(
        per_query[mask].mean().item(), rel=1e-5
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(
            lambda z: losses.kd_loss("cosine", z, z),
            "kd_loss='cosine' is not one of ('kl', 'reverse_kl', 'jsd', 'mse').",
            id="kd_loss",
        ),
        pytest.param(
            lambda z: losses.hidden_state_loss("kl", z, z),
            "hidden_loss='kl' is not one of ('cosine', 'mse').",
            id="hidden_loss",
        ),
        pytest.param(
            lambda z: losses.generalized_jsd_loss(z, z, 1.0, 1.5),
            "mixture=1.5 must be in [0, 1] (0: forward KL, 1: reverse KL).",
            id="mixture above 1",
        ),
        pytest.param(
            lambda z: losses.kd_loss("jsd", z, z, 1.0, jsd_mixture=-0.5),
            "mixture=-0.5 must be in [0, 1] (0: forward KL, 1: reverse KL).",
            id="kd_loss mixture below 0",
        ),
    ],
)
def test_unknown_loss_names_and_mixtures_out_of_range_are_refused_with_one_message(call, message):
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        call(_logits(2, 3))


def test_default_temperature_is_one():
    s, t = _logits(3, 5, seed=22), _logits(3, 5, seed=23)
    kl = _np_kl(t.double().numpy(), s.double().numpy(), 1.0).mean()
    reverse = _np_kl(s.double().numpy(), t.double().numpy(), 1.0).mean()
    p, q = np_softmax(t.double().numpy(), -1), np_softmax(s.double().numpy(), -1)
    m = (p + q) / 2
    jsd = ((p * np.log(p / m)).sum(-1) / 2 + (q * np.log(q / m)).sum(-1) / 2).mean()
    assert losses.kl_div_loss(s, t).item() == pytest.approx(kl, rel=1e-5)
    assert losses.reverse_kl_loss(s, t).item() == pytest.approx(reverse, rel=1e-5)
    assert losses.jsd_loss(s, t).item() == pytest.approx(jsd, rel=1e-5)
    assert losses.kd_loss("jsd", s, t).item() == pytest.approx(jsd, rel=1e-5)
    values, indices = t.topk(5, dim=-1)
    assert losses.topk_kl_div_loss(s, values, indices).item() == pytest.approx(kl, rel=1e-5)


@pytest.mark.parametrize("T", [1.5, 3.0])
def test_jsd_scales_with_t_squared_at_any_temperature(T):
    s, t = _logits(4, 6, seed=24), _logits(4, 6, seed=25)
    p, q = np_softmax(t.double().numpy() / T, -1), np_softmax(s.double().numpy() / T, -1)
    m = (p + q) / 2
    expected = T**2 * ((p * np.log(p / m)).sum(-1) / 2 + (q * np.log(q / m)).sum(-1) / 2).mean()
    assert losses.jsd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-5)


def test_ensemble_of_token_level_logits_mixes_over_the_last_dim_and_checks_lengths():
    z1, z2, T = _logits(2, 3, 4, seed=26), _logits(2, 3, 4, seed=27), 2.0
    mixed = losses.ensemble_logits([z1, z2], [1.0, 3.0], T)
    expected = 0.25 * np_softmax(z1.numpy() / T, -1) + 0.75 * np_softmax(z2.numpy() / T, -1)
    np.testing.assert_allclose(torch.softmax(mixed / T, -1).numpy(), expected, rtol=1e-5)
    for name in ("kl", "mse"):
        with pytest.raises(ValueError):  # one weight per teacher
            losses.ensemble_logits([z1, z2], [1.0], T, name)


def test_kd_loss_passes_the_temperature_to_each_divergence():
    s, t, T = _logits(4, 6, seed=28), _logits(4, 6, seed=29), 3.0
    sn, tn = s.double().numpy(), t.double().numpy()
    p, q = np_softmax(tn / T, -1), np_softmax(sn / T, -1)
    m = (p + q) / 2
    expected = {
        "kl": T**2 * _np_kl(tn, sn, T).mean(),
        "reverse_kl": T**2 * _np_kl(sn, tn, T).mean(),
        "jsd": T**2 * ((p * np.log(p / m)).sum(-1) / 2 + (q * np.log(q / m)).sum(-1) / 2).mean(),
        "mse": ((sn - tn) ** 2).mean(),
    }
    for name, value in expected.items():
        assert losses.kd_loss(name, s, t, T).item() == pytest.approx(value, rel=1e-5), name


def test_one_counted_position_is_its_own_mean():
    s, t = _logits(2, 3, 5, seed=30), _logits(2, 3, 5, seed=31)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[1, 2] = True
    expected = _np_kl(t[1, 2].double().numpy(), s[1, 2].double().numpy(), 1.0)
    assert losses.kl_div_loss(s, t, mask=mask).item() == pytest.approx(float(expected), rel=1e-5)


def test_sampled_kd_loss_weighs_each_draw_by_its_count_over_the_draws():
    """RS-KD from raw counts (the dense route's plain cache): ``T**2 * sum_j (c_j / n) * -log p_s[id_j]``."""
    s = _logits(2, 2, 6, seed=5)
    ids = torch.tensor([[[0, 2, 0], [1, 4, 5]], [[3, 0, 0], [2, 3, 0]]])
    counts = torch.tensor([[[3, 1, 0], [1, 1, 2]], [[4, 0, 0], [2, 2, 0]]])
    log_p = np_log_softmax(s.double().numpy() / 2.0, axis=-1)
    expected = np.mean(
        [
            -(counts[b, i].numpy() / 4.0 * np.take(log_p[b, i], ids[b, i].numpy())).sum()
            for b in range(2)
            for i in range(2)
        ]
    )
    got = losses.sampled_kd_loss(s, ids, counts, 2.0)
    assert got.item() == pytest.approx(4.0 * expected, rel=1e-5)
    assert losses.sampled_kd_loss(s, ids, counts).item() == pytest.approx(
        losses.sampled_kd_loss(s, ids, counts, 1.0).item()
    )


@pytest.mark.parametrize("mixture", [0.1, 0.9])
def test_question_answering_passes_the_jsd_mixture_to_both_ends(mixture):
    """The QA spec's KD term is the mean of the start and end generalized JSDs at ``jsd_mixture``."""
    from hf_distill.tasks import TASK_SPECS
    from hf_distill.teacher_outputs import TeacherOutput

    s, t = _logits(2, 5, 2, seed=6), _logits(2, 5, 2, seed=7)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    got = TASK_SPECS["question_answering"].kd_loss(
        "jsd", s, TeacherOutput(logits=t), 2.0, None, {"attention_mask": mask}, jsd_mixture=mixture
    )
    real = mask.bool()
    ends = [
        losses.generalized_jsd_loss(
            s[..., i].masked_fill(~real, -1e4), t[..., i].masked_fill(~real, -1e4), 2.0, mixture
        )
        for i in range(2)
    ]
    torch.testing.assert_close(got, (ends[0] + ends[1]) / 2)
    assert not torch.allclose(got, losses.span_kd_loss("jsd", s, t, 2.0, attention_mask=mask))
