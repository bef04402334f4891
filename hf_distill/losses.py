"""Distillation losses: pure functions of tensors.

Every function takes logits of shape ``(..., C)`` (``C`` classes, or the vocabulary for token-level
tasks) and an optional boolean ``mask`` of shape ``(...)`` that says which positions count. The
result is the mean over the positions that count, a scalar. With ``mask=None`` every position
counts, so the same function serves sequence-level logits ``(B, C)`` and token-level logits
``(B, L, C)`` (mask out padding and positions whose label is ``-100``).

Weights, exactly as in Hinton et al. (2015): the training loss is
``alpha * KD + beta * CE`` where ``KD`` is one of the soft-label losses below (already scaled by
``T**2`` so its gradient keeps the same size as ``T`` changes) and ``CE`` the student's hard-label
loss at ``T = 1``. ``alpha`` weights the teacher term, ``beta`` the label term.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The language-model losses that never hold the (N, V) logits live beside these, in their own module.
from .vocab_losses import LM_KD_LOSSES, chunked_lm_losses, sample_teacher_tokens  # noqa: F401

KD_LOSSES = ("kl", "reverse_kl", "jsd", "mse")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` (shape ``(...)``) over the positions where ``mask`` is true."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    # A batch in which nothing counts contributes zero, not NaN.
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mixture: float = 0.5,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al., ICLR 2024, eq. 1), scaled by ``T**2``.

    With ``p_t = softmax(z_t / T)``, ``p_s = softmax(z_s / T)`` and ``m = mixture * p_t + (1 - mixture) * p_s``:

        T**2 * (mixture * KL(p_t || m) + (1 - mixture) * KL(p_s || m))      for 0 < mixture < 1
        T**2 * KL(p_t || p_s)   (forward KL)                                  for mixture == 0
        T**2 * KL(p_s || p_t)   (reverse KL)                                  for mixture == 1

    averaged over the positions where ``mask`` is true. This is TRL's ``GKDTrainer.generalized_jsd_loss``
    (its ``beta`` is our ``mixture``; TRL masks ``labels != -100`` and divides by the number of counted
    positions, as ``mask`` does here) times ``T**2``. The ends are TRL's: the formula for ``0 < mixture < 1``
    tends to zero as ``mixture`` goes to 0 or 1, so the ends are defined as the two KLs, not as its limits.
    ``mixture = 0.5`` is the symmetric JSD, bounded by ``T**2 * log 2``.

    Shapes: ``student_logits``, ``teacher_logits``: ``(..., C)``; ``mask``: ``(...)`` bool or None.
    """
    if not 0.0 <= mixture <= 1.0:
        raise ValueError(f"mixture={mixture} must be in [0, 1] (0: forward KL, 1: reverse KL).")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if mixture == 0.0:
        per_position = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    elif mixture == 1.0:
        per_position = (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
    else:
        log_m = torch.logaddexp(log_p_t + math.log(mixture), log_p_s + math.log1p(-mixture))
        kl_t = (log_p_t.exp() * (log_p_t - log_m)).sum(-1)
        kl_s = (log_p_s.exp() * (log_p_s - log_m)).sum(-1)
        per_position = mixture * kl_t + (1.0 - mixture) * kl_s
    return temperature**2 * _masked_mean(per_position, mask)


def kl_div_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward KL of the teacher's soft labels to the student's (Hinton et al., 2015).

    ``T**2 * KL(p_t || p_s)`` with ``p_t = softmax(z_t / T)``, ``p_s = softmax(z_s / T)``:

        T**2 * sum_c p_t[c] * (log p_t[c] - log p_s[c])

    averaged over the positions where ``mask`` is true: :func:`generalized_jsd_loss` at ``mixture = 0``.

    Shapes: ``student_logits``, ``teacher_logits``: ``(..., C)``; ``mask``: ``(...)`` bool or None.
    """
    return generalized_jsd_loss(student_logits, teacher_logits, temperature, 0.0, mask=mask)


def reverse_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reverse KL, mode-seeking (as in MiniLLM): ``T**2 * KL(p_s || p_t)``.

        T**2 * sum_c p_s[c] * (log p_s[c] - log p_t[c])

    :func:`generalized_jsd_loss` at ``mixture = 1``. Shapes as :func:`kl_div_loss`.
    """
    return generalized_jsd_loss(student_logits, teacher_logits, temperature, 1.0, mask=mask)


def jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Jensen-Shannon divergence with equal weights, scaled by ``T**2``.

    With ``m = (p_t + p_s) / 2``:

        T**2 * (KL(p_t || m) + KL(p_s || m)) / 2

    Symmetric, bounded by ``T**2 * log 2``: :func:`generalized_jsd_loss` at ``mixture = 0.5``. Shapes as
    :func:`kl_div_loss`.
    """
    return generalized_jsd_loss(student_logits, teacher_logits, temperature, 0.5, mask=mask)


def mse_logits_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error between raw logits (Ba & Caruana, 2014); ``temperature`` is not used.

        mean_c (z_s[c] - z_t[c])**2

    averaged over the positions where ``mask`` is true. This is also the KD term for a regression
    head (``C = 1``, e.g. STS-B), where the teacher's score is the target. Shapes as
    :func:`kl_div_loss`.
    """
    per_position = (student_logits.float() - teacher_logits.float()).pow(2).mean(-1)
    return _masked_mean(per_position, mask)


def kd_loss(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The soft-label loss called ``name`` (one of :data:`KD_LOSSES`); the one place that chooses."""
    if name == "kl":
        return kl_div_loss(student_logits, teacher_logits, temperature, mask=mask)
    if name == "reverse_kl":
        return reverse_kl_loss(student_logits, teacher_logits, temperature, mask=mask)
    if name == "jsd":
        return jsd_loss(student_logits, teacher_logits, temperature, mask=mask)
    if name == "mse":
        return mse_logits_loss(student_logits, teacher_logits, temperature, mask=mask)
    raise ValueError(f"kd_loss={name!r} is not one of {KD_LOSSES}.")


def topk_kl_div_loss(
    student_logits: torch.Tensor,
    teacher_topk_values: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    temperature: float = 1.0,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward KL against a teacher stored sparsely as its top ``k`` logits.

    The teacher's distribution is taken to be its softmax over the top ``k`` entries only,
    ``p_t[j] = softmax(v / T)[j]`` for the stored values ``v`` at vocabulary ids ``idx[j]``; the
    mass outside the top ``k`` is set to zero (renormalised away). The student keeps its full
    softmax over the vocabulary, so:

        T**2 * sum_j p_t[j] * (log p_t[j] - log p_s[idx[j]])

    which pushes the student's mass onto the teacher's top ``k`` and, for ``k = C``, equals
    :func:`kl_div_loss`.

    Shapes: ``student_logits``: ``(..., C)``; ``teacher_topk_values``, ``teacher_topk_indices``:
    ``(..., k)``; ``mask``: ``(...)``.
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_s_topk = log_p_s.gather(-1, teacher_topk_indices.long())
    log_p_t = F.log_softmax(teacher_topk_values.float() / temperature, dim=-1)
    per_position = (log_p_t.exp() * (log_p_t - log_p_s_topk)).sum(-1)
    return temperature**2 * _masked_mean(per_position, mask)


def sampled_kd_loss(
    student_logits: torch.Tensor,
    teacher_sample_ids: torch.Tensor,
    teacher_sample_counts: torch.Tensor,
    temperature: float = 1.0,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """RS-KD (Anshumann et al., "Sparse Logit Sampling", ACL 2025) against a teacher stored as sampled tokens.

    Per position the teacher's softmax at ``T`` was sampled ``n`` times with replacement; id ``id_j``
    was drawn ``c_j`` times (``sum_j c_j = n``; a count of 0 marks an empty slot). With
    ``p_s = softmax(z_s / T)``:

        T**2 * sum_j (c_j / n) * (-log p_s[id_j])

    an unbiased estimate of the cross-entropy ``T**2 * H(p_t, p_s)``, whose gradient is that of
    :func:`kl_div_loss` (the two differ by the teacher's entropy, which does not depend on the
    student). The value is therefore a cross-entropy, not a KL. The dense-logit form of
    ``hf_distill.vocab_losses.chunked_lm_losses(kd="sampled")``.

    Shapes: ``student_logits``: ``(..., C)``; ``teacher_sample_ids``, ``teacher_sample_counts``:
    ``(..., n)``; ``mask``: ``(...)``.
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_s_ids = log_p_s.gather(-1, teacher_sample_ids.long())
    counts = teacher_sample_counts.float()
    weights = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
    per_position = -(weights * log_p_s_ids).sum(-1)
    return temperature**2 * _masked_mean(per_position, mask)


def ensemble_logits(
    teacher_logits: list[torch.Tensor], weights: list[float], temperature: float, kd_loss_name: str = "kl"
) -> torch.Tensor:
    """Logits whose softmax at ``T`` is the weighted mixture of the teachers' soft labels.

        z = T * log(sum_k w_k * softmax(z_k / T)),   sum_k w_k = 1

    so that ``softmax(z / T) = sum_k w_k * softmax(z_k / T)`` and every divergence above applies
    unchanged. For ``kd_loss_name="mse"`` (logit matching) the mixture is the weighted mean of the
    logits instead. Shapes: each ``(..., C)``; returns ``(..., C)``.
    """
    total = float(sum(weights))
    if kd_loss_name == "mse":
        return sum(w / total * z.float() for w, z in zip(weights, teacher_logits, strict=True))
    log_mix = torch.logsumexp(
        torch.stack(
            [
                F.log_softmax(z.float() / temperature, dim=-1) + torch.log(torch.tensor(w / total))
                for w, z in zip(weights, teacher_logits, strict=True)
            ]
        ),
        dim=0,
    )
    return temperature * log_mix


def hidden_state_loss(
    name: str,
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loss between one student layer's hidden states and the teacher layer mapped to it.

    ``"cosine"`` (DistilBERT): ``mean (1 - cos(h_s, h_t))`` over positions.
    ``"mse"`` (TinyBERT): ``mean_d (h_s[d] - h_t[d])**2`` over positions.

    Shapes: ``student_hidden``, ``teacher_hidden``: ``(B, L, D)`` (the student's already projected
    to the teacher's width ``D``); ``mask``: ``(B, L)``, true at real tokens.
    """
    if name == "cosine":
        per_position = 1.0 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)
    elif name == "mse":
        per_position = (student_hidden.float() - teacher_hidden.float()).pow(2).mean(-1)
    else:
        raise ValueError(f"hidden_loss={name!r} is not one of ('cosine', 'mse').")
    return _masked_mean(per_position, mask)


def attention_loss(
    student_attention: torch.Tensor, teacher_attention: torch.Tensor, *, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """MSE between attention maps of a mapped layer pair (TinyBERT).

        mean_{h, j} (A_s[h, i, j] - A_t[h, i, j])**2   averaged over query positions i

    Shapes: ``(B, H, L, L)`` each (same number of heads ``H``); ``mask``: ``(B, L)``, true at real
    query tokens.
    """
    per_query = (student_attention.float() - teacher_attention.float()).pow(2).mean(dim=(1, 3))
    return _masked_mean(per_query, mask)
