"""The fused causal-LM loss with the output embeddings read in vocabulary slices, never whole.

:func:`sliced_lm_losses` computes what :func:`hf_distill.vocab_losses.chunked_lm_losses` computes (the same
losses, values and gradients) but reads each head ``W`` ``(V, D)`` as ``S`` row slices ``W[v0:v1]``
through a :class:`HeadSlices`, so a sharding engine need hold only ``V / S`` rows of it at a time
(:func:`hf_distill.sharding.head_slices` gathers them under FSDP2). A softmax over the vocabulary needs its
normaliser before anything that depends on it, so the slices are read in passes, each slice once a pass,
the position chunks inside the slice loop:

- pass 1 (forward): per position, the running maximum ``m`` and sum ``e = sum_v exp(x_v - m)`` of each
  softmax's scaled logits ``x`` (online log-sum-exp: a block whose maximum ``m'`` exceeds ``m`` rescales
  ``e`` by ``exp(m - m')``; ``log Z = m + log e`` at the end), and the loss's other sums;
- for ``kd="jsd"`` only, pass 2 (forward): the mixture ``m = b p_t + (1 - b) p_s`` needs both normalised
  distributions, so ``KL(p_t || m)`` and ``KL(p_s || m)`` are summed once both normalisers are known;
- the last pass (backward): the gradient ``dl/dz`` of each slice from the normalisers, scaled by the
  backward's grad output; the hidden states' gradient is summed over the slices, and the head's
  gradient is handed back a slice at a time (:meth:`HeadSlices.add_grad`).

So each head is read twice for CE, ``kl``, ``reverse_kl``, ``topk`` and ``sampled`` (once without a
backward) and three times for ``jsd`` (:data:`HEAD_READS`). The gradient pass runs in backward, not in
forward as in ``chunked_lm_losses``, so the grad output (which a trainer may scale per rank) multiplies
each slice's gradient before it is reduced to the rank that owns those rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .vocab_losses import (
    _DENSE_TEACHER,
    _SPARSE_TEACHER,
    IGNORE_INDEX,
    ChunkedLosses,
    _check_inputs,
    _dot,
    generalized_jsd_kd,
    sparse_weights,
)

HEAD_READS = {None: 2, "kl": 2, "reverse_kl": 2, "topk": 2, "sampled": 2, "jsd": 3}
"""Reads of each head per training step (forward and backward) by ``kd``; None: CE only. A forward without a
backward reads it once, or twice for ``jsd``. A jsd with ``jsd_mixture`` 0 or 1 is a KL: 2."""


class HeadSlices:
    """An output embedding ``W`` ``(V, D)`` read as row slices, with each slice's gradient added back.

    This plain form slices a tensor that the process holds whole (one process, DDP, a parameter FSDP2 left
    unsharded): :meth:`read` is a view, and each slice's gradient is summed in place in a gradient of
    ``weight``'s shape. Engines that hold ``W`` in pieces subclass it
    (:class:`hf_distill.sharding.ShardedHeadSlices`).

    ``source``: the tensor the gradient of ``W`` flows into through autograd (here ``weight`` itself);
    :meth:`new_grad` makes a zero gradient shaped like it; for each slice, the loss sums its gradient in
    :meth:`slice_grad`'s tensor, then hands it back with :meth:`add_grad`.
    """

    def __init__(self, weight: torch.Tensor):
        if weight.dim() != 2:
            raise ValueError(f"an output embedding must be (V, D), got shape {tuple(weight.shape)}.")
        self.weight = weight
        self.shape = tuple(weight.shape)
        self.dtype, self.device = weight.dtype, weight.device

    @property
    def source(self) -> torch.Tensor:
        return self.weight

    def read(self, v0: int, v1: int) -> torch.Tensor:
        """Rows ``[v0, v1)`` of ``W``, ``(v1 - v0, D)``, outside autograd."""
        return self.weight.detach()[v0:v1]

    def new_grad(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(self.source.shape, dtype=dtype, device=self.source.device)

    def slice_grad(self, grad_source: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
        """Zeros ``(v1 - v0, D)`` in which this process sums its gradient of rows ``[v0, v1)``: here those rows
        of ``grad_source`` themselves, so no slice-sized buffer is added."""
        return grad_source[v0:v1]

    def add_grad(self, grad_source: torch.Tensor, v0: int, v1: int, grad: torch.Tensor) -> None:
        """Hand back ``grad``, the complete gradient of rows ``[v0, v1)`` summed in :meth:`slice_grad`'s tensor,
        into ``grad_source``: here it is there already."""


def slice_bounds(vocab: int, num_slices: int) -> list[tuple[int, int]]:
    """``num_slices`` contiguous row ranges ``[v0, v1)`` covering ``[0, vocab)``, sizes differing by at most 1."""
    if not 1 <= num_slices <= vocab:
        raise ValueError(
            f"num_slices={num_slices} must be between 1 and the vocabulary size {vocab} (1: the whole head)."
        )
    edges = [vocab * k // num_slices for k in range(num_slices + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


@dataclass
class _Setup:
    """What the passes read besides the student's hidden states (non-differentiable, passed through autograd)."""

    student_head: HeadSlices
    teacher_head: HeadSlices | None
    teacher_hidden: torch.Tensor | None
    weights: torch.Tensor | None  # (N, k) sparse-teacher weights w_j
    constant: torch.Tensor | None  # (N,) topk: sum_j w_j log w_j
    ids: torch.Tensor | None  # (N, k) int64
    labels: torch.Tensor | None
    kd: str | None
    jsd_mixture: float
    temperature: float
    chunk_size: int
    kd_weight: float
    ce_weight: float
    bounds: list[tuple[int, int]]
    amp: tuple[str, bool, torch.dtype] = ("cpu", False, torch.bfloat16)  # the caller's autocast


