"""DistillationTrainer: what is trained, what is frozen, what reaches the teacher, and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, config, random_classification_dataset, tiny_bert, tiny_bert_config
from datasets import Dataset
from transformers import (
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForTokenClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

from hf_distill import DistillationTrainer, build_student, hidden_state_loss, kl_div_loss


def test_student_trains_teacher_stays_frozen(tmp_path, tokenizer):
    teacher = tiny_bert(seed=1, num_layers=4)
    student = build_student(teacher, num_layers=2)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, max_steps=3, optim="adamw_torch"),
        train_dataset=random_classification_dataset(24),
        processing_class=tokenizer,
    )
    trainer.train()
    changed = {
        n: not torch.equal(p.detach(), student_before[n])
        for n, p in student.named_parameters()
        if p.requires_grad
    }
    assert all(changed.values()), [n for n, c in changed.items() if not c]
    for key, value in trainer.teacher.state_dict().items():
        torch.testing.assert_close(value, teacher_before[key], rtol=0, atol=0)
    assert not trainer.teacher.training
    assert all(not p.requires_grad and p.grad is None for p in trainer.teacher.parameters())
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in trainer.teacher.parameters()}
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all("kd_loss" in e and "ce_loss" in e for e in logged)


def _one_update(tmp_path, tokenizer, batch_size, accumulation):
    teacher = tiny_bert(seed=1, num_layers=3)
    student = tiny_bert(seed=2, num_layers=2)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(
            tmp_path,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            optim="sgd",
            learning_rate=0.5,
            lr_scheduler_type="constant",
            temperature=2.0,
            alpha=0.7,
            beta=0.3,
        ),
        train_dataset=random_classification_dataset(8),
        processing_class=tokenizer,
    )
    trainer.train()
    return {n: p.detach().clone() for n, p in student.named_parameters()}


def test_gradient_accumulation_matches_full_batch(tmp_path, tokenizer):
    full = _one_update(tmp_path / "a", tokenizer, batch_size=8, accumulation=1)
    accumulated = _one_update(tmp_path / "b", tokenizer, batch_size=4, accumulation=2)
    initial = {n: p.detach() for n, p in tiny_bert(seed=2, num_layers=2).named_parameters()}
    assert any(not torch.allclose(full[n], initial[n]) for n in full)
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=0, atol=1e-6)


class _Recorder(torch.nn.Module):
    """Wraps nothing: records the keyword arguments of every forward call of a model."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def hook(self, module, args, kwargs):
        self.calls.append({k: v for k, v in kwargs.items() if torch.is_tensor(v)})


def test_teacher_only_columns_reach_the_teacher(tmp_path, tokenizer):
    # A BERT teacher takes token_type_ids; a DistilBERT student does not. remove_unused_columns
    # must keep them for the teacher, and the student must not receive them.
    teacher = tiny_bert(seed=1, num_layers=2)
    student = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=len(VOCAB), dim=32, n_layers=1, n_heads=2, hidden_dim=37, num_labels=3)
    )
    data = random_classification_dataset(8).map(
        lambda r: {"token_type_ids": [1] * len(r["input_ids"]), "extra": 1}
    )
    recorder, student_recorder = _Recorder(), _Recorder()
    teacher.register_forward_pre_hook(recorder.hook, with_kwargs=True)
    # DistilBERT's forward takes **kwargs: a leaked token_type_ids would not even raise, so record it
    student.register_forward_pre_hook(student_recorder.hook, with_kwargs=True)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, max_steps=1, remove_unused_columns=True),
        train_dataset=data,
        processing_class=tokenizer,
    )
    trainer.train()
    assert recorder.calls and "token_type_ids" in recorder.calls[0]
    assert int(recorder.calls[0]["token_type_ids"].max()) == 1
    assert "labels" not in recorder.calls[0]
    assert student_recorder.calls and "token_type_ids" not in student_recorder.calls[0]
    assert "input_ids" in student_recorder.calls[0]


