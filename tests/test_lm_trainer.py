"""The trainer's causal-LM route: the fused chunked loss equals the dense losses, for every teacher source."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import config
from datasets import Dataset
from lm_fixtures import VOCAB, tiny_llama

from hf_distill import (
    DistillationDataCollator,
    DistillationTrainer,
    precompute_teacher_logits,
    read_provenance,
)
from hf_distill import trainer as trainer_module


def lm_rows(n: int = 8, length: int = 12, seed: int = 3) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    labels = ids.clone()
    labels[0, -3:] = -100  # a few unlabelled tokens
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * length] * n, "labels": labels.tolist()}
    )


def batch_of(rows: Dataset, trainer: DistillationTrainer) -> dict:
    return trainer.data_collator([dict(r) for r in rows])


def cache_losses(student, tmp_path, chunk: int | None, *caches: Dataset) -> list[torch.Tensor]:
    """The trainer's loss on each cache's whole batch (T = 1.5, alpha 1, beta 0.5), fused in chunks of ``chunk``
    positions or, with ``None``, unfused."""
    args = config(tmp_path, temperature=1.5, alpha=1.0, beta=0.5, lm_chunk_size=chunk)
    losses = []
    for cached in caches:
        trainer = DistillationTrainer(model=student, args=args, train_dataset=cached)
        losses.append(trainer.compute_loss(student, batch_of(cached, trainer)))
    return losses


def dense_reference(student, batch, teacher_term) -> tuple[torch.Tensor, torch.Tensor]:
    """(kd, ce) from the student's full logits: ``teacher_term(log_p_s at T, positions)`` and shifted CE."""
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    z = logits[:, :-1]
    labels = batch["labels"][:, 1:]
    counted = labels != -100
    ce = F.cross_entropy(z[counted], labels[counted])
    return teacher_term(z, counted), ce


@pytest.mark.parametrize("kd_loss", ["kl", "reverse_kl", "jsd"])
def test_fused_live_teacher_equals_dense_loss_and_gradients(tmp_path, kd_loss):
    teacher, rows = tiny_llama(1, layers=3), lm_rows()
    losses = {}
    grads = {}
    for chunk in (None, 5):
        student = tiny_llama(2)
        args = config(tmp_path, temperature=2.0, alpha=0.7, beta=0.3, kd_loss=kd_loss, lm_chunk_size=chunk)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows)
        batch = batch_of(rows, trainer)
        assert (trainer.loss_path.name == "fused") == (chunk is not None)
        student.train()
        loss = trainer.compute_loss(student, batch)
        loss.backward()
        losses[chunk] = loss.detach()
        grads[chunk] = {n: p.grad.clone() for n, p in student.named_parameters()}
    torch.testing.assert_close(losses[5], losses[None], rtol=1e-5, atol=1e-6)
    for name, grad in grads[None].items():
        torch.testing.assert_close(grads[5][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "length", [12, 40]
)  # 40: longer than the hidden size (32), so L and D cannot be mixed up
def test_fused_live_kl_matches_an_independent_computation(tmp_path, monkeypatch, length):
    teacher, student, rows = tiny_llama(1, layers=3), tiny_llama(2), lm_rows(length=length)
    T = 2.0
    args = config(tmp_path, temperature=T, alpha=0.6, beta=0.4, lm_chunk_size=7)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows)
    batch = batch_of(rows, trainer)
    student.train()
    seen = []  # the user's lm_chunk_size reaches the chunked loss (the values do not depend on it)
    chunked = trainer_module.chunked_lm_losses
    monkeypatch.setattr(
        trainer_module,
        "chunked_lm_losses",
        lambda *a, **kw: seen.append(kw["chunk_size"]) or chunked(*a, **kw),
    )
    loss = trainer.compute_loss(student, batch)
    assert seen == [7]
    with torch.no_grad():
        t_logits = teacher.eval()(input_ids=batch["input_ids"]).logits[:, :-1]

    def kl(z, counted):
        log_p_t = F.log_softmax(t_logits[counted] / T, -1)
        log_p_s = F.log_softmax(z[counted] / T, -1)
        return T**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()

    kd, ce = dense_reference(student, batch, kl)
    torch.testing.assert_close(loss, 0.6 * kd + 0.4 * ce, rtol=1e-5, atol=1e-6)