def _mm(s: _Setup, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` under the caller's autocast, as ``chunked_lm_losses`` forms its logits and gradient products; the
    softmax sums around it run with autocast off (``torch.einsum`` would otherwise run in half precision)."""
    device, enabled, dtype = s.amp
    with torch.autocast(device, dtype=dtype, enabled=enabled):
        return a @ b


def _online(m: torch.Tensor, e: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold the block ``x`` ``(c, v)`` into the running maxima ``m`` and sums ``e`` ``(c,)`` (views, in place).

    Returns ``exp(x - m_new)`` and the rescaling ``exp(m_old - m_new)`` of sums taken against the old maxima.
    """
    m_new = torch.maximum(m, x.amax(-1))
    rescale = (m - m_new).exp()
    ex = (x - m_new[:, None]).exp()
    e.mul_(rescale).add_(ex.sum(-1))
    m.copy_(m_new)
    return ex, rescale


def _in_slice(ids: torch.Tensor, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For ids ``(c, k)``: whether each falls in ``[v0, v1)``, and its column in the slice (0 where not)."""
    inside = (ids >= v0) & (ids < v1)
    return inside, torch.where(inside, ids - v0, 0)


def _first_pass(hidden: torch.Tensor, s: _Setup, work: torch.dtype) -> dict[str, torch.Tensor]:
    """Pass 1: log-normalisers ``lse_*`` ``(N,)`` and each loss's per-position value (``jsd``: its normalisers only)."""
    n, device, temp = hidden.shape[0], hidden.device, s.temperature
    has_kd, has_ce, kd = s.kd is not None, s.labels is not None, s.kd

    def full(value):
        return torch.full((n,), value, dtype=work, device=device)

    shared = has_kd and temp == 1.0  # the CE's softmax is the KD's
    ms, es = full(-math.inf), full(0.0)  # student at T (or the CE's, at 1, without kd)
    if has_ce and not shared and has_kd:
        mc, ec = full(-math.inf), full(0.0)
    if kd in _DENSE_TEACHER:
        mt, et = full(-math.inf), full(0.0)
    # kl: sum exp(t - m_t)(t - s); reverse_kl: sum exp(s - m_s)(s - t); sparse: sum_j w_j s[id_j]
    acc = full(0.0)
    if has_ce:
        target = torch.where(s.labels != IGNORE_INDEX, s.labels, 0).long()[:, None]
        z_target = full(0.0)
    for v0, v1 in s.bounds:
        head = s.student_head.read(v0, v1)
        t_head = s.teacher_head.read(v0, v1) if kd in _DENSE_TEACHER else None
        for start in range(0, n, s.chunk_size):
            rows = slice(start, min(start + s.chunk_size, n))
            z = _mm(s, hidden[rows], head.T).to(work)
            if has_ce:
                inside, col = _in_slice(target[rows], v0, v1)
                z_target[rows] += torch.where(inside, z.gather(-1, col), 0.0).squeeze(-1)
                if not has_kd:
                    _online(ms[rows], es[rows], z)
                elif not shared:
                    _online(mc[rows], ec[rows], z)
            if not has_kd:
                continue
            x = z.div_(temp) if temp != 1.0 else z
            if kd in _DENSE_TEACHER:
                t = _mm(s, s.teacher_hidden[rows], t_head.T).to(work).div_(temp)
                ex_t, rescale_t = _online(mt[rows], et[rows], t)
            ex_s, rescale_s = _online(ms[rows], es[rows], x)
            if kd == "kl":
                acc[rows] = acc[rows] * rescale_t + _dot(ex_t, t - x)
            elif kd == "reverse_kl":
                acc[rows] = acc[rows] * rescale_s + _dot(ex_s, x - t)
            elif kd in _SPARSE_TEACHER:
                inside, col = _in_slice(s.ids[rows], v0, v1)
                acc[rows] += (s.weights[rows] * torch.where(inside, x.gather(-1, col), 0.0)).sum(-1)
    out = {"lse_s": ms + es.log()}
    if has_ce:
        lse_c = out["lse_s"] if shared or not has_kd else mc + ec.log()
        out["ce"] = lse_c - z_target
        out["lse_c"] = lse_c
    if kd in _DENSE_TEACHER:
        out["lse_t"] = mt + et.log()
    if kd == "kl":  # sum p_t (log p_t - log p_s), log p = x - lse
        out["kd"] = acc / et - out["lse_t"] + out["lse_s"]
    elif kd == "reverse_kl":
        out["kd"] = acc / es - out["lse_s"] + out["lse_t"]
    elif kd in _SPARSE_TEACHER:  # sum_j w_j (log w_j [topk]) - sum_j w_j (s[id_j] - lse_s)
        w = s.weights
        out["kd"] = w.sum(-1) * out["lse_s"] - acc
        if s.constant is not None:
            out["kd"] += s.constant
    return out


def _blocks(s: _Setup, hidden, head, t_head, rows, stats, work):
    """``log p_s`` (and ``log p_t`` with a dense teacher) of one chunk of one slice, from the known normalisers."""
    z = _mm(s, hidden[rows], head.T).to(work)
    log_p_s = (z / s.temperature if s.temperature != 1.0 else z.clone()).sub_(stats["lse_s"][rows, None])
    log_p_t = None
    if s.kd in _DENSE_TEACHER:
        t = _mm(s, s.teacher_hidden[rows], t_head.T).to(work).div_(s.temperature)
        log_p_t = t.sub_(stats["lse_t"][rows, None])
    return z, log_p_s, log_p_t


def _jsd_pass(hidden: torch.Tensor, s: _Setup, stats: dict, work: torch.dtype) -> None:
    """Pass 2 of ``jsd``: ``kl_t = KL(p_t || m)``, ``kl_s = KL(p_s || m)`` and the per-position loss, into ``stats``."""
    n, b = hidden.shape[0], s.jsd_mixture
    kl_t = torch.zeros(n, dtype=work, device=hidden.device)
    kl_s = torch.zeros_like(kl_t)
    for v0, v1 in s.bounds:
        head, t_head = s.student_head.read(v0, v1), s.teacher_head.read(v0, v1)
        for start in range(0, n, s.chunk_size):
            rows = slice(start, min(start + s.chunk_size, n))
            _, log_p_s, log_p_t = _blocks(s, hidden, head, t_head, rows, stats, work)
            log_m = torch.logaddexp(log_p_t + math.log(b), log_p_s + math.log1p(-b))
            kl_t[rows] += _dot(log_p_t.exp(), log_p_t - log_m)
            kl_s[rows] += _dot(log_p_s.exp(), log_p_s - log_m)
    stats["kl_s"] = kl_s
    stats["kd"] = b * kl_t + (1 - b) * kl_s


def _grad_block(s: _Setup, z, log_p_s, log_p_t, ids_rows, labels_rows, v0, v1, rows, stats, n, n_labelled):
    """``d total / d z`` of one chunk of one slice (before the grad output), as ``chunked_lm_losses`` forms it."""
    g = None
    # CE at T = 1: (softmax(z) - onehot(y)) * ce_weight / n_labelled on the labelled rows
    if s.labels is not None:
        mask = labels_rows != IGNORE_INDEX
        weight = s.ce_weight * mask.to(z.dtype) / n_labelled
        target = torch.where(mask, labels_rows, 0).long()[:, None]
        inside, col = _in_slice(target, v0, v1)
        g = (z - stats["lse_c"][rows, None]).exp_().mul_(weight[:, None])
        g.scatter_add_(-1, col, torch.where(inside, -weight[:, None], 0.0))
    if s.kd is None:
        return g
    kd, b = s.kd, s.jsd_mixture
    p_s = log_p_s.exp()
    if kd == "kl":  # p_s - p_t
        g_kd = p_s.sub_(log_p_t.exp())
    elif kd == "reverse_kl":  # p_s (log p_s - log p_t - l)
        g_kd = p_s.mul_((log_p_s - log_p_t).sub_(stats["kd"][rows, None]))
    elif kd == "jsd":  # (1 - b) p_s (log p_s - log m - KL(p_s || m))
        log_m = torch.logaddexp(log_p_t + math.log(b), log_p_s + math.log1p(-b))
        g_kd = p_s.mul_((log_p_s - log_m).sub_(stats["kl_s"][rows, None]).mul_(1 - b))
    else:  # sparse: p_s sum_j w_j - scatter(w)
        w = s.weights[rows]
        inside, col = _in_slice(ids_rows, v0, v1)
        g_kd = p_s.mul_(w.sum(-1, keepdim=True)).scatter_add_(-1, col, torch.where(inside, -w, 0.0))
    kd_scale = s.kd_weight * s.temperature / max(n, 1)  # d(T**2 mean_i l_i)/dz_i = T / N * dl_i/ds_i
    return g_kd.mul_(kd_scale) if g is None else g.add_(g_kd, alpha=kd_scale)


class _SlicedLMLosses(torch.autograd.Function):
    """Forward: passes 1 (and 2 for jsd), returns ``(total, kd, ce)``; backward: the gradient pass."""

    @staticmethod
    def forward(ctx, hidden, source, s: _Setup):
        n = hidden.shape[0]
        work = torch.promote_types(hidden.dtype, torch.float32)
        device = hidden.device.type  # the logits are formed under the caller's autocast, in backward too
        s.amp = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        with torch.autocast(device, enabled=False):
            stats = _first_pass(hidden.detach(), s, work)
            if s.kd == "jsd":
                _jsd_pass(hidden.detach(), s, stats, work)
        kd_value = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ce_value = torch.zeros_like(kd_value)
        n_labelled = None
        if s.kd is not None:
            kd_value = (s.temperature**2 * stats["kd"].sum() / max(n, 1)).float()
        if s.labels is not None:
            labelled = s.labels != IGNORE_INDEX
            n_labelled = labelled.sum().clamp_min(1).to(work)  # a tensor: no host sync
            ce_value = ((stats["ce"] * labelled).sum() / n_labelled).float()
        ctx.save_for_backward(hidden)
        ctx.setup, ctx.stats, ctx.work, ctx.n_labelled = s, stats, work, n_labelled
        ctx.mark_non_differentiable(kd_value, ce_value)
        return s.kd_weight * kd_value + s.ce_weight * ce_value, kd_value, ce_value

    @staticmethod
    def backward(ctx, grad_total, grad_kd, grad_ce):
        with torch.autocast(ctx.setup.amp[0], enabled=False):
            return _SlicedLMLosses._backward(ctx, grad_total)

    @staticmethod
    def _backward(ctx, grad_total):
        (hidden,) = ctx.saved_tensors
        s, stats, work = ctx.setup, ctx.stats, ctx.work
        want_hidden, want_head = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        hidden, n, dtype = hidden.detach(), hidden.shape[0], hidden.dtype
        grad_hidden = torch.zeros(hidden.shape, dtype=work, device=hidden.device) if want_hidden else None
        grad_source = s.student_head.new_grad(work) if want_head else None
        scale = grad_total.to(work)
        for v0, v1 in s.bounds:
            head = s.student_head.read(v0, v1)
            t_head = s.teacher_head.read(v0, v1) if s.kd in _DENSE_TEACHER else None
            grad_slice = s.student_head.slice_grad(grad_source, v0, v1) if want_head else None
            for start in range(0, n, s.chunk_size):
                rows = slice(start, min(start + s.chunk_size, n))
                z, log_p_s, log_p_t = _blocks(s, hidden, head, t_head, rows, stats, work)
                ids = None if s.ids is None else s.ids[rows]
                labels = None if s.labels is None else s.labels[rows]
                g = _grad_block(s, z, log_p_s, log_p_t, ids, labels, v0, v1, rows, stats, n, ctx.n_labelled)
                del z, log_p_s, log_p_t
                g = g.to(dtype)
                if want_hidden:
                    grad_hidden[rows] += _mm(s, g, head).to(work)
                if want_head:
                    grad_slice += _mm(s, g.T, hidden[rows]).to(work)
                del g
            if want_head:  # handed back now, scaled by the grad output before any reduction across ranks
                s.student_head.add_grad(grad_source, v0, v1, grad_slice.mul_(scale))
            del grad_slice
        ctx.setup = ctx.stats = None
        grad_hidden = grad_hidden.mul_(scale).to(dtype) if want_hidden else None
        grad_source = grad_source.to(s.student_head.source.dtype) if want_head else None
        return grad_hidden, grad_source, None


def sliced_lm_losses(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor | HeadSlices,
    *,
    kd: str | None,
    num_slices: int,
    temperature: float = 1.0,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: torch.Tensor | HeadSlices | None = None,
    teacher_ids: torch.Tensor | None = None,
    teacher_values: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    chunk_size: int = 1024,
    kd_weight: float = 1.0,
    ce_weight: float = 1.0,
    jsd_mixture: float = 0.5,
) -> ChunkedLosses:
    """:func:`~hf_distill.vocab_losses.chunked_lm_losses` with each head read in ``num_slices`` row slices.

    Same arguments, losses and return value as ``chunked_lm_losses`` (whose docstring gives every loss's
    formula): ``kd_weight * kd + ce_weight * ce`` with ``kd`` ``T**2`` times the mean over the ``N``
    positions of the soft-label loss ``l`` and ``ce`` the mean of ``-log softmax(z_s)[y]`` over the labelled
    positions. Heads are tensors ``(V, D)`` or :class:`HeadSlices`; slice ``k`` holds rows
    ``[V k // S, V (k + 1) // S)``.

    The normalisers come online over the slices: with ``x`` a softmax's scaled logits (``z_s / T``,
    ``z_t / T``, or ``z_s`` for CE), ``m`` the maximum over the slices read so far and ``e = sum exp(x -
    m)``, a slice with maximum ``m' > m`` sets ``e <- e exp(m - m') + sum_slice exp(x - m')``, and ``log Z
    = m + log e``. The losses in terms of sums that fold the same way (``log p = x - log Z``):

    - ``"kl"``: ``l = A / e_t - log Z_t + log Z_s``, ``A = sum exp(t - m_t) (t - s)``;
    - ``"reverse_kl"``: ``l = B / e_s - log Z_s + log Z_t``, ``B = sum exp(s - m_s) (s - t)``;
    - ``"topk"`` / ``"sampled"``: ``l = [sum_j w_j log w_j] + (sum_j w_j) log Z_s - sum_j w_j s[id_j]``,
      each ``s[id_j]`` read from the slice holding ``id_j``;
    - CE: ``log Z_c - z_s[y]``;
    - ``"jsd"``: a second pass sums ``KL(p_t || m)`` and ``KL(p_s || m)`` with the normalisers known.

    The gradient ``dl/dz`` is that of ``chunked_lm_losses`` (``p_s - p_t``; ``p_s (log p_s - log p_t - l)``;
    ``(1 - b) p_s (log p_s - log m - KL(p_s || m))``; ``p_s sum_j w_j - scatter(w)``; ``softmax(z_s) -
    onehot(y)``), formed in backward one slice at a time: ``dL/dh = sum_k g_k W_k`` is summed over the slices
    and ``dL/dW_k = g_k.T h`` is handed to ``student_head.add_grad`` as soon as slice ``k`` is done. Each
    head is read ``HEAD_READS[kd]`` times a step (2, 3 for jsd), ``V / S`` rows at a time; peak memory is a
    few ``(chunk_size, V / S)`` blocks plus one ``(V / S, D)`` slice gradient and the ``(N, D)`` hidden
    gradient. The softmax sums run in float32 (float64 for float64 inputs).

    Shapes: as ``chunked_lm_losses``. ``num_slices``: ``1 <= S <= V``.
    """
    if not isinstance(student_head, HeadSlices):
        student_head = HeadSlices(student_head)
    if teacher_head is not None and not isinstance(teacher_head, HeadSlices):
        teacher_head = HeadSlices(teacher_head)

    def shape_of(head):  # _check_inputs reads shapes only
        return None if head is None else torch.empty(head.shape, device="meta")

    _check_inputs(
        student_hidden,
        shape_of(student_head),
        kd,
        temperature,
        teacher_hidden,
        shape_of(teacher_head),
        teacher_ids,
        teacher_values,
        labels,
        chunk_size,
        kd_weight,
        ce_weight,
    )
    bounds = slice_bounds(student_head.shape[0], num_slices)
    kd = generalized_jsd_kd(kd, jsd_mixture)
    weights = ids = constant = None
    work = torch.promote_types(student_hidden.dtype, torch.float32)
    if kd in _SPARSE_TEACHER:
        weights, log_w = sparse_weights(kd, teacher_values, temperature)
        if log_w is not None:  # topk: the constant sum_j w_j log w_j of its loss
            constant = (weights * log_w).sum(-1).to(work)
    if weights is not None:
        ids = teacher_ids.long()
        weights = weights.to(work)
    dense = kd in _DENSE_TEACHER
    setup = _Setup(
        student_head=student_head,
        teacher_head=teacher_head if dense else None,
        teacher_hidden=teacher_hidden.detach() if dense else None,
        weights=weights,
        constant=constant,
        ids=ids,
        labels=labels,
        kd=kd,
        jsd_mixture=float(jsd_mixture),
        temperature=float(temperature),
        chunk_size=int(chunk_size),
        kd_weight=float(kd_weight if kd is not None else 0.0),
        ce_weight=float(ce_weight if labels is not None else 0.0),
        bounds=bounds,
    )
    loss, kd_value, ce_value = _SlicedLMLosses.apply(student_hidden, student_head.source, setup)
    return ChunkedLosses(loss, kd_value, ce_value if labels is not None else None)
