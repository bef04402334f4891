"""Instruction data in DistillationTrainer: completion tokens only, per-token normalisation across gradient
accumulation, and on-policy (student) and sequence-level (teacher) rollouts."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import config
from datasets import Dataset
from instruct_fixtures import WORDS, chat_tokenizer, tiny_llama

from hf_distill import DistillationTrainer, tokenize_instruction_dataset
from hf_distill.errors import InputError
from hf_distill.losses import generalized_jsd_loss, kl_div_loss
from hf_distill.rollouts import (
    DATASET,
    STUDENT,
    TEACHER,
    completion_batch,
    rollout_source,
)


def instruction_rows(n: int = 8, seed: int = 0) -> Dataset:
    """Prompts and completions of different lengths (1 to 8 completion words)."""
    g = torch.Generator().manual_seed(seed)

    def words(k):
        return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=g).tolist())

    rows = [{"prompt": words(2 + i % 3), "completion": words(1 + (5 * i) % 8)} for i in range(n)]
    tokenized, _ = tokenize_instruction_dataset(
        Dataset.from_list(rows), chat_tokenizer(), 16, 16, chat_template_for_text=True
    )
    return tokenized


def _trainer(tmp_path, data, teacher=None, **kwargs):
    tokenizer = chat_tokenizer()
    args = config(tmp_path, **({"temperature": 2.0, "alpha": 0.6, "beta": 0.4} | kwargs))
    return DistillationTrainer(
        model=tiny_llama(1),
        teacher_model=teacher if teacher is not None else tiny_llama(2),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
    )


def _step_update(tmp_path, batch_size, accumulation, **kwargs) -> dict[str, torch.Tensor]:
    """Parameter change of one SGD step at learning rate 1 (minus the gradient), no clipping."""
    trainer = _trainer(
        tmp_path,
        instruction_rows(),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        **kwargs,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    return {n: p.detach() - before[n] for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("chunk", [4, None], ids=["fused", "dense"])
def test_accumulated_micro_batches_give_the_gradient_of_one_batch(tmp_path, chunk):
    """4 micro-batches of 2 rows, completions of different lengths = one batch of the same 8 rows, to 1e-6."""
    one = _step_update(tmp_path / "one", 8, 1, lm_chunk_size=chunk)
    four = _step_update(tmp_path / "four", 2, 4, lm_chunk_size=chunk)
    assert any(u.abs().max() > 1e-4 for u in one.values())
    for name, update in one.items():
        torch.testing.assert_close(four[name], update, atol=1e-6, rtol=1e-5, msg=name)


def test_a_mean_per_micro_batch_would_not_match(tmp_path):
    """The test above can fail: the Trainer's default (each micro-batch's mean, divided by the number of
    micro-batches) weights a token of a short completion more, and gives another gradient."""
    data = instruction_rows()
    trainer = _trainer(tmp_path, data)
    batches = [trainer.data_collator([data[i] for i in range(j, j + 2)]) for j in range(0, 8, 2)]
    full = trainer.data_collator([data[i] for i in range(8)])
    trainer.model.train()
    per_batch_means = sum(trainer.compute_loss(trainer.model, b) for b in batches) / 4
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    token_sums = sum(trainer.compute_loss(trainer.model, b, num_items_in_batch=tokens) for b in batches)
    whole = trainer.compute_loss(trainer.model, full)
    torch.testing.assert_close(token_sums, whole, atol=1e-6, rtol=1e-6)
    assert (per_batch_means - whole).abs() > 1e-4


@pytest.mark.parametrize(
    ("kd_loss", "mixture"), [("kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("reverse_kl", 0.5)]
)
@pytest.mark.parametrize("chunk", [4, None], ids=["fused", "dense"])
def test_prompt_tokens_contribute_nothing(tmp_path, chunk, kd_loss, mixture):
    data = instruction_rows()
    trainer = _trainer(tmp_path, data, lm_chunk_size=chunk, kd_loss=kd_loss, jsd_mixture=mixture)
    batch = trainer.data_collator([data[i] for i in range(8)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)

    # By hand: KD and CE over the positions that predict a completion token, and nothing else.
    with torch.no_grad():
        student = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        teacher = trainer.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    s, t, targets = student[:, :-1], teacher[:, :-1], batch["labels"][:, 1:]
    completion = targets != -100
    kd = generalized_jsd_loss(
        s[completion], t[completion], 2.0, {"kl": 0.0, "reverse_kl": 1.0}.get(kd_loss, mixture)
    )
    ce = F.cross_entropy(s[completion], targets[completion])
    torch.testing.assert_close(loss.detach(), 0.6 * kd + 0.4 * ce, atol=1e-5, rtol=1e-5)

    real = batch["attention_mask"][:, 1:].bool()
    assert (real & ~completion).any()  # prompt tokens are there, and counting them would change the value
    assert (kl_div_loss(s[real], t[real], 2.0) - kl_div_loss(s[completion], t[completion], 2.0)).abs() > 1e-4


def test_rollout_source_follows_lmbda_and_is_the_same_for_every_process():
    draws = [rollout_source(0.3, False, seed=7, step=s) for s in range(2000)]
    assert draws == [rollout_source(0.3, False, seed=7, step=s) for s in range(2000)]
    assert set(draws) == {STUDENT, DATASET}
    assert abs(draws.count(STUDENT) / 2000 - 0.3) < 0.04
    assert {rollout_source(0.0, True, 7, s) for s in range(50)} == {TEACHER}
    assert {rollout_source(1.0, True, 7, s) for s in range(50)} == {STUDENT}


def test_completion_batch_packs_prompt_then_completion_right_padded():
    prompt = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    completion = torch.tensor([[11, 1, 0], [12, 13, 14]])
    completion_mask = torch.tensor([[True, True, False], [True, True, True]])
    batch = completion_batch(prompt, prompt_mask, completion, completion_mask, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 11, 1, 0, 0, 0], [7, 8, 9, 10, 12, 13, 14]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    assert batch["labels"].tolist() == [[-100, -100, 11, 1, -100, -100, -100], [-100] * 4 + [12, 13, 14]]


class CountingGenerator:
    """Wraps the trainer's generator: which model generated, and what."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def generate(self, model, prompt_input_ids, prompt_attention_mask, **kwargs):
        out = self.inner.generate(model, prompt_input_ids, prompt_attention_mask, **kwargs)
        self.calls.append((model, out, kwargs))
        return out