def test_teacher_own_tokenization_is_used(tmp_path, tokenizer):
    teacher = tiny_bert(seed=1, num_layers=2)
    data = random_classification_dataset(8).map(
        lambda r: {
            "teacher_input_ids": r["input_ids"] + [7, 8],
            "teacher_attention_mask": [1] * (len(r["input_ids"]) + 2),
        }
    )
    recorder = _Recorder()
    teacher.register_forward_pre_hook(recorder.hook, with_kwargs=True)
    trainer = DistillationTrainer(
        model=tiny_bert(seed=2, num_layers=1),
        teacher_model=teacher,
        args=config(tmp_path, max_steps=1),
        train_dataset=data,
        processing_class=tokenizer,
    )
    trainer.train()
    seen = recorder.calls[0]  # the one batch: all 8 rows, in the sampler's order
    lengths = [len(r) for r in data["teacher_input_ids"]]
    assert seen["input_ids"].shape[1] == max(lengths)
    real = [
        ids[mask.bool()].tolist() for ids, mask in zip(seen["input_ids"], seen["attention_mask"], strict=True)
    ]
    assert sorted(real) == sorted(data["teacher_input_ids"])  # each row's own teacher ids, ending 7, 8


def test_precomputed_teacher_logits_need_no_teacher(tmp_path, tokenizer):
    teacher = tiny_bert(seed=1, num_layers=2).eval()
    data = random_classification_dataset(16)
    with torch.no_grad():
        logits = [teacher(input_ids=torch.tensor([ids])).logits[0].tolist() for ids in data["input_ids"]]
    data = data.add_column("teacher_logits", logits)
    trainer = DistillationTrainer(
        model=tiny_bert(seed=2, num_layers=1),
        teacher_model=None,
        args=config(tmp_path, max_steps=2),
        train_dataset=data,
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.teacher is None
    assert trainer.state.log_history[0]["kd_loss"] > 0


def test_ensemble_of_identical_teachers_equals_one_teacher(tmp_path, tokenizer):
    data = random_classification_dataset(8)

    def run(teachers, weights):
        student = tiny_bert(seed=3, num_layers=1)
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teachers,
            args=config(tmp_path, max_steps=1, optim="sgd", beta=0.0, alpha=1.0, teacher_weights=weights),
            train_dataset=data,
            processing_class=tokenizer,
        )
        trainer.train()
        return trainer.state.log_history[0]["kd_loss"], student

    one, s1 = run(tiny_bert(seed=1, num_layers=2), None)
    two, s2 = run([tiny_bert(seed=1, num_layers=2), tiny_bert(seed=1, num_layers=2)], [0.3, 0.7])
    assert two == pytest.approx(one, rel=1e-5)
    mixed, _ = run([tiny_bert(seed=1, num_layers=2), tiny_bert(seed=5, num_layers=2)], None)
    assert mixed != pytest.approx(one, rel=1e-3)


def test_kd_uses_the_weighted_mixture(tmp_path, tokenizer):
    t1, t2 = tiny_bert(seed=1, num_layers=2), tiny_bert(seed=5, num_layers=2)
    student = tiny_bert(seed=3, num_layers=1)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=[t1, t2],
        args=config(tmp_path, teacher_weights=[1.0, 3.0], temperature=2.0),
        train_dataset=random_classification_dataset(4),
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([dict(r) for r in random_classification_dataset(4)])
    out = trainer.compute_teacher_outputs(batch)
    with torch.no_grad():
        p = 0.25 * torch.softmax(t1(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits / 2, -1)
        p += 0.75 * torch.softmax(t2(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits / 2, -1)
    torch.testing.assert_close(torch.softmax(out.logits / 2, -1), p)


def test_unlabelled_examples_get_kd_only(tmp_path, tokenizer):
    data = random_classification_dataset(8).map(lambda r: {"labels": -100})
    trainer = DistillationTrainer(
        model=tiny_bert(seed=2, num_layers=1),
        teacher_model=tiny_bert(seed=1, num_layers=2),
        args=config(tmp_path, max_steps=1),
        train_dataset=data,
        processing_class=tokenizer,
    )
    trainer.train()
    entry = trainer.state.log_history[0]
    assert entry["ce_loss"] == 0.0 and entry["kd_loss"] > 0 and torch.isfinite(torch.tensor(entry["loss"]))


def test_evaluation_reports_student_loss_at_t1(tmp_path, tokenizer):
    student = tiny_bert(seed=2, num_layers=1)
    data = random_classification_dataset(8)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=tiny_bert(seed=1, num_layers=2),
        args=config(tmp_path, temperature=5.0, per_device_eval_batch_size=8),
        train_dataset=data,
        eval_dataset=data,
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()
    batch = trainer.data_collator([dict(r) for r in data])
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(logits, batch["labels"]).item()
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)


def test_hidden_state_loss_with_projection_trains_projection(tmp_path, tokenizer):
    teacher = tiny_bert(seed=1, num_layers=4, hidden=48)
    student = tiny_bert(seed=2, num_layers=2, hidden=32)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, max_steps=2, hidden_loss="mse", hidden_loss_weight=1.0),
        train_dataset=random_classification_dataset(16),
        processing_class=tokenizer,
    )
    before = trainer.hidden_projection.weight.detach().clone()
    trainer.train()
    assert not torch.equal(trainer.hidden_projection.weight, before)
    assert trainer.state.log_history[0]["hidden_loss"] > 0