def test_fused_sampled_cache_matches_an_independent_computation(tmp_path):
    teacher, student, rows = tiny_llama(1, layers=3), tiny_llama(2), lm_rows()
    T = 1.5
    cached = precompute_teacher_logits(
        teacher, rows, cache_dir=tmp_path / "cache", num_samples=6, sample_temperature=T, sample_seed=4
    )
    provenance = read_provenance(cached)
    assert provenance["sampling"] == {"num_samples": 6, "temperature": T, "seed": 4}
    # uint16 ids + uint8 counts per draw, plus each row's 4-byte list offset in each of the 2 columns
    assert provenance["bytes_per_token"] == pytest.approx(6 * 3 + 2 * 4 / 12)
    args = config(tmp_path, temperature=T, alpha=1.0, beta=0.0, lm_chunk_size=5)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=cached)
    batch = batch_of(cached, trainer)
    assert batch["teacher_sample_counts"].sum(-1).eq(6).all()
    student.train()
    loss = trainer.compute_loss(student, batch)

    def sampled(z, counted):
        ids, counts = (
            batch["teacher_sample_ids"][:, :-1][counted],
            batch["teacher_sample_counts"][:, :-1][counted],
        )
        log_p_s = F.log_softmax(z[counted] / T, -1)
        return T**2 * -(counts / 6 * log_p_s.gather(-1, ids)).sum(-1).mean()

    # with beta = 0 every real token counts (the TaskSpec.kd_mask fallback for rows with labels is the labels)
    kd, _ = dense_reference(student, batch, sampled)
    torch.testing.assert_close(loss, kd, rtol=1e-5, atol=1e-6)


def test_fused_head_and_tail_cache_matches_an_independent_computation(tmp_path):
    teacher, student, rows = tiny_llama(1, layers=3), tiny_llama(2), lm_rows()
    T, h, n = 1.5, 2, 10
    cached = precompute_teacher_logits(
        teacher, rows, cache_dir=tmp_path / "cache", num_samples=n, sample_head=h, sample_temperature=T
    )
    provenance = read_provenance(cached)
    assert provenance["sampling"] == {"num_samples": n, "temperature": T, "seed": 0, "head": h}
    # per head token uint16 id + float16 probability, per draw uint16 id + uint8 count: 38 B, plus
    # each row's 4-byte list offset in each of the 4 columns
    assert provenance["bytes_per_token"] == pytest.approx(h * 4 + n * 3 + 4 * 4 / 12)
    with torch.no_grad():
        p_t = F.softmax(teacher.eval()(input_ids=torch.tensor(rows["input_ids"])).logits / T, -1)
    head_probs = torch.tensor(cached["teacher_head_probs"])
    torch.testing.assert_close(head_probs, p_t.topk(h).values.half().float())  # exact, to float16
    args = config(tmp_path, temperature=T, alpha=1.0, beta=0.0, lm_chunk_size=5)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=cached)
    batch = batch_of(cached, trainer)
    student.train()
    loss = trainer.compute_loss(student, batch)

    def head_and_tail(z, counted):
        head_ids, probs = (
            batch["teacher_head_ids"][:, :-1][counted],
            batch["teacher_head_probs"][:, :-1][counted],
        )
        ids, counts = (
            batch["teacher_sample_ids"][:, :-1][counted],
            batch["teacher_sample_counts"][:, :-1][counted],
        )
        log_p_s = F.log_softmax(z[counted] / T, -1)
        tail = (1 - probs.sum(-1, keepdim=True)) * counts / n
        return (
            T**2
            * -(
                (probs * log_p_s.gather(-1, head_ids)).sum(-1) + (tail * log_p_s.gather(-1, ids)).sum(-1)
            ).mean()
        )

    kd, _ = dense_reference(student, batch, head_and_tail)
    torch.testing.assert_close(loss, kd, rtol=1e-5, atol=1e-6)
    # the unfused route (sampled_kd_loss on the full logits) reads the same target
    args = config(tmp_path, temperature=T, alpha=1.0, beta=0.0, lm_chunk_size=None)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=cached)
    torch.testing.assert_close(
        trainer.compute_loss(student, batch_of(cached, trainer)), kd, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("head", [0, 2])
def test_tempered_proposal_cache_trains_on_its_importance_weights(tmp_path, head):
    teacher, student, rows = tiny_llama(1, layers=3), tiny_llama(2), lm_rows()
    n = 8
    cached = precompute_teacher_logits(
        teacher,
        rows,
        cache_dir=tmp_path / "cache",
        num_samples=n,
        sample_head=head,
        sample_proposal_temperature=2.0,
    )
    provenance = read_provenance(cached)
    assert provenance["sampling"]["proposal_temperature"] == 2.0
    assert (
        "teacher_sample_weights" in cached.column_names and "teacher_sample_counts" not in cached.column_names
    )
    # per draw a uint16 id + a float16 weight, per head token a uint16 id + a float16 probability
    assert provenance["bytes_per_token"] == pytest.approx(head * 4 + n * 4 + (4 if head else 2) * 4 / 12)
    args = config(tmp_path, temperature=1.0, alpha=1.0, beta=0.0, lm_chunk_size=5)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=cached)
    batch = batch_of(cached, trainer)
    assert batch["teacher_sample_weights"].dtype == torch.float32
    student.train()
    loss = trainer.compute_loss(student, batch)

    def weighted(z, counted):
        ids, weights = (
            batch["teacher_sample_ids"][:, :-1][counted],
            batch["teacher_sample_weights"][:, :-1][counted],
        )
        if head:
            probs = batch["teacher_head_probs"][:, :-1][counted]
            ids = torch.cat([batch["teacher_head_ids"][:, :-1][counted], ids], -1)
            weights = torch.cat(
                [probs, (1 - probs.sum(-1, keepdim=True)) * weights / weights.sum(-1, keepdim=True)], -1
            )
        weights = weights / weights.sum(-1, keepdim=True)
        return -(weights * F.log_softmax(z[counted], -1).gather(-1, ids)).sum(-1).mean()

    kd, _ = dense_reference(student, batch, weighted)
    torch.testing.assert_close(loss, kd, rtol=1e-5, atol=1e-6)