@pytest.mark.parametrize(("lmbda", "seq_kd", "writer"), [(1.0, False, STUDENT), (0.0, True, TEACHER)])
def test_rollouts_are_written_by_the_drawn_model_scored_and_logged(tmp_path, lmbda, seq_kd, writer):
    trainer = _trainer(
        tmp_path,
        instruction_rows(),
        lmbda=lmbda,
        seq_kd=seq_kd,
        rollout_max_new_tokens=5,
        per_device_train_batch_size=4,
        max_steps=2,
        rollout_samples=3,
    )
    counting = CountingGenerator(trainer.rollouts.generator)
    trainer.rollouts.generator = counting
    trainer.train()
    expected = trainer.model if writer == STUDENT else trainer.teacher
    assert len(counting.calls) == 2 and all(model is expected for model, _, _ in counting.calls)
    assert all(kw["max_new_tokens"] == 5 and kw["temperature"] == 0.9 for _, _, kw in counting.calls)
    counts = trainer.rollouts.counts
    assert counts[f"{writer}_completions"] == 8
    assert counts["truncated_completions"] == sum(out.num_truncated for _, out, _ in counting.calls)
    samples = [json.loads(line) for line in (tmp_path / "out" / "rollouts.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and {s["written_by"] for s in samples} == {writer}
    assert samples[0]["step"] == 0 and samples[0]["prompt"].endswith("<assistant>")


def test_the_loss_of_a_rollout_scores_the_generated_tokens(tmp_path):
    """After the student writes, the batch trained on is the prompt followed by the student's own tokens."""
    data = instruction_rows()
    trainer = _trainer(tmp_path, data, lmbda=1.0, rollout_max_new_tokens=4, per_device_train_batch_size=4)
    counting = CountingGenerator(trainer.rollouts.generator)
    trainer.rollouts.generator = counting
    batches, tokens = trainer.get_batch_samples(
        iter([trainer.data_collator([data[i] for i in range(4)])]), 1, "cpu"
    )
    (_, out, _), batch = counting.calls[0], batches[0]
    for row in range(4):
        written = out.completion_ids[row][out.completion_mask[row]].tolist()
        assert batch["labels"][row][batch["labels"][row] != -100].tolist() == written
    assert int(tokens) == int((batch["labels"][:, 1:] != -100).sum())


def test_settings_that_cannot_work_are_refused_at_construction(tmp_path):
    plain = Dataset.from_dict(
        {"input_ids": [[3, 9, 10]], "attention_mask": [[1, 1, 1]], "labels": [[3, 9, 10]]}
    )
    with pytest.raises(InputError, match="tokenize it with hf_distill.tokenize_instruction_dataset"):
        _trainer(tmp_path, plain, lmbda=0.5)
    data = instruction_rows(2)
    with pytest.raises(InputError, match="seq_kd=True samples the teacher's completions"):
        DistillationTrainer(
            model=tiny_llama(1),
            args=config(tmp_path, seq_kd=True, alpha=0.0, beta=1.0),
            train_dataset=data,
            processing_class=chat_tokenizer(),
        )
    with pytest.raises(ValueError, match="lmbda must be in"):
        config(tmp_path, lmbda=1.5)
    with pytest.raises(ValueError, match="jsd_mixture must be in"):
        config(tmp_path, jsd_mixture=-0.1)