# ---- other heads --------------------------------------------------------------------------


VOCAB_SIZE = len(VOCAB)


def _token_dataset(n=8, seed=0, with_labels=True, num_tags=4, vocab=VOCAB_SIZE):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(4, 10, (1,), generator=g))
        ids = torch.randint(5, vocab, (length,), generator=g).tolist()
        row = {"input_ids": ids, "attention_mask": [1] * length}
        if with_labels:
            row["labels"] = torch.randint(0, num_tags, (length,), generator=g).tolist()
        rows.append(row)
    return Dataset.from_list(rows)


def _gpt2(seed, layers, vocab=VOCAB_SIZE):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(
        GPT2Config(
            n_embd=32, n_layer=layers, n_head=2, vocab_size=vocab, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
        )
    )


def _bert(cls, seed, layers, **kwargs):
    torch.manual_seed(seed)
    return cls(tiny_bert_config(num_layers=layers, **kwargs))


@pytest.mark.parametrize("head", ["token_classification", "question_answering", "masked_lm", "causal_lm"])
def test_each_head_distils(tmp_path, tokenizer, head):
    if head == "token_classification":
        teacher, student = (
            _bert(BertForTokenClassification, 1, 2, num_labels=4),
            _bert(BertForTokenClassification, 2, 1, num_labels=4),
        )
        data = _token_dataset()
    elif head == "question_answering":
        teacher, student = (
            _bert(BertForQuestionAnswering, 1, 2, num_labels=2),
            _bert(BertForQuestionAnswering, 2, 1, num_labels=2),
        )
        data = _token_dataset(with_labels=False).map(lambda r: {"start_positions": 1, "end_positions": 2})
    elif head == "masked_lm":
        teacher, student = _bert(BertForMaskedLM, 1, 2), _bert(BertForMaskedLM, 2, 1)
        data = _token_dataset(with_labels=False).map(
            lambda r: {"labels": [t if i % 3 == 0 else -100 for i, t in enumerate(r["input_ids"])]}
        )
    else:
        teacher, student = _gpt2(1, 2), _gpt2(2, 1)
        data = _token_dataset(with_labels=False).map(lambda r: {"labels": r["input_ids"]})
        tokenizer.padding_side = "right"
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, max_steps=2),
        train_dataset=data,
        processing_class=tokenizer,
    )
    trainer.train()
    entry = trainer.state.log_history[0]
    assert entry["kd_loss"] > 0 and entry["ce_loss"] > 0
    assert any(not torch.equal(p.detach(), before[n]) for n, p in student.named_parameters())


def test_masked_lm_kd_counts_only_masked_positions(tmp_path, tokenizer):
    teacher, student = _bert(BertForMaskedLM, 1, 2), _bert(BertForMaskedLM, 2, 1)
    data = _token_dataset(n=4, with_labels=False).map(
        lambda r: {"labels": [t if i % 3 == 0 else -100 for i, t in enumerate(r["input_ids"])]}
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path),
        train_dataset=data,
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([dict(r) for r in data])
    teacher_out = trainer.compute_teacher_outputs(batch)
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    got = trainer.compute_kd_loss(s_logits, teacher_out, batch)
    mask = batch["labels"] != -100
    expected = kl_div_loss(s_logits[mask], teacher_out.logits[mask], trainer.args.temperature)
    torch.testing.assert_close(got, expected)