def test_sampled_cache_is_the_same_whatever_the_batching(tmp_path):
    teacher, rows = tiny_llama(1), lm_rows()
    a = precompute_teacher_logits(teacher, rows, num_samples=8, sample_seed=1, max_batch_size=1)
    b = precompute_teacher_logits(
        teacher, rows, num_samples=8, sample_seed=1, max_batch_size=8, sort_window=3
    )
    c = precompute_teacher_logits(teacher, rows, num_samples=8, sample_seed=2)
    assert a["teacher_sample_ids"] == b["teacher_sample_ids"]
    assert a["teacher_sample_counts"] == b["teacher_sample_counts"]
    assert a["teacher_sample_ids"] != c["teacher_sample_ids"]  # the seed matters


def test_fused_topk_cache_equals_the_dense_topk_route(tmp_path):
    teacher, rows = tiny_llama(1, layers=3), lm_rows()
    cached = precompute_teacher_logits(teacher, rows, cache_dir=tmp_path / "cache", top_k=9, dtype="float32")
    assert cached.features["teacher_topk_indices"].feature.feature.dtype == "uint16"
    losses = {}
    for chunk in (None, 4):
        student = tiny_llama(2)
        args = config(tmp_path, temperature=2.0, alpha=0.5, beta=0.5, lm_chunk_size=chunk)
        trainer = DistillationTrainer(model=student, args=args, train_dataset=cached)
        student.train()
        losses[chunk] = trainer.compute_loss(student, batch_of(cached, trainer))
    torch.testing.assert_close(losses[4], losses[None], rtol=1e-5, atol=1e-6)


def test_fused_training_moves_every_student_parameter(tmp_path):
    teacher, student, rows = tiny_llama(1), tiny_llama(2), lm_rows()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    args = config(tmp_path, per_device_train_batch_size=4, lm_chunk_size=8)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "kd_loss" in e]
    assert len(logged) == 2 and all(e["kd_loss"] > 0 and e["ce_loss"] > 0 for e in logged)
    assert all(not torch.equal(p.detach(), before[n]) for n, p in student.named_parameters())


# ---- gaps found by mutation testing (benchmarks/mutation_results.md, issue 21) --------------------------------


