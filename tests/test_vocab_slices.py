"""The vocabulary-sliced fused loss (hf_distill.vocab_slices) equals chunked_lm_losses, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import config
from sharded_slices import zero3_param
from test_lm_trainer import batch_of, lm_rows, tiny_llama

from hf_distill import DistillationTrainer
from hf_distill.errors import InputError
from hf_distill.sharding import head_slices, owned_parts, zero3_owners
from hf_distill.vocab_losses import chunked_lm_losses, sample_teacher_tokens
from hf_distill.vocab_slices import HEAD_READS, HeadSlices, slice_bounds, sliced_lm_losses

N, D, DT, V = 11, 6, 5, 24  # chunk size 4 does not divide N; S = 5 does not divide V
KDS = [None, "kl", "reverse_kl", "jsd", "topk", "sampled"]


def _inputs(seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = {
        "hidden": torch.randn(N, D, generator=g, dtype=torch.float64),
        "head": scale * torch.randn(V, D, generator=g, dtype=torch.float64),
        "teacher_hidden": torch.randn(N, DT, generator=g, dtype=torch.float64),
        "teacher_head": scale * torch.randn(V, DT, generator=g, dtype=torch.float64),
        "labels": torch.randint(0, V, (N,), generator=g),
    }
    x["labels"][[0, 4, 5]] = -100
    return x


def _teacher_side(kd, x):
    if kd in ("kl", "reverse_kl", "jsd"):
        return {"teacher_hidden": x["teacher_hidden"], "teacher_head": x["teacher_head"]}
    logits = x["teacher_hidden"] @ x["teacher_head"].T
    if kd == "topk":
        top = logits.topk(5, dim=-1)
        return {"teacher_ids": top.indices, "teacher_values": top.values}
    if kd == "sampled":
        ids, counts = sample_teacher_tokens(logits, 6, 2.0, generator=torch.Generator().manual_seed(1))
        counts[2] = 0  # a padded position with no draws
        return {"teacher_ids": ids, "teacher_values": counts}
    return {}


def _run(fn, x, kd, labelled, **kwargs):
    """Loss parts and the student's gradients (hidden, head) of ``1.7 * loss``."""
    hidden = x["hidden"].clone().requires_grad_()
    head = x["head"].clone().requires_grad_()
    out = fn(
        hidden,
        head,
        kd=kd,
        labels=x["labels"] if labelled else None,
        chunk_size=4,
        kd_weight=0.7,
        ce_weight=0.4,
        **_teacher_side(kd, x),
        **kwargs,
    )
    (1.7 * out.loss).backward()
    return out, hidden.grad, head.grad


CASES = [(kd, labelled) for kd in KDS for labelled in (True, False) if kd is not None or labelled]