def test_causal_lm_kd_is_shifted_and_ignores_padding(tmp_path, tokenizer):
    teacher, student = _gpt2(1, 2), _gpt2(2, 1)
    data = _token_dataset(n=4, with_labels=False)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, beta=0.0, alpha=1.0),
        train_dataset=data,
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([dict(r) for r in data])
    teacher_out = trainer.compute_teacher_outputs(batch)
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    got = trainer.compute_kd_loss(s_logits, teacher_out, batch)
    mask = batch["attention_mask"][:, 1:].bool()
    expected = kl_div_loss(s_logits[:, :-1][mask], teacher_out.logits[:, :-1][mask], trainer.args.temperature)
    torch.testing.assert_close(got, expected)


# ---- bad input ----------------------------------------------------------------------------


def test_mismatched_labels_raise(tmp_path, tokenizer):
    teacher = tiny_bert(seed=1, num_labels=3)
    student = tiny_bert(
        seed=2, num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2}
    )
    with pytest.raises(ValueError, match="Teacher and student labels differ"):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=config(tmp_path),
            train_dataset=random_classification_dataset(),
        )
    with pytest.raises(ValueError, match="Teacher and student labels differ"):
        DistillationTrainer(
            model=tiny_bert(num_labels=2),
            teacher_model=teacher,
            args=config(tmp_path),
            train_dataset=random_classification_dataset(),
        )


def test_mismatched_vocabularies_raise(tmp_path):
    with pytest.raises(ValueError, match="Teacher vocab_size=80 but student vocab_size=64"):
        DistillationTrainer(
            model=_gpt2(2, 1),
            teacher_model=_gpt2(1, 2, vocab=80),
            args=config(tmp_path),
            train_dataset=_token_dataset(),
        )


def test_mismatched_heads_raise(tmp_path):
    with pytest.raises(ValueError, match="both need the same kind of head"):
        DistillationTrainer(
            model=tiny_bert(),
            teacher_model=_bert(BertForMaskedLM, 1, 2),
            args=config(tmp_path),
            train_dataset=random_classification_dataset(),
        )


def test_beta_without_labels_raises_before_training(tmp_path, tokenizer):
    data = random_classification_dataset().remove_columns("labels")
    with pytest.raises(
        ValueError, match="beta=0.5 weights the hard-label loss but the training dataset has no label"
    ):
        DistillationTrainer(
            model=tiny_bert(),
            teacher_model=tiny_bert(seed=1),
            args=config(tmp_path),
            train_dataset=data,
            processing_class=tokenizer,
        )
    # With beta=0 the same data trains on soft labels alone.
    DistillationTrainer(
        model=tiny_bert(),
        teacher_model=tiny_bert(seed=1),
        args=config(tmp_path, beta=0.0, alpha=1.0, max_steps=1),
        train_dataset=data,
        processing_class=tokenizer,
    ).train()


def test_no_teacher_and_no_cached_logits_raises(tmp_path):
    with pytest.raises(ValueError, match="No teacher: pass teacher_model"):
        DistillationTrainer(
            model=tiny_bert(), args=config(tmp_path), train_dataset=random_classification_dataset()
        )


def test_wrong_args_type_raises(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="args must be a DistillationConfig"):
        DistillationTrainer(
            model=tiny_bert(), teacher_model=tiny_bert(), args=TrainingArguments(output_dir=str(tmp_path))
        )


def test_cached_logits_of_wrong_width_raise(tmp_path, tokenizer):
    data = random_classification_dataset(8).map(lambda r: {"teacher_logits": [0.0] * 5})
    trainer = DistillationTrainer(
        model=tiny_bert(), args=config(tmp_path, max_steps=1), train_dataset=data, processing_class=tokenizer
    )
    with pytest.raises(ValueError, match="Teacher logits have 5 classes but the student has 3"):
        trainer.train()