def test_fused_hard_labels_only_run_no_teacher_and_log_no_kd(tmp_path):
    """alpha = 0: the fused path does not run the teacher, and its only term is the shifted CE."""
    teacher, student, rows = tiny_llama(1, layers=3), tiny_llama(2), lm_rows()
    calls = []
    teacher.register_forward_pre_hook(lambda module, inputs: calls.append(1))
    args = config(tmp_path, alpha=0.0, beta=1.0, lm_chunk_size=5)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows)
    assert trainer.loss_path.name == "fused"
    batch = batch_of(rows, trainer)
    student.train()
    loss, _, components = trainer.compute_fused_lm_loss(student, batch)
    assert not calls
    _, ce = dense_reference(student, batch, lambda z, counted: None)
    torch.testing.assert_close(loss, ce, rtol=1e-5, atol=1e-6)
    assert set(components) == {"ce"}


def test_fused_soft_labels_only_read_no_labels_and_count_every_position_without_a_mask(tmp_path):
    """beta = 0 and a batch with neither labels nor attention mask: every aligned position counts, as on the
    dense path, and only the KD term is logged."""
    teacher, rows = tiny_llama(1, layers=3), lm_rows()
    results = {}
    for chunk in (None, 5):
        student = tiny_llama(2)
        args = config(tmp_path, temperature=2.0, alpha=1.0, beta=0.0, lm_chunk_size=chunk)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows)
        batch = {"input_ids": batch_of(rows, trainer)["input_ids"]}
        student.train()
        if chunk is None:
            results[chunk] = trainer.compute_dense_loss(student, batch)
        else:
            results[chunk] = trainer.compute_fused_lm_loss(student, batch)
    (dense, _, dense_parts), (fused, _, fused_parts) = results[None], results[5]
    torch.testing.assert_close(fused, dense, rtol=1e-5, atol=1e-6)
    assert set(fused_parts) == set(dense_parts) == {"kd"}


@pytest.mark.parametrize("head", [0, 2])
def test_draws_stored_without_counts_train_on_the_counted_caches_target(tmp_path, head):
    """A cache of the draws themselves (``sample_counts=False``) and the counted cache of the same seed give the
    same loss, fused and unfused: each stored draw weighs ``1/n``, as ``c_j / n`` does for its distinct id."""
    teacher, student, rows = tiny_llama(1, layers=3), tiny_llama(2), lm_rows()
    spec = {"num_samples": 7, "sample_head": head, "sample_temperature": 1.5}
    counted = precompute_teacher_logits(teacher, rows, cache_dir=tmp_path / "counted", **spec)
    draws = precompute_teacher_logits(
        teacher, rows, cache_dir=tmp_path / "draws", sample_counts=False, **spec
    )
    assert "teacher_sample_counts" not in draws.column_names
    student.train()
    for chunk in (5, None):
        losses = cache_losses(student, tmp_path, chunk, counted, draws)
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7)


def test_a_head_stored_in_8_bits_trains_on_its_rounded_probabilities(tmp_path):
    """``sample_head_quantized``: the trainer reads ``teacher_head_quanta`` as ``k / 255`` and the loss is the one
    of the float cache of the same seed with its head probabilities replaced by those rounded values (fused and
    unfused), the same draws and head ids."""
    from hf_distill.teacher_outputs import sampled_target
    from hf_distill.vocab_losses import dequantize_probs

    teacher, student, rows = tiny_llama(1, layers=3), tiny_llama(2), lm_rows()
    spec = {"num_samples": 7, "sample_head": 2, "sample_temperature": 1.5, "sample_counts": False}
    exact = precompute_teacher_logits(teacher, rows, cache_dir=tmp_path / "exact", **spec)
    quantized = precompute_teacher_logits(
        teacher, rows, cache_dir=tmp_path / "q8", sample_head_quantized=True, **spec
    )
    assert "teacher_head_probs" not in quantized.column_names
    assert quantized["teacher_head_ids"] == exact["teacher_head_ids"]
    assert quantized["teacher_sample_ids"] == exact["teacher_sample_ids"]
    k = torch.tensor(quantized["teacher_head_quanta"][0]).float()
    p = torch.tensor(exact["teacher_head_probs"][0]).float()
    assert ((k - 255 * p).abs() < 1 + 1e-3).all() and not torch.equal(k, (255 * p).round())  # rounded up or down
    rounded = exact.remove_columns("teacher_head_probs").add_column(
        "teacher_head_probs", [dequantize_probs(torch.tensor(q)).tolist() for q in quantized["teacher_head_quanta"]]
    )
    student.train()
    for chunk in (5, None):
        losses = cache_losses(student, tmp_path, chunk, quantized, rounded)
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-7)
    ids, weights = sampled_target(DistillationDataCollator()([dict(r) for r in quantized]))
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))


