"""The generalized JSD of GKD: ours against TRL's ``GKDTrainer.generalized_jsd_loss``, dense and chunked."""

import pytest
import torch

from hf_distill.losses import chunked_lm_losses, generalized_jsd_loss, jsd_loss, kl_div_loss, reverse_kl_loss


def _logits_and_labels(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, :2] = -100  # a prompt
    labels[2, 3:] = -100  # padding
    return student, teacher, labels


@pytest.mark.parametrize("mixture", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [0.9, 1.0, 2.0])
def test_generalized_jsd_matches_trl(mixture, temperature):
    pytest.importorskip("trl")
    from trl.experimental.gkd import GKDTrainer

    student, teacher, labels = _logits_and_labels()
    ours_in = student.clone().requires_grad_(True)
    trl_in = student.clone().requires_grad_(True)
    ours = generalized_jsd_loss(ours_in, teacher, temperature, mixture, mask=labels != -100) / temperature**2
    theirs = GKDTrainer.generalized_jsd_loss(
        trl_in, teacher, labels=labels, beta=mixture, temperature=temperature, reduction="batchmean"
    )
    ours.backward()
    theirs.backward()
    # Ours works in float32; TRL's in the input's float64.
    torch.testing.assert_close(ours.double(), theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_in.grad, trl_in.grad, atol=1e-5, rtol=1e-5)
    assert ours.item() > 0


def test_named_losses_are_its_ends_and_middle():
    student, teacher, labels = _logits_and_labels(1)
    mask = labels != -100
    for named, mixture in ((kl_div_loss, 0.0), (reverse_kl_loss, 1.0), (jsd_loss, 0.5)):
        torch.testing.assert_close(
            named(student, teacher, 2.0, mask=mask),
            generalized_jsd_loss(student, teacher, 2.0, mixture, mask=mask),
        )
    # Between the ends it is neither KL: the mixture changes the value.
    values = {m: generalized_jsd_loss(student, teacher, 1.0, m, mask=mask).item() for m in (0.2, 0.5, 0.8)}
    assert len({round(v, 6) for v in values.values()}) == 3


def test_generalized_jsd_refuses_mixture_outside_unit_interval():
    student, teacher, _ = _logits_and_labels()
    with pytest.raises(ValueError, match="mixture=1.5"):
        generalized_jsd_loss(student, teacher, 1.0, 1.5)


@pytest.mark.parametrize("mixture", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("chunk_size", [4, 13])
def test_chunked_jsd_equals_dense_at_any_mixture(mixture, chunk_size):
    g = torch.Generator().manual_seed(3)
    hidden, head = torch.randn(13, 6, generator=g), torch.randn(17, 6, generator=g)
    teacher_hidden, teacher_head = torch.randn(13, 5, generator=g), torch.randn(17, 5, generator=g)
    T = 2.0
    dense_leaves = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    dense = generalized_jsd_loss(
        dense_leaves[0] @ dense_leaves[1].T, teacher_hidden @ teacher_head.T, T, mixture
    )
    dense.backward()
    chunked_leaves = hidden.clone().requires_grad_(), head.clone().requires_grad_()
    chunked, _ = chunked_lm_losses(
        *chunked_leaves,
        kd="jsd",
        temperature=T,
        teacher_hidden=teacher_hidden,
        teacher_head=teacher_head,
        chunk_size=chunk_size,
        jsd_mixture=mixture,
    )
    chunked.backward()
    torch.testing.assert_close(chunked, dense)
    for ours, ref in zip(chunked_leaves, dense_leaves, strict=True):
        torch.testing.assert_close(ours.grad, ref.grad, atol=1e-5, rtol=1e-4)
    assert dense_leaves[0].grad.abs().sum() > 0


def test_chunked_refuses_mixture_outside_unit_interval():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="jsd_mixture=-0.1"):
        chunked_lm_losses(
            x, torch.randn(5, 4), kd="jsd", teacher_hidden=x, teacher_head=torch.randn(5, 4), jsd_mixture=-0.1
        )