def test_subclass_can_replace_how_losses_combine(tmp_path, tokenizer):
    class AnnealedKDTrainer(DistillationTrainer):  # the README's example
        def combine_losses(self, components):
            progress = self.state.global_step / max(self.state.max_steps, 1)
            return (1 - progress) * components["kd"] + progress * components.get("ce", 0.0)

    trainer = AnnealedKDTrainer(
        model=tiny_bert(seed=2, num_layers=1),
        teacher_model=tiny_bert(seed=1, num_layers=2),
        args=config(tmp_path, max_steps=2, per_device_train_batch_size=4),
        train_dataset=random_classification_dataset(8),
        processing_class=tokenizer,
    )
    trainer.train()
    first, second = [e for e in trainer.state.log_history if "loss" in e][:2]
    assert first["loss"] == pytest.approx(first["kd_loss"], rel=1e-5)  # step 0: teacher only
    assert second["loss"] == pytest.approx(0.5 * second["kd_loss"] + 0.5 * second["ce_loss"], rel=1e-5)


def test_peft_student_trains_its_adapters(tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model

    student = get_peft_model(
        tiny_bert(seed=2, num_layers=2),
        LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]),
    )
    trainable = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    trainer = DistillationTrainer(
        model=student,
        teacher_model=tiny_bert(seed=1, num_layers=2),
        args=config(tmp_path, max_steps=2, optim="adamw_torch"),
        train_dataset=random_classification_dataset(16),
        processing_class=tokenizer,
    )
    trainer.train()
    params = dict(student.named_parameters())
    assert any("lora_" in n for n in trainable)
    assert all(not torch.equal(params[n].detach(), v) for n, v in trainable.items() if "lora_B" in n)
    assert all(torch.equal(params[n].detach(), v) for n, v in frozen.items())


@pytest.mark.parametrize(
    ("kwargs", "dtype"),
    [
        ({"bf16": True}, torch.bfloat16),
        ({"bf16": True, "teacher_dtype": "float32"}, torch.float32),
        ({}, torch.float32),
    ],
)
def test_teacher_is_held_in_the_mixed_precision_dtype(tmp_path, tokenizer, kwargs, dtype):
    trainer = DistillationTrainer(
        model=tiny_bert(seed=2, num_layers=1),
        teacher_model=tiny_bert(seed=1),
        args=config(tmp_path, max_steps=2, **kwargs),
        train_dataset=random_classification_dataset(16),
        processing_class=tokenizer,
    )
    assert {p.dtype for p in trainer.teacher.parameters()} == {dtype}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # the student keeps its own
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(e["kd_loss"])) for e in logged)


def test_hidden_loss_matches_each_student_layer_with_the_layer_it_was_copied_from(tmp_path):
    teacher = tiny_bert(seed=1, num_layers=6)
    student = build_student(teacher, num_layers=3)  # teacher layers 0, 2, 5 (0-based)
    args = config(tmp_path, hidden_loss="cosine", hidden_loss_weight=1.0)
    data = random_classification_dataset(8)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    assert trainer.layer_map(3, 6) == [1, 3, 6]  # hidden_states[0] are the embeddings
    # the untrained student's first layer is the teacher's first: the same activations under the map
    inputs = {k: torch.tensor([data[0][k]]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        s_hidden = student.eval()(**inputs, output_hidden_states=True).hidden_states
        t_hidden = trainer.compute_teacher_outputs(inputs, hidden_states=True).hidden_states
    first = hidden_state_loss("cosine", s_hidden[1], t_hidden[trainer.layer_map(3, 6)[0]])
    assert first.item() == pytest.approx(0.0, abs=1e-6)  # float32 rounding alone gives up to ~1e-7
    assert hidden_state_loss("cosine", s_hidden[1], t_hidden[2]).item() > 1e-6  # the evenly spaced match
    other = config(tmp_path, hidden_loss="cosine", hidden_loss_weight=1.0, layer_map=[2, 4, 6])
    assert DistillationTrainer(
        model=student, teacher_model=teacher, args=other, train_dataset=data
    ).layer_map(3, 6) == [2, 4, 6]
    fresh = tiny_bert(seed=2, num_layers=3)  # not built from the teacher: evenly spaced
    assert DistillationTrainer(model=fresh, teacher_model=teacher, args=args, train_dataset=data).layer_map(
        3, 6
    ) == [2, 4, 6]