@pytest.mark.parametrize("head", [0, 2])
def test_adaptive_draws_train_on_each_tokens_own_draws(tmp_path, head):
    """``sample_allocation="adaptive"``: the trainer regroups a row's pooled draws by its per-token counts, and the
    loss (fused and unfused) is the one of a counted cache holding, for each token, its own draws with count 1
    (the same head): ``m_t / n_t`` on each. Read without the regrouping (an older reader's view) the targets
    differ, and the test sees it."""
    from hf_distill.draw_code import decode_row
    from hf_distill.teacher_outputs import sampled_target
    from hf_distill.vocab_losses import normalised, regroup_draws

    teacher, student, rows = tiny_llama(1, layers=3), tiny_llama(2), lm_rows()
    with torch.no_grad():  # sharper logits: tokens whose tails differ, so their shares differ
        teacher.get_output_embeddings().weight.mul_(4.0)
    spec = {"num_samples": 4, "sample_head": head, "sample_temperature": 1.5, "sample_counts": False}
    pooled = precompute_teacher_logits(teacher, rows, cache_dir=tmp_path / "adaptive", sample_allocation="adaptive",
                                       **spec)  # fmt: skip
    width = max(x for row in pooled["teacher_sample_lengths"] for [x] in row)
    assert width > 4  # the draws are not shared evenly
    decoded = [decode_row(np.array(code, dtype=np.uint8), np.array(lengths))
               for code, lengths in zip(pooled["teacher_sample_code"], pooled["teacher_sample_lengths"], strict=True)]  # fmt: skip
    assert all((h is None) == (head == 0) for h, _ in decoded)  # the code holds the head's ids (format 8)
    draws = [torch.from_numpy(ids).reshape(-1, 4) for _, ids in decoded]
    regrouped = [regroup_draws(ids, torch.tensor(lengths), width)
                 for ids, lengths in zip(draws, pooled["teacher_sample_lengths"], strict=True)]  # fmt: skip
    own = pooled.remove_columns(["teacher_sample_code", "teacher_sample_lengths"])
    if head:
        own = own.add_column("teacher_head_ids", [h.tolist() for h, _ in decoded])
    misread = own.add_column("teacher_sample_ids", [ids.tolist() for ids in draws])  # the pooled draws, ungrouped
    own = own.add_column("teacher_sample_ids", [ids.tolist() for ids, _ in regrouped])
    own = own.add_column("teacher_sample_counts", [counts.tolist() for _, counts in regrouped])
    student.train()
    for chunk in (5, None):
        losses = cache_losses(student, tmp_path, chunk, pooled, own)
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-7)
    targets = []
    for cached in (pooled, own, misread):
        ids, weights = sampled_target(DistillationDataCollator()([dict(r) for r in cached]))
        targets.append(torch.zeros(*ids.shape[:-1], VOCAB).scatter_add_(-1, ids, normalised(weights)))
    torch.testing.assert_close(targets[0], targets[1])
    assert (targets[2] - targets[0]).abs().amax() > 0.01  # each token given its neighbours' draws
    # a collator that would not regroup them (the Trainer's default_data_collator) is refused in one line
    from transformers import default_data_collator

    from hf_distill.errors import InputError

    with pytest.raises(InputError, match=r"^The training dataset holds an adaptive RS-KD cache \(teacher_sample_code, "
                                         r"teacher_sample_lengths: .* but data_collator is default_data_collator: pass Distil"):
        DistillationTrainer(model=student, args=config(tmp_path, temperature=1.5), train_dataset=pooled,
                            data_collator=default_data_collator)  # fmt: skip
    DistillationTrainer(model=student, args=config(tmp_path, temperature=1.5), train_dataset=pooled,
                        data_collator=DistillationDataCollator())  # fmt: skip
