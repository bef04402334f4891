"""Language-model distillation losses that never hold the ``(N, V)`` vocabulary logits.

A causal LM's logits are ``z = h @ W.T`` for its last hidden states ``h`` ``(N, D)`` and its output
embedding ``W`` ``(V, D)``. At ``N = 8 x 1,024`` positions and ``V = 49,152`` one float32 copy of
``z`` is 1.6 GB; the softmax math needs several. :func:`chunked_lm_losses` forms the logits for
``chunk_size`` positions at a time and, in the same pass, the gradients of the losses with respect
to ``h`` and ``W`` (as Liger-Kernel's fused linear cross-entropy and JSD do), so backward only
scales the stored gradients. Peak memory is a few ``(chunk_size, V)`` blocks instead of a few
``(N, V)`` ones, and no matrix product is repeated.

The soft-label losses are the ones of :mod:`hf_distill.losses`, with the same formulas and the same
``T**2`` scaling; ``"sampled"`` is the importance-sampled RS-KD of Anshumann et al., "Sparse Logit
Sampling" (ACL 2025), whose stored draws come from :func:`sample_teacher_tokens`.

These are pure PyTorch, on CPU and GPU alike (Liger-Kernel's ``LigerFusedLinearJSD`` is the same idea
in Triton; nothing here calls it).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

LM_KD_LOSSES = ("kl", "reverse_kl", "jsd", "topk", "sampled")
_DENSE_TEACHER = ("kl", "reverse_kl", "jsd")
_SPARSE_TEACHER = ("topk", "sampled")
IGNORE_INDEX = -100
# How the n draws of an RS-KD cache are made: "iid", independent draws with replacement (the paper's); or
# "systematic", one uniform offset u per row and the n points (u + i) / n of its cumulative distribution.
SAMPLE_SCHEMES = ("iid", "systematic")
# How an RS-KD cache's draws are shared among a row's tokens: "even", n each; or "adaptive", the row's n L draws
# allocated to its tokens by need (:func:`allocate_draws`), stored pooled with each token's count.
DRAW_ALLOCATIONS = ("even", "adaptive")
MAX_DRAWS_PER_TOKEN = 255  # an adaptive allocation's per-token count is stored in 8 bits
_WEIGHT_ROWS = 64  # rows of (64, V) float64 at a time for an allocation's weights: 25 MB at V = 49,152


def _check_scheme(scheme: str) -> None:
    if scheme not in SAMPLE_SCHEMES:
        raise ValueError(f"scheme={scheme!r} must be one of {SAMPLE_SCHEMES}.")


def _check_sampling(teacher_logits: torch.Tensor, num_samples: int, temperature: float) -> None:
    if teacher_logits.dim() != 2:
        raise ValueError(
            f"teacher_logits must be (N, V), got shape {tuple(teacher_logits.shape)}; flatten the "
            "batch and sequence dimensions first (logits.flatten(0, -2))."
        )
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be at least 1.")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive.")


def sample_teacher_tokens(
    teacher_logits: torch.Tensor,
    num_samples: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    scheme: str = "iid",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num_samples`` tokens per position from the teacher's softmax at ``T``, with replacement.

    ``x_1, ..., x_n ~ softmax(z_t / T)`` independently, stored as the distinct ids ``id_j`` with their
    counts ``c_j = #{i : x_i = id_j}`` (so ``sum_j c_j = n``): the RS-KD cache of Anshumann et al.
    (ACL 2025), read back by ``chunked_lm_losses(kd="sampled")``.

    ``scheme="systematic"`` draws them by systematic sampling (:func:`_draw`): the same expectation
    ``E[c_j] = n p_j``, with each count ``floor(n p_j)`` or ``ceil(n p_j)``.

    Shapes: ``teacher_logits``: ``(N, V)``. Returns ``(ids, counts)``, both ``(N, num_samples)``
    int64: each row's distinct ids in ascending order, left-aligned, then padding slots with id 0 and
    count 0.
    """
    _check_sampling(teacher_logits, num_samples, temperature)
    return _draw(F.softmax(teacher_logits.float() / temperature, dim=-1), num_samples, generator, scheme)