@pytest.mark.parametrize("num_slices", [1, 2, 5])
@pytest.mark.parametrize("kd,labelled", CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_slices_equal_chunked_loss(kd, labelled, num_slices, temperature):
    x = _inputs()
    mixture = {"jsd_mixture": 0.3} if kd == "jsd" else {}
    ref, ref_dh, ref_dw = _run(chunked_lm_losses, x, kd, labelled, temperature=temperature, **mixture)
    out, dh, dw = _run(
        sliced_lm_losses, x, kd, labelled, temperature=temperature, num_slices=num_slices, **mixture
    )
    # chunked_lm_losses works in float32; the slices in float64 for float64 inputs
    close = {"rtol": 1e-6, "atol": 5e-6}
    torch.testing.assert_close(out.loss, ref.loss, **close)
    torch.testing.assert_close(out.kd, ref.kd, **close)
    if labelled:
        torch.testing.assert_close(out.ce, ref.ce, **close)
    else:
        assert out.ce is None
    torch.testing.assert_close(dh, ref_dh, **close)
    torch.testing.assert_close(dw, ref_dw, **close)


def test_slices_in_float32_equal_chunked_loss():
    x = {k: v.float() if v.is_floating_point() else v for k, v in _inputs(3).items()}
    ref, ref_dh, ref_dw = _run(chunked_lm_losses, x, "kl", True, temperature=2.0)
    out, dh, dw = _run(sliced_lm_losses, x, "kl", True, temperature=2.0, num_slices=5)
    assert out.loss.dtype == dh.dtype == dw.dtype == torch.float32
    for got, want in [(out.loss, ref.loss), (out.ce, ref.ce), (dh, ref_dh), (dw, ref_dw)]:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _dense_reference(kd, x, temperature, labels):
    """The losses from the whole (N, V) logits in float64, by hand; the online log-sum-exp must give these."""
    log_p_s = F.log_softmax(x["hidden"] @ x["head"].T / temperature, dim=-1)
    log_p_t = F.log_softmax(x["teacher_hidden"] @ x["teacher_head"].T / temperature, dim=-1)
    per_position = {
        "kl": (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1),
        "reverse_kl": (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1),
    }[kd]
    ce = F.cross_entropy(x["hidden"] @ x["head"].T, labels)
    return 0.7 * temperature**2 * per_position.mean() + 0.4 * ce


@pytest.mark.parametrize("kd", ["kl", "reverse_kl"])
def test_online_log_sum_exp_across_slices_with_far_apart_maxima(kd):
    """Slice k's logits are shifted by 30 k, so each slice's maximum exceeds the last by ~30: a running sum
    not rescaled when the maximum grows (exp(m_old - m_new) = e^-30) is off by orders of magnitude."""
    x = _inputs(5, scale=1.0)
    shift = torch.arange(V) // 8 * 30.0  # 3 slices of 8 rows
    x["hidden"] = torch.cat([x["hidden"], torch.ones(N, 1, dtype=torch.float64)], dim=1)
    x["head"] = torch.cat([x["head"], shift[:, None].double()], dim=1)
    x["teacher_hidden"] = torch.cat([x["teacher_hidden"], torch.ones(N, 1, dtype=torch.float64)], dim=1)
    x["teacher_head"] = torch.cat([x["teacher_head"], 0.5 * shift[:, None].double()], dim=1)
    for flip in (False, True):  # maxima increasing, then decreasing, over the slices
        y = dict(x)
        if flip:
            y["head"], y["teacher_head"] = x["head"].flip(0), x["teacher_head"].flip(0)
            y["labels"] = torch.where(x["labels"] >= 0, V - 1 - x["labels"], -100)
        labels = y["labels"]
        hidden, head = y["hidden"].clone().requires_grad_(), y["head"].clone().requires_grad_()
        want = _dense_reference(kd, {**y, "hidden": hidden, "head": head}, 2.0, labels)
        dh_want, dw_want = torch.autograd.grad(want, (hidden, head))
        out, dh, dw = _run(sliced_lm_losses, y, kd, True, temperature=2.0, num_slices=3)
        torch.testing.assert_close(out.loss, want.float(), rtol=1e-9, atol=1e-6)
        grad_out = float(torch.tensor(1.7))  # the grad output of 1.7 * loss, a float32 loss
        torch.testing.assert_close(dh, grad_out * dh_want, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(dw, grad_out * dw_want, rtol=1e-9, atol=1e-12)


class CountingSlices(HeadSlices):
    """A head that records the slices read and the slice gradients handed back."""

    def __init__(self, weight):
        super().__init__(weight)
        self.reads, self.grads = [], []

    def read(self, v0, v1):
        self.reads.append((v0, v1))
        return super().read(v0, v1)

    def add_grad(self, grad_source, v0, v1, grad):
        assert grad.shape == (v1 - v0, self.shape[1])
        self.grads.append((v0, v1))
        super().add_grad(grad_source, v0, v1, grad)


class CopyingSlices(HeadSlices):
    """A head whose slices are copies and whose slice gradients are separate buffers, added back (as a sharded
    head's are): the loss must not rely on the plain head's in-place views."""

    def read(self, v0, v1):
        return super().read(v0, v1).clone()

    def slice_grad(self, grad_source, v0, v1):
        return torch.zeros((v1 - v0, self.shape[1]), dtype=grad_source.dtype)

    def add_grad(self, grad_source, v0, v1, grad):
        grad_source[v0:v1] += grad


def test_a_head_with_its_own_slice_buffers_gives_the_same_gradients():
    x = _inputs()
    grads = []
    for head in (HeadSlices, CopyingSlices):
        hidden, weight = x["hidden"].clone().requires_grad_(), x["head"].clone().requires_grad_()
        side = _teacher_side("kl", x)
        out = sliced_lm_losses(
            hidden, head(weight), kd="kl", num_slices=5, labels=x["labels"], chunk_size=4, **side
        )
        out.loss.backward()
        grads.append((hidden.grad, weight.grad))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kd", KDS)
def test_each_slice_is_read_once_a_pass_and_its_gradient_handed_back_once(kd):
    x = _inputs()
    head = CountingSlices(x["head"].clone().requires_grad_())
    teacher_head = CountingSlices(x["teacher_head"])
    side = _teacher_side(kd, x)
    if "teacher_head" in side:
        side["teacher_head"] = teacher_head
    out = sliced_lm_losses(
        x["hidden"], head, kd=kd, num_slices=5, labels=x["labels"], chunk_size=4, temperature=2.0, **side
    )
    bounds = slice_bounds(V, 5)
    forward_reads = HEAD_READS[kd] - 1
    assert head.reads == bounds * forward_reads
    out.loss.backward()
    assert head.reads == bounds * HEAD_READS[kd]
    assert head.grads == bounds
    assert teacher_head.reads == (bounds * HEAD_READS[kd] if "teacher_head" in side else [])


def test_no_gradient_pass_without_grad():
    x = _inputs()
    head = CountingSlices(x["head"])
    out = sliced_lm_losses(x["hidden"], head, kd=None, num_slices=2, labels=x["labels"], chunk_size=4)
    assert not out.loss.requires_grad and head.reads == slice_bounds(V, 2)


def test_slice_bounds_cover_the_vocabulary():
    assert slice_bounds(24, 5) == [(0, 4), (4, 9), (9, 14), (14, 19), (19, 24)]
    assert slice_bounds(3, 3) == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.parametrize("bad", [0, -1, V + 1])
def test_bad_slice_count_is_refused(bad):
    x = _inputs()
    with pytest.raises(
        ValueError, match=rf"^num_slices={bad} must be between 1 and the vocabulary size {V} "
    ):
        sliced_lm_losses(x["hidden"], x["head"], kd=None, num_slices=bad, labels=x["labels"])


def test_shapes_are_checked_as_chunked_lm_losses_checks_them():
    x = _inputs()
    with pytest.raises(ValueError, match="student_hidden must be"):
        sliced_lm_losses(x["hidden"], x["head"][:, :3], kd=None, num_slices=2, labels=x["labels"])
    with pytest.raises(ValueError, match="Teacher and student must share the vocabulary"):
        sliced_lm_losses(
            x["hidden"],
            x["head"],
            kd="kl",
            num_slices=2,
            teacher_hidden=x["teacher_hidden"],
            teacher_head=x["teacher_head"][:-1],
        )


def test_under_autocast_the_logits_are_half_precision_and_the_softmax_sums_are_not():
    """CPU autocast to bfloat16: the logits and the gradients' products are formed in bfloat16, forward and
    backward alike (the backward runs under the forward's autocast), and the softmax sums stay in float32: the
    loss and gradients of a float64 reference on the same bfloat16 logits."""
    x = {k: v.float() if v.is_floating_point() else v for k, v in _inputs(7).items()}
    side = _teacher_side("kl", x)
    hidden, head = x["hidden"].clone().requires_grad_(), x["head"].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sliced_lm_losses(
            hidden, head, kd="kl", num_slices=5, temperature=2.0, labels=x["labels"], **side
        )
    out.loss.backward()
    assert hidden.grad.dtype == head.grad.dtype == torch.float32
    ref_hidden, ref_head = x["hidden"].clone().requires_grad_(), x["head"].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = (ref_hidden @ ref_head.T).double()
        z_t = (x["teacher_hidden"] @ x["teacher_head"].T).double()
    log_p_s, log_p_t = F.log_softmax(z / 2, -1), F.log_softmax(z_t / 2, -1)
    kl = 4 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
    want = kl + F.cross_entropy(z, x["labels"])
    want.backward()
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(head.grad, ref_head.grad, rtol=1e-2, atol=1e-3)


def test_the_loss_makes_no_host_sync():
    from test_host_syncs import HostSyncs

    x = _inputs()
    hidden, head = x["hidden"].clone().requires_grad_(), x["head"].clone().requires_grad_()
    for kd in KDS:
        with HostSyncs() as syncs:
            out = sliced_lm_losses(
                hidden, head, kd=kd, num_slices=5, labels=x["labels"], **_teacher_side(kd, x)
            )
            out.loss.backward()
        assert syncs.ours == [], kd


# ---- the trainer's option: lm_vocab_slices ---------------------------------------------------------------------


@pytest.mark.parametrize("kd_loss", ["kl", "jsd"])
def test_vocab_slices_equal_the_whole_heads_loss_and_gradients(tmp_path, kd_loss):
    teacher, rows = tiny_llama(1, layers=3), lm_rows()
    losses, grads = {}, {}
    for slices in (1, 5):  # 5 slices of the 96-row vocabulary: 19 or 20 rows each
        student = tiny_llama(2)
        args = config(
            tmp_path,
            temperature=2.0,
            alpha=0.7,
            beta=0.3,
            kd_loss=kd_loss,
            lm_chunk_size=5,
            lm_vocab_slices=slices,
        )
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows)
        assert trainer.loss_path.reason.endswith("vocabulary slices") == (slices > 1)
        student.train()
        loss = trainer.compute_loss(student, batch_of(rows, trainer))
        loss.backward()
        losses[slices] = loss.detach()
        grads[slices] = {n: p.grad.clone() for n, p in student.named_parameters()}
    torch.testing.assert_close(losses[5], losses[1], rtol=1e-6, atol=1e-6)
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[5][name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_vocab_slices_are_refused_on_the_dense_path(tmp_path):
    args = config(tmp_path, lm_chunk_size=None, lm_vocab_slices=4)
    with pytest.raises(
        InputError, match=r"^lm_vocab_slices=4 reads .* dense path \(lm_chunk_size=None\): set "
    ):
        DistillationTrainer(
            model=tiny_llama(2), teacher_model=tiny_llama(1), args=args, train_dataset=lm_rows()
        )


# ---- ZeRO-3 heads (hf_distill.sharding.Zero3HeadSlices): which ranks own which flat range of a slice -------------


def test_zero3_owners_are_the_flat_partitions_without_the_padding():
    """Rank r holds flat [r P, (r + 1) P) of the weight; the last partition is padded, a rank of padding only owns
    nothing."""
    assert zero3_owners(96 * 32, 1536, 2) == [(0, 0, 1536), (1, 1536, 3072)]
    assert zero3_owners(23 * 5, 58, 2) == [(0, 0, 58), (1, 58, 115)]  # 115 elements, padded to 116
    assert zero3_owners(5, 2, 4) == [(0, 0, 2), (1, 2, 4), (2, 4, 5)]  # rank 3: padding only
    with pytest.raises(ValueError, match="2 partitions of 57 elements cannot hold 115"):
        zero3_owners(115, 57, 2)


def test_owned_parts_of_a_slice_straddling_a_partition_boundary():
    owners = zero3_owners(23 * 5, 58, 2)  # the boundary falls inside row 11 (flat 55..60)
    assert list(owned_parts(owners, 10 * 5, 14 * 5)) == [(0, 50, 58), (1, 58, 70)]
    assert list(owned_parts(owners, 0, 5 * 5)) == [(0, 0, 25)]
    assert list(owned_parts(owners, 18 * 5, 23 * 5)) == [(1, 90, 115)]


@pytest.mark.parametrize(
    ("rows", "width", "world", "num_slices"), [(23, 5, 2, 5), (96, 32, 2, 3), (7, 3, 4, 7)]
)
def test_owned_parts_tile_each_slice_in_order_within_their_owners(rows, width, world, num_slices):
    numel = rows * width
    partition = -(-numel // world)  # DeepSpeed pads the flat weight to a multiple of the world size
    owners = zero3_owners(numel, partition, world)
    held = {r: (a, b) for r, a, b in owners}
    for v0, v1 in slice_bounds(rows, num_slices):
        parts = list(owned_parts(owners, v0 * width, v1 * width))
        assert [i for _, a, b in parts for i in range(a, b)] == list(range(v0 * width, v1 * width))
        assert all(held[r][0] <= a < b <= held[r][1] for r, a, b in parts)


@pytest.fixture
def one_rank_group(tmp_path):
    """A 1-process gloo group, for the ZeRO-3 form's broadcasts in this process."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_zero3_head_slices_read_the_partition_and_give_the_whole_gradient_to_the_placeholder(one_rank_group):
    """Read from ds_tensor a slice at a time, the loss and gradients equal the plain form's on the whole heads, and
    the head's gradient reaches the placeholder parameter whole (V, D), where ZeRO-3's hook reduce-scatters it; the
    placeholder is put back after the accumulation."""
    x = _inputs()
    param, teacher = (zero3_param(x[name], one_rank_group, 0, 1) for name in ("head", "teacher_head"))
    kwargs = {"kd": "jsd", "labels": x["labels"], "chunk_size": 4, "temperature": 2.0, "num_slices": 5}
    grads, kinds = [], []
    for head, teacher_head in ((param, teacher), (x["head"].clone().requires_grad_(), x["teacher_head"])):
        hidden = x["hidden"].clone().requires_grad_()
        student, side = head_slices(_Holder(head)), {"teacher_head": head_slices(_Holder(teacher_head))}
        out = sliced_lm_losses(hidden, student, teacher_hidden=x["teacher_hidden"], **kwargs, **side)
        out.loss.backward()
        grads.append((out.loss, hidden.grad, head.grad))
        kinds.append(type(student).__name__)
    assert kinds == ["Zero3HeadSlices", "HeadSlices"]
    assert param.shape == (0,) and param.grad.shape == (V, D)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)


class _Holder(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = weight