def _draw(
    probs: torch.Tensor, num_samples: int, generator: torch.Generator | None, scheme: str = "iid"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` draws per row of ``probs`` ``(N, V)`` (unnormalised), as distinct ids and counts.

    - ``"iid"``: ``x_1, ..., x_n ~ p`` independently (``torch.multinomial`` with replacement).
    - ``"systematic"``: with ``F`` the row's cumulative distribution and one ``u ~ U[0, 1)`` per row,
      ``x_i = F^{-1}((u + i) / n)`` for ``i = 0, ..., n - 1`` (systematic resampling, as particle filters
      resample). Each point is uniform on its stratum, so ``E[c_j] = n p_j`` as for iid draws, and the
      target ``c_j / n`` stays unbiased; but ``c_j`` is ``floor(n p_j)`` or ``ceil(n p_j)``, never
      further off, so its variance is at most ``1/4`` against ``n p_j (1 - p_j)``. Tokens of zero
      probability are never drawn.
    """
    _check_scheme(scheme)
    if scheme == "systematic":
        draws = _systematic_points(probs, num_samples, num_samples, generator)
    else:
        draws = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
    draws, _ = draws.sort(dim=-1)
    starts = torch.ones_like(draws, dtype=torch.bool)
    starts[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = starts.long().cumsum(-1) - 1  # which distinct id each draw belongs to
    counts = torch.zeros_like(draws).scatter_add_(-1, slot, torch.ones_like(draws))
    ids = torch.zeros_like(draws).scatter_(-1, slot, draws)  # all draws of a slot carry the same id
    return ids, counts


def _systematic_points(
    probs: torch.Tensor, num_samples: int | torch.Tensor, width: int, generator: torch.Generator | None
) -> torch.Tensor:
    """``x_i = F^{-1}((u + i) / n)`` for ``i < width``, one ``u ~ U[0, 1)`` per row of ``probs`` ``(N, V)``
    (unnormalised, cumulative distribution ``F``); ``num_samples``: ``n``, or each row's ``(N, 1)``."""
    cdf = probs.cumsum(-1)  # non-decreasing in float32 too: a token of probability 0 repeats its left end
    total = cdf[:, -1:]
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)
    steps = torch.arange(width, device=probs.device, dtype=cdf.dtype)
    points = ((u + steps) / num_samples * total).to(cdf.dtype).minimum(total.nextafter(torch.zeros_like(total)))
    # right=True: the first token whose cumulative mass passes the point, never one of probability 0
    return torch.searchsorted(cdf, points.contiguous(), right=True).clamp_max(probs.shape[-1] - 1)


def allocate_draws(tail: torch.Tensor, num_samples: int) -> torch.Tensor:
    """How many of a row's ``num_samples * N`` draws each of its ``N`` tokens gets: ``n_t``, ``(N,)`` int64.

    A token whose tail (``tail``, ``(N, V)``: the probabilities left to sample, the head's set to 0) has mass
    ``m_t`` and shape ``q_t = tail_t / m_t`` gets a target whose squared error is ``m_t**2 (1 - ||q_t||**2) / n_t``
    from ``n_t`` iid draws. Their sum over the row, for a fixed total ``sum_t n_t = n N``, is least at
    ``n_t ∝ w_t = m_t sqrt(1 - ||q_t||**2) = sqrt(m_t**2 - ||tail_t||**2)`` (Lagrange, as Neyman allocates a
    stratified sample): a confident token, whose tail is small or one token, needs few draws, an uncertain
    one many. Here ``n_t = clip(lambda w_t, 1, 255)`` with ``lambda`` set by bisection so that they sum to
    ``n N``, rounded by largest remainder (what 255 a token cannot hold goes round the tokens below it). Every token keeps at least one draw, so each token's target stays
    unbiased (the counts are a function of the teacher's probabilities, not of the draws); a row whose tails
    are all one token shares the draws evenly.
    """
    # w_t in float64, a bounded block of rows at a time (no (N, V) float64 copy of a long row), then on the host:
    # the bisection below reads it 100 times, and on a GPU each read would be a device sync
    weight = torch.cat([
        ((rows.sum(-1) ** 2 - (rows**2).sum(-1)).clamp_min(0.0)).sqrt()
        for rows in (block.double() for block in tail.split(_WEIGHT_ROWS))
    ]).cpu()  # fmt: skip
    rows, total = tail.shape[0], num_samples * tail.shape[0]
    if not bool((weight > 0).any()):
        return torch.full((rows,), num_samples, dtype=torch.long, device=tail.device)
    low, high = 0.0, float(MAX_DRAWS_PER_TOKEN) / weight[weight > 0].min().item()
    for _ in range(100):  # sum_t clip(lambda w_t, 1, 255) grows with lambda from N to 255 N
        middle = (low + high) / 2
        if (middle * weight).clamp(1.0, MAX_DRAWS_PER_TOKEN).sum().item() < total:
            low = middle
        else:
            high = middle
    share = (high * weight).clamp(1.0, MAX_DRAWS_PER_TOKEN)
    counts = share.floor().long()
    left = total - int(counts.sum().item())  # the largest remainders get one more, then (when every token
    while left > 0:  # with a tail to share is at 255) the rest go round the others
        room = counts < MAX_DRAWS_PER_TOKEN
        given = min(left, int(room.sum().item()))
        counts[torch.where(room, share - counts, -torch.inf).topk(given).indices] += 1
        left -= given
    return counts.to(tail.device)


def _draw_allocated(
    probs: torch.Tensor, num_samples: int, generator: torch.Generator | None, scheme: str = "iid"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A row's draws allocated among its tokens (:func:`allocate_draws`), each token's ``n_t`` drawn as
    :func:`_draw` draws (iid, or systematic at ``(u + i) / n_t``) from ``probs`` ``(N, V)`` (unnormalised).

    Returns ``(pooled, lengths)``: the ``n N`` draws, token after token, each token's ascending, laid out
    ``(N, num_samples)`` row-major (so a token's draws may straddle slots of its neighbours), and ``n_t``
    ``(N, 1)``. :func:`regroup_draws` gives each token its own.
    """
    _check_scheme(scheme)
    lengths = allocate_draws(probs, num_samples)
    width = int(lengths.max().item())
    slots = torch.arange(width, device=probs.device)
    if scheme == "systematic":
        draws = _systematic_points(probs, lengths[:, None], width, generator)
    else:
        draws = torch.multinomial(probs, width, replacement=True, generator=generator)
    kept = slots < lengths[:, None]
    draws, _ = torch.where(kept, draws, probs.shape[-1]).sort(dim=-1)  # a token's own draws first, ascending
    return draws[kept].view(-1, num_samples), lengths[:, None]


def regroup_draws(pooled: torch.Tensor, lengths: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's own draws from an adaptive allocation's pooled ones (:func:`_draw_allocated`).

    ``pooled``: ``(L, n)``, the row's ``n L`` draws token after token; ``lengths``: ``(L,)`` or ``(L, 1)``, each
    token's count ``n_t``. Returns ``(ids, counts)``, ``(L, width)`` each (``width``: at least the largest
    ``n_t``): token ``t``'s ``n_t`` draws left-aligned with count 1, then id 0 with count 0, so that
    :func:`head_tail_weights` gives each of its draws ``m_t / n_t``.
    """
    lengths = lengths.reshape(-1).long()
    flat = pooled.reshape(-1)
    if int(lengths.sum().item()) != flat.numel() or lengths.numel() != pooled.shape[0]:
        raise ValueError(
            f"An adaptive RS-KD row holds {flat.numel()} draws for {pooled.shape[0]} tokens, but its per-token "
            f"counts ({lengths.numel()}) sum to {int(lengths.sum().item())}: the row was cut or its columns "
            "mixed up; recompute the cache rather than slicing its rows."
        )
    width = int(lengths.max().item()) if width is None else width
    slots = torch.arange(width, device=pooled.device)
    kept = slots < lengths[:, None]
    index = ((lengths.cumsum(0) - lengths)[:, None] + slots).clamp_max(max(flat.numel() - 1, 0))
    ids = torch.where(kept, flat[index] if flat.numel() else torch.zeros_like(index), 0)
    return ids, kept.long()


def sample_head_and_tail(
    teacher_logits: torch.Tensor,
    head: int,
    num_samples: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    proposal_temperature: float = 1.0,
    scheme: str = "iid",
    allocation: str = "even",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RS-KD with an exact head: the ``head`` most likely tokens kept exactly, ``num_samples`` draws from the rest.

    With ``p = softmax(z_t / T)``, ``H`` the ``head`` largest entries of ``p`` and ``m = 1 - sum_{i in H} p_i``
    the tail's mass, the tail draws ``x_1, ..., x_n ~ p_i / m`` (``i`` not in ``H``) are stored as
    :func:`sample_teacher_tokens` stores its draws. The sparse target (:func:`head_tail_weights`) puts
    ``p_i`` on each head id and ``m * c_j / n`` on a tail id drawn ``c_j`` times: its expectation over
    the draws is ``p`` exactly, and its variance is that of plain RS-KD restricted to the tail, scaled
    by ``m**2``. A row whose tail holds no mass (``m = 0`` in float32) draws uniformly: those draws
    weigh 0. With ``proposal_temperature != 1`` the tail is drawn from a tempered proposal and
    ``tail_counts`` are float importance weights (:func:`sample_sparse_target`). ``scheme``: how the
    tail is drawn (:func:`_draw`); ``allocation="adaptive"``: the row's ``n N`` tail draws shared by need
    (:func:`_draw_allocated`), returned as the pooled draws and each token's count ``(N, 1)``.

    Shapes: ``teacher_logits``: ``(N, V)``. Returns ``(head_ids, head_probs, tail_ids, tail_counts)``:
    ``(N, head)`` int64 ids by decreasing probability and their float32 probabilities; ``(N,
    num_samples)`` int64 tail ids and counts as :func:`sample_teacher_tokens` returns them.
    """
    if teacher_logits.dim() != 2:
        raise ValueError(
            f"teacher_logits must be (N, V), got shape {tuple(teacher_logits.shape)}; flatten the "
            "batch and sequence dimensions first (logits.flatten(0, -2))."
        )
    if not 1 <= head < teacher_logits.shape[-1]:
        raise ValueError(
            f"head={head} must be between 1 and the vocabulary size minus one, {teacher_logits.shape[-1] - 1}."
        )
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be at least 1.")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive.")
    probs = F.softmax(teacher_logits.float() / temperature, dim=-1)
    head_probs, head_ids = probs.topk(head, dim=-1)
    tail = probs.scatter(-1, head_ids, 0.0)
    empty = tail.sum(-1) <= 0
    if bool(empty.any()):
        tail[empty] = 1.0
    if proposal_temperature != 1.0:  # tail weights in the counts' place (sample_sparse_target)
        tail_ids, tail_weights = _draw_tempered(tail, num_samples, proposal_temperature, generator, scheme)
        return head_ids, head_probs, tail_ids, tail_weights
    if allocation == "adaptive":
        return head_ids, head_probs, *_draw_allocated(tail, num_samples, generator, scheme)
    tail_ids, tail_counts = _draw(tail, num_samples, generator, scheme)
    return head_ids, head_probs, tail_ids, tail_counts


def sample_sparse_target(
    teacher_logits: torch.Tensor,
    num_samples: int,
    temperature: float = 1.0,
    *,
    head: int = 0,
    proposal_temperature: float = 1.0,
    generator: torch.Generator | None = None,
    counts: bool = True,
    scheme: str = "iid",
    allocation: str = "even",
) -> tuple[torch.Tensor, ...]:
    """The RS-KD cache's draws for one batch, in any of its forms: plain, exact head, tempered proposal, draws.

    - ``head = 0``, ``proposal_temperature = 1``: :func:`sample_teacher_tokens`, ``(ids, counts)``.
    - ``head > 0``: :func:`sample_head_and_tail`, ``(head_ids, head_probs, tail_ids, tail_counts)``.
    - ``proposal_temperature = tau != 1``: the draws come from the proposal ``q ∝ r**(1/tau)`` instead of
      the target ``r`` (``p``, or the tail ``p / m`` with a head), and each distinct id carries the
      self-normalised importance weight ``w_j = c_j r_j / q_j / sum_k c_k r_k / q_k`` (the normalising
      constants cancel: ``r_j / q_j ∝ r_j**(1 - 1/tau)``): float32 weights summing to 1 take the
      counts' place. ``tau > 1`` flattens the proposal (more of the tail is seen), ``tau < 1``
      sharpens it. Self-normalised importance sampling is consistent, not unbiased: its bias
      shrinks as ``1 / n``.
    - ``counts = False``: the last two outputs (distinct ids and their counts) become one, the ``n`` draws
      themselves (:func:`draws_of`), each weighing ``1 / n``: the same draws, the same target, stored in
      2 bytes per draw (a ``uint16`` id) instead of 3 per slot (id and ``uint8`` count), so that a byte
      budget holds more draws when most of them are distinct.
    - ``scheme``: ``"iid"`` draws (the paper's) or ``"systematic"`` ones (:func:`_draw`), in any of these forms.
    - ``allocation = "adaptive"`` (with ``counts = False``): the ``n N`` draws of the ``N`` rows (one block) shared
      among them by need (:func:`allocate_draws`); the last output is then two, the pooled draws ``(N, n)`` and
      each row's count ``(N, 1)`` (:func:`regroup_draws` reads them back).

    Shapes: ``teacher_logits``: ``(N, V)``; every output ``(N, head)`` or ``(N, num_samples)``.
    """
    if not 0 < proposal_temperature < float("inf"):
        raise ValueError(f"proposal_temperature={proposal_temperature} must be positive and finite.")
    if allocation not in DRAW_ALLOCATIONS:
        raise ValueError(f"allocation={allocation!r} must be one of {DRAW_ALLOCATIONS}.")
    if allocation == "adaptive":
        if counts or proposal_temperature != 1.0:
            raise ValueError(
                "allocation='adaptive' stores each token's draws themselves, pooled, 1/n_t each: it needs "
                "counts=False and proposal_temperature=1."
            )
        if head:
            return sample_head_and_tail(teacher_logits, head, num_samples, temperature, generator, scheme=scheme,
                                        allocation=allocation)  # fmt: skip
        _check_sampling(teacher_logits, num_samples, temperature)
        return _draw_allocated(F.softmax(teacher_logits.float() / temperature, dim=-1), num_samples, generator,
                               scheme)  # fmt: skip
    if not counts:
        if proposal_temperature != 1.0:
            raise ValueError(
                "counts=False stores the draws themselves, which weigh 1/n each; a tempered proposal's draws "
                "need their importance weights: keep counts=True or proposal_temperature=1."
            )
        *rest, ids, draw_counts = sample_sparse_target(teacher_logits, num_samples, temperature, head=head,
                                                       generator=generator, scheme=scheme)  # fmt: skip
        return *rest, draws_of(ids, draw_counts)
    if head:
        head_ids, head_probs, tail_ids, tail_counts = sample_head_and_tail(
            teacher_logits, head, num_samples, temperature, generator, proposal_temperature, scheme
        )
        return head_ids, head_probs, tail_ids, tail_counts
    if proposal_temperature == 1.0:
        return sample_teacher_tokens(teacher_logits, num_samples, temperature, generator, scheme)
    _check_sampling(teacher_logits, num_samples, temperature)
    return _draw_tempered(
        F.softmax(teacher_logits.float() / temperature, dim=-1), num_samples, proposal_temperature, generator,
        scheme,
    )


def draws_of(ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The draws behind distinct ``ids`` and their integer ``counts`` (``(N, n)`` each, as :func:`_draw` returns
    them, summing to ``n`` per row): id ``id_j`` repeated ``c_j`` times, ascending, ``(N, n)``.

    Read back with a weight of 1 per draw, ``w = 1 / n`` each (:func:`normalised` of ones), the target is
    ``sum_j (c_j / n) onehot(id_j)``, that of the counts.
    """
    ends = counts.long().cumsum(-1)  # draw i belongs to the first slot whose running count exceeds i
    slot = torch.searchsorted(
        ends, torch.arange(ids.shape[-1], device=ids.device).expand_as(ends).contiguous(), right=True
    )
    return ids.gather(-1, slot.clamp_max(ids.shape[-1] - 1))


def _draw_tempered(
    target: torch.Tensor,
    num_samples: int,
    proposal_temperature: float,
    generator: torch.Generator | None,
    scheme: str = "iid",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws from ``q ∝ target**(1/tau)`` (``target`` ``(N, V)``, unnormalised), as distinct ids and their
    self-normalised importance weights ``c_j (target_j / q_j)``, summing to 1 per row."""
    log_target = target.log()
    log_q = log_target / proposal_temperature
    proposal = (log_q - log_q.amax(-1, keepdim=True)).exp()
    ids, counts = _draw(proposal, num_samples, generator, scheme)
    drawn = counts > 0
    log_ratio = torch.where(
        drawn, (1.0 - 1.0 / proposal_temperature) * log_target.gather(-1, ids), -torch.inf
    )
    weights = counts * (log_ratio - log_ratio.amax(-1, keepdim=True)).exp()
    return ids, weights / weights.sum(-1, keepdim=True)


HEAD_QUANTA = 255  # a quantized head probability is stored as k in 0..255 and read as k / 255


def quantize_probs(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A row's probabilities ``(N, h)`` (summing to at most 1) stored in 8 bits by systematic rounding of their
    running sum: with ``S_i = p_1 + ... + p_i`` and one ``u ~ U[0, 1)`` per row, ``K_i = floor(255 S_i + u)`` and
    ``k_i = K_i - K_{i-1}`` (``K_0 = 0``).

    - ``E[k_i] = 255 p_i`` exactly, and ``k_i`` is ``floor(255 p_i)`` or ``ceil(255 p_i)``: a head read back as
      ``k / 255`` (:func:`dequantize_probs`) is unbiased, with a variance of at most ``1 / (4 * 255**2)`` a token;
    - ``sum_i k_i = K_h <= 255``, so the tail mass ``1 - sum k / 255`` is never negative (rounding each
      ``p_i`` on its own would push it below 0, and a clamp there would bias the target), and it is unbiased
      too. Drawn independently of the tail's draws, ``u`` keeps the whole RS-KD target unbiased.

    Returns int64 in 0..255.
    """
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)
    running = (probs.float().cumsum(-1) * HEAD_QUANTA + u).floor().clamp(0, HEAD_QUANTA)
    return running.diff(dim=-1, prepend=torch.zeros_like(running[:, :1])).long()


def dequantize_probs(quanta: torch.Tensor) -> torch.Tensor:
    """``k / 255`` in float32: the probabilities :func:`quantize_probs` stored."""
    return quanta.float() / HEAD_QUANTA


def head_tail_weights(head_probs: torch.Tensor, tail_counts: torch.Tensor) -> torch.Tensor:
    """The sparse target of :func:`sample_head_and_tail`: ``[p_head, m * c / n]`` with ``m = 1 - sum p_head``.

    ``m`` is clamped at 0 (a head holding all the mass, rounded); ``n = sum_j c_j`` (a padded position
    with no draws weighs its head only). ``tail_counts`` may be importance weights (a tempered
    proposal): they are normalised the same way (:func:`normalised`), so the weights sum to 1. Shapes: ``head_probs``: ``(..., h)``,
    ``tail_counts``: ``(..., n)``; returns ``(..., h + n)`` float32 weights, the ``teacher_values`` of
    ``chunked_lm_losses(kd="sampled")`` for the ids ``[head_ids, tail_ids]``.
    """
    head_probs = head_probs.float()
    tail_mass = (1.0 - head_probs.sum(-1, keepdim=True)).clamp_min(0.0)
    return torch.cat([head_probs, tail_mass * normalised(tail_counts)], dim=-1)


def normalised(values: torch.Tensor) -> torch.Tensor:
    """``values / sum(values)`` over the last dim in float32; a row summing to 0 (padding) stays 0.

    Counts ``c / n``; stored importance weights (float16) summing to 1 again after their rounding.
    """
    values = values.float()
    total = values.sum(-1, keepdim=True)
    return values / torch.where(total > 0, total, 1.0)


def sparse_weights(
    kd: str, values: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A sparse teacher's weights ``w_j`` on its stored ids, in float32, with ``log w`` where the loss needs it.

    - ``"topk"``: ``w = softmax(v / T)`` over the stored top-``k`` logits ``v``; returns ``(w, log w)``.
    - ``"sampled"``: ``w_j = c_j / n`` for counts ``c`` summing to ``n`` (or head-and-tail weights, summing
      to 1; a padded row of zeros stays 0); returns ``(w, None)``.
    """
    if kd == "topk":
        log_w = F.log_softmax(values.float() / temperature, dim=-1)
        return log_w.exp(), log_w
    counts = values.float()
    return counts / counts.sum(-1, keepdim=True).clamp_min(1.0), None


def generalized_jsd_kd(kd: str | None, jsd_mixture: float) -> str | None:
    """``kd``, with the generalized JSD's ends named as the KLs they are (``b = 0``: ``"kl"``, ``b = 1``:
    ``"reverse_kl"``); ``jsd_mixture`` outside ``[0, 1]`` refused."""
    if not 0.0 <= jsd_mixture <= 1.0:
        raise ValueError(f"jsd_mixture={jsd_mixture} must be in [0, 1] (0: forward KL, 1: reverse KL).")
    if kd == "jsd" and jsd_mixture in (0.0, 1.0):
        return "kl" if jsd_mixture == 0.0 else "reverse_kl"
    return kd


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(-1)`` for ``(c, V)`` tensors, without the ``(c, V)`` product."""
    return torch.einsum("cv,cv->c", a, b)


def _kd_grad(
    kd: str,
    log_p_s: torch.Tensor,
    temperature: float,
    teacher_hidden: torch.Tensor | None,
    teacher_head: torch.Tensor | None,
    ids: torch.Tensor | None,
    values: torch.Tensor | None,
    jsd_mixture: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position soft-label loss ``l`` (before ``T**2``) and ``dl/ds`` for ``s = z / T``, one chunk.

    Works in place on ``log_p_s = log_softmax(s)`` (float32) and frees each ``(c, V)`` block as soon
    as it is used, so that at most four are alive at once (two for the sparse teachers). Shapes:
    ``log_p_s``: ``(c, V)``; ``teacher_hidden``: ``(c, Dt)``, ``teacher_head``: ``(V, Dt)``; ``ids``,
    ``values``: ``(c, k)``. Returns ``(l, g)`` of shapes ``(c,)`` and ``(c, V)``. ``jsd_mixture``
    (``kd="jsd"`` only) is the ``mixture`` of :func:`~hf_distill.losses.generalized_jsd_loss`, strictly
    between 0 and 1 (the caller sends its ends to ``"kl"`` and ``"reverse_kl"``).
    """
    if kd in _DENSE_TEACHER:
        teacher_z = (teacher_hidden @ teacher_head.T).float()
        log_p_t = F.log_softmax(teacher_z.div_(temperature), dim=-1)
        del teacher_z
    if kd == "kl":  # l = sum p_t (log p_t - log p_s);  dl/ds = p_s - p_t
        p_t = log_p_t.exp()
        per_position = _dot(p_t, log_p_t.sub_(log_p_s))
        del log_p_t
        return per_position, log_p_s.exp_().sub_(p_t)
    if kd == "reverse_kl":  # l = sum p_s (log p_s - log p_t);  dl/ds = p_s * (log p_s - log p_t - l)
        p_s = log_p_s.exp()
        diff = log_p_s.sub_(log_p_t)
        del log_p_t
        per_position = _dot(p_s, diff)
        return per_position, p_s.mul_(diff.sub_(per_position[:, None]))
    if kd == "jsd":
        # b = jsd_mixture, m = b p_t + (1 - b) p_s:  l = b KL(p_t||m) + (1 - b) KL(p_s||m);
        # dl/dp_s = a = (1 - b) (log p_s - log m) (the terms in 1/m cancel since b p_t + (1 - b) p_s = m),
        # dl/ds = p_s * (a - sum p_s a) (the softmax Jacobian), and sum p_s a = (1 - b) KL(p_s||m).
        b = jsd_mixture
        log_m = torch.logaddexp(log_p_t + math.log(b), log_p_s + math.log1p(-b))
        p_t = log_p_t.exp()
        kl_t = _dot(p_t, log_p_t.sub_(log_m))
        del p_t, log_p_t
        p_s = log_p_s.exp()
        a = log_p_s.sub_(log_m)
        del log_m
        kl_s = _dot(p_s, a)
        return b * kl_t + (1 - b) * kl_s, p_s.mul_(a.sub_(kl_s[:, None]).mul_(1 - b))
    # Sparse teacher: weights w_j on ids id_j, l = const - sum_j w_j log p_s[id_j];
    # dl/ds = p_s * sum_j w_j - scatter(w), since d log p_s[i] / ds = onehot(i) - p_s.
    ids = ids.long()
    log_p_s_ids = log_p_s.gather(-1, ids)
    w, log_w = sparse_weights(kd, values, temperature)
    if log_w is not None:  # topk: l = sum_j w_j (log w_j - log p_s[id_j])
        per_position = (w * (log_w - log_p_s_ids)).sum(-1)
    else:  # sampled: l = -sum_j w_j log p_s[id_j]
        per_position = -(w * log_p_s_ids).sum(-1)
    return per_position, log_p_s.exp_().mul_(w.sum(-1, keepdim=True)).scatter_add_(-1, ids, -w)


class _ChunkedLMLosses(torch.autograd.Function):
    """Forward returns ``(total, kd, ce)`` with ``total = kd_weight * kd + ce_weight * ce``; ``kd`` and ``ce``
    are detached parts for logging.

    The gradient of ``total`` w.r.t. hidden states and head is formed chunk by chunk in forward, the two
    losses' gradients combined per chunk with their weights (one matrix product each for the hidden states
    and the head); backward only scales it by the grad output.
    """

    @staticmethod
    def forward(
        ctx,
        hidden,
        head,
        teacher_hidden,
        teacher_head,
        ids,
        values,
        labels,
        kd,
        jsd_mixture,
        temperature,
        chunk_size,
        kd_weight,
        ce_weight,
    ):
        n, dtype = hidden.shape[0], hidden.dtype
        want_hidden, want_head = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_grad = want_hidden or want_head
        has_kd, has_ce = kd is not None, labels is not None
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_head = torch.zeros(head.shape, dtype=torch.float32, device=head.device) if want_head else None
        kd_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        if has_ce:
            labelled = labels != IGNORE_INDEX
            n_labelled = labelled.sum().clamp_min(1).float()
        kd_scale = (
            kd_weight * temperature / max(n, 1)
        )  # d(T**2 mean_i l_i)/dz_i = T**2 / N * (1/T) * dl_i/ds_i
        for start in range(0, n, chunk_size):
            rows = slice(start, min(start + chunk_size, n))
            h = hidden[rows]
            z = (h @ head.T).float()
            g = None  # d total / d z for this chunk
            if has_ce:  # l = -log softmax(z)[y] at T = 1;  dl/dz = softmax(z) - onehot(y), labelled rows
                mask = labelled[rows]
                target = torch.where(mask, labels[rows], 0).long()[:, None]
                log_p = F.log_softmax(z, dim=-1)
                ce_sum -= (log_p.gather(-1, target).squeeze(-1) * mask).sum()
                if want_grad:
                    weight = (ce_weight * mask.float() / n_labelled)[:, None]
                    minus_one = torch.full_like(target, -1.0, dtype=log_p.dtype)
                    g = log_p.exp_().scatter_add_(-1, target, minus_one).mul_(weight)
                del log_p
            if has_kd:
                log_p_s = F.log_softmax(z.div_(temperature) if temperature != 1.0 else z, dim=-1)
                del z
                per_position, g_kd = _kd_grad(
                    kd,
                    log_p_s,
                    temperature,
                    None if teacher_hidden is None else teacher_hidden[rows],
                    teacher_head,
                    None if ids is None else ids[rows],
                    None if values is None else values[rows],
                    jsd_mixture,
                )
                del log_p_s
                kd_sum += temperature**2 * per_position.sum()
                g = g_kd.mul_(kd_scale) if g is None else g.add_(g_kd, alpha=kd_scale)
                del g_kd
            else:
                del z
            if not want_grad:
                continue
            g = g.to(dtype)
            if want_hidden:
                grad_hidden[rows] = g @ head
            if want_head and dtype == torch.float32:
                grad_head.addmm_(g.T, h)
            elif want_head:
                grad_head += (g.T @ h).float()
            del g  # before the next chunk's blocks are made
        kd_value = kd_sum / max(n, 1)
        ce_value = ce_sum / n_labelled if has_ce else ce_sum
        ctx.grad_hidden = grad_hidden
        ctx.grad_head = grad_head.to(head.dtype) if grad_head is not None else None
        ctx.used = False
        ctx.mark_non_differentiable(kd_value, ce_value)
        total = kd_weight * kd_value + ce_weight * ce_value
        return total, kd_value, ce_value

    @staticmethod
    def backward(ctx, grad_total, grad_kd, grad_ce):
        if ctx.used:
            raise RuntimeError(
                "chunked_lm_losses keeps one copy of its gradients, used by the first backward; "
                "compute the losses again for a second backward (retain_graph=True cannot reuse them)."
            )
        ctx.used = True
        grad_hidden = (
            ctx.grad_hidden.mul_(grad_total.to(ctx.grad_hidden.dtype))
            if ctx.grad_hidden is not None
            else None
        )
        grad_head = (
            ctx.grad_head.mul_(grad_total.to(ctx.grad_head.dtype)) if ctx.grad_head is not None else None
        )
        ctx.grad_hidden = ctx.grad_head = None
        return grad_hidden, grad_head, *([None] * 11)


def _check_inputs(
    student_hidden,
    student_head,
    kd,
    temperature,
    teacher_hidden,
    teacher_head,
    ids,
    values,
    labels,
    chunk_size,
    kd_weight,
    ce_weight,
):
    if kd is not None and kd not in LM_KD_LOSSES:
        raise ValueError(f"kd={kd!r} is not one of {LM_KD_LOSSES} (or None for the hard-label CE only).")
    if kd is None and labels is None:
        raise ValueError(
            f"chunked_lm_losses needs kd (one of {LM_KD_LOSSES}) or labels, or both; got neither."
        )
    if (
        student_hidden.dim() != 2
        or student_head.dim() != 2
        or student_hidden.shape[1] != student_head.shape[1]
    ):
        raise ValueError(
            f"student_hidden must be (N, D) and student_head (V, D); got {tuple(student_hidden.shape)} and "
            f"{tuple(student_head.shape)}. Flatten the batch: hidden[mask] or hidden.flatten(0, 1)."
        )
    n, vocab = student_hidden.shape[0], student_head.shape[0]
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be at least 1 position.")
    if not (0 <= kd_weight < math.inf and 0 <= ce_weight < math.inf) or kd_weight + ce_weight == 0:
        raise ValueError(
            f"kd_weight={kd_weight} and ce_weight={ce_weight} must be finite, >= 0 and not both zero."
        )
    if labels is not None and tuple(labels.shape) != (n,):
        raise ValueError(f"labels must be (N,) = ({n},), got {tuple(labels.shape)}.")
    if labels is not None and (labels.dtype.is_floating_point or labels.dtype == torch.bool):
        raise TypeError(f"labels must be integer token ids (-100 to ignore), got dtype {labels.dtype}.")
    if kd in _DENSE_TEACHER:
        if teacher_hidden is None or teacher_head is None:
            raise ValueError(
                f"kd={kd!r} needs the live teacher's teacher_hidden (N, Dt) and teacher_head (V, Dt)."
            )
        if (
            teacher_hidden.dim() != 2
            or teacher_hidden.shape[0] != n
            or teacher_head.shape[0] != vocab
            or teacher_head.shape[1] != teacher_hidden.shape[1]
        ):
            raise ValueError(
                f"teacher_hidden must be (N, Dt) = ({n}, Dt) and teacher_head (V, Dt) = ({vocab}, Dt); got "
                f"{tuple(teacher_hidden.shape)} and {tuple(teacher_head.shape)}. Teacher and student must "
                "share the vocabulary."
            )
    if kd in _SPARSE_TEACHER:
        what = "top-k logits" if kd == "topk" else "sample counts"
        if ids is None or values is None:
            raise ValueError(f"kd={kd!r} needs teacher_ids (N, k) and teacher_values (N, k), the {what}.")
        if ids.dim() != 2 or ids.shape[0] != n or ids.shape != values.shape:
            raise ValueError(
                f"teacher_ids and teacher_values must both be (N, k) with N = {n}; got {tuple(ids.shape)} and "
                f"{tuple(values.shape)}."
            )
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"teacher_ids must be integer token ids, got dtype {ids.dtype}.")


class ChunkedLosses(NamedTuple):
    """What :func:`chunked_lm_losses` returns: ``loss = kd_weight * kd + ce_weight * ce`` (differentiable),
    and its parts ``kd`` and ``ce``, detached, for logging (``ce`` is None without labels)."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor | None


def chunked_lm_losses(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    *,
    kd: str | None,
    temperature: float = 1.0,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: torch.Tensor | None = None,
    teacher_ids: torch.Tensor | None = None,
    teacher_values: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    chunk_size: int = 1024,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    jsd_mixture: float = 0.5,
) -> ChunkedLosses:
    """``kd_weight * KD + ce_weight * CE`` of a causal LM from its hidden states, in chunks of positions.

    The student's logits are ``z_s = h_s @ W_s.T`` and a live teacher's ``z_t = h_t @ W_t.T``, both
    formed ``chunk_size`` positions at a time (in float32 for the softmax) and never kept for all
    ``N``. With ``p_s = softmax(z_s / T)`` the soft-label loss ``kd`` is ``T**2`` times the mean over
    the ``N`` positions of:

    - ``"kl"``: ``KL(p_t || p_s)``, ``p_t = softmax(z_t / T)``, as :func:`~hf_distill.losses.kl_div_loss`;
    - ``"reverse_kl"``: ``KL(p_s || p_t)``, as :func:`~hf_distill.losses.reverse_kl_loss`;
    - ``"jsd"``: the generalized JSD of GKD with ``b = jsd_mixture``, ``m = b p_t + (1 - b) p_s``:
      ``b KL(p_t || m) + (1 - b) KL(p_s || m)``, as :func:`~hf_distill.losses.generalized_jsd_loss`
      (``b = 0.5``, the default, is :func:`~hf_distill.losses.jsd_loss`; ``b = 0`` is ``"kl"`` and
      ``b = 1`` is ``"reverse_kl"``, TRL's ends);
    - ``"topk"``: ``sum_j w_j (log w_j - log p_s[id_j])``, ``w = softmax(v / T)`` over the stored top
      ``k`` logits ``v`` at ids ``id``, as :func:`~hf_distill.losses.topk_kl_div_loss`;
    - ``"sampled"`` (RS-KD, Anshumann et al., ACL 2025): ``-sum_j (c_j / n) log p_s[id_j]`` for ids
      ``id_j`` drawn ``c_j`` times in ``n = sum_j c_j`` draws from ``p_t`` (see
      :func:`sample_teacher_tokens`). Its expectation over the draws is the cross-entropy
      ``H(p_t, p_s) = KL(p_t || p_s) + H(p_t)``: the value is a cross-entropy, not a KL (it exceeds
      the KL by the teacher's entropy), but the teacher's entropy does not depend on the student, so
      its gradient is an unbiased estimate of the ``"kl"`` gradient. The values are read as
      weights, ``w_j = v_j / sum_k v_k``: counts as above, or the exact-head-plus-sampled-tail
      weights of :func:`head_tail_weights` (``p_i`` on head ids, ``m c_j / n`` on tail ids), whose
      expectation is ``p_t`` too, so the same holds of them.

    The hard-label loss is the cross-entropy at ``T = 1``, ``-log softmax(z_s)[y]``, averaged over
    the positions whose label ``y`` is not ``-100`` (zero when none is).

    The weights go down once, here (as Liger-Kernel's ``weight_soft_loss`` / ``weight_hard_loss``):
    ``kd_weight`` is the trainer's ``alpha``, ``ce_weight`` its ``beta``. Both losses and the gradient of
    their weighted sum with respect to ``student_hidden`` and ``student_head`` come from one pass over
    the chunks; backward only scales that gradient. Nothing is computed for gradients when neither input
    requires grad.

    Shapes: ``student_hidden``: ``(N, D)``, the positions that count, already shifted and selected;
    ``student_head``: ``(V, D)``, no bias (may be tied to the input embeddings); ``teacher_hidden``:
    ``(N, Dt)`` and ``teacher_head``: ``(V, Dt)`` for ``kl``, ``reverse_kl``, ``jsd``;
    ``teacher_ids``: ``(N, k)`` integers and ``teacher_values``: ``(N, k)``, the top-k logits
    (``topk``) or the counts or weights (``sampled``; 0 marks an empty slot); ``labels``: ``(N,)``.

    Returns :class:`ChunkedLosses` ``(loss, kd, ce)``, scalars in float32: ``kd`` is zero when ``kd is
    None``; ``ce`` is None when ``labels`` is None.
    """
    _check_inputs(
        student_hidden,
        student_head,
        kd,
        temperature,
        teacher_hidden,
        teacher_head,
        teacher_ids,
        teacher_values,
        labels,
        chunk_size,
        kd_weight,
        ce_weight,
    )
    if kd not in _DENSE_TEACHER:
        teacher_hidden = teacher_head = None
    if kd not in _SPARSE_TEACHER:
        teacher_ids = teacher_values = None
    if teacher_hidden is not None:
        teacher_hidden, teacher_head = teacher_hidden.detach(), teacher_head.detach()
    kd = generalized_jsd_kd(kd, jsd_mixture)
    loss, kd_value, ce_value = _ChunkedLMLosses.apply(
        student_hidden,
        student_head,
        teacher_hidden,
        teacher_head,
        teacher_ids,
        teacher_values,
        labels,
        kd,
        float(jsd_mixture),
        float(temperature),
        int(chunk_size),
        float(kd_weight if kd is not None else 0.0),
        float(ce_weight if labels is not None else 0.0),
    )
    return ChunkedLosses(loss, kd_value, ce_value if labels is not None else None)
