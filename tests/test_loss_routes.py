"""Every loss path the trainer routes to, checked by value against a computation written here.

One table of the five heads (``HEADS``). Each test builds a tiny teacher and student, collates a batch
with padding (and, for token-level heads, one row without any label), calls the trainer's
``compute_loss`` and compares it with the same quantity computed in this file from the models' own
outputs in float64: which positions count, the causal shift, question answering's per-row softmax
over real tokens and its start/end mean, the top-k renormalisation, the hidden-state projection and
layer map, the attention maps' layer indexing, and the weights that combine the terms. No
``trainer.train()`` here except where a whole optimizer step is the point.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import VOCAB, config, tiny_bert_config
from datasets import Dataset
from transformers import (
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    GPT2Config,
    GPT2LMHeadModel,
    TrainerCallback,
)

from hf_distill import DistillationTrainer
from hf_distill.collator import DistillationDataCollator, teacher_sources
from hf_distill.errors import InputError
from hf_distill.tasks import TASK_SPECS
from hf_distill.teacher_cache import precompute_teacher_logits
from hf_distill.trainer import TeacherOutput

V = len(VOCAB)
LENGTHS = (7, 4, 9, 5)  # padded to 9: rows 1, 3 and 0 have padding
TOKEN_HEADS = ("token_classification", "masked_lm", "causal_lm")


# Weights drawn wider than the default (0.02) so that logits differ by whole units: every term is large
# enough that dropping or mis-weighting it shows at float32 precision.
WIDE = {"initializer_range": 0.5}


def _gpt2(seed: int, layers: int, **kwargs) -> GPT2LMHeadModel:
    kwargs = {**WIDE, **kwargs}
    torch.manual_seed(seed)
    return GPT2LMHeadModel(
        GPT2Config(
            n_embd=32,
            n_layer=layers,
            n_head=2,
            vocab_size=V,
            resid_pdrop=0,
            embd_pdrop=0,
            attn_pdrop=0,
            **kwargs,
        )
    )


def _bert(cls, seed: int, layers: int, **kwargs):
    kwargs = {**WIDE, **kwargs}
    torch.manual_seed(seed)
    return cls(tiny_bert_config(num_layers=layers, **kwargs))


HEADS = {
    "sequence_classification": lambda seed, layers, **kw: _bert(
        BertForSequenceClassification, seed, layers, **kw
    ),
    "token_classification": lambda seed, layers, **kw: _bert(
        BertForTokenClassification, seed, layers, num_labels=4, **kw
    ),
    "question_answering": lambda seed, layers, **kw: _bert(
        BertForQuestionAnswering, seed, layers, num_labels=2, **kw
    ),
    "masked_lm": lambda seed, layers, **kw: _bert(BertForMaskedLM, seed, layers, **kw),
    "causal_lm": lambda seed, layers, **kw: _gpt2(seed, layers, **kw),
}


def _rows(head: str, seed: int = 0) -> list[dict]:
    """Rows of ``LENGTHS`` tokens with the head's labels; row 0 of a token-level head has no label at all."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, n in enumerate(LENGTHS):
        ids = torch.randint(5, V, (n,), generator=g).tolist()
        row = {"input_ids": ids, "attention_mask": [1] * n}
        if head == "sequence_classification":
            row["labels"] = int(torch.randint(0, 3, (1,), generator=g))
        elif head == "question_answering":
            row["start_positions"], row["end_positions"] = 1, n - 2
        elif head == "token_classification":
            row["labels"] = [
                int(t) if j % 2 else -100 for j, t in enumerate(torch.randint(0, 4, (n,), generator=g))
            ]
        elif head == "masked_lm":
            row["labels"] = [t if j % 3 == 1 else -100 for j, t in enumerate(ids)]
        else:  # causal LM: the labels are the inputs, the first tokens unlabelled (a prompt)
            row["labels"] = [t if j >= 2 else -100 for j, t in enumerate(ids)]
        if head in TOKEN_HEADS and i == 0:
            row["labels"] = [-100] * n  # a transfer-set row: KD counts its every real token
        rows.append(row)
    return rows


def _trainer(tmp_path, tokenizer, head, *, teacher=None, student=None, data=None, **settings):
    settings = {"alpha": 1.0, "beta": 0.0, "temperature": 2.0, **settings}
    teacher = HEADS[head](1, 2) if teacher is None and data is None else teacher
    student = HEADS[head](2, 1) if student is None else student
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, **settings),
        train_dataset=data if data is not None else Dataset.from_list(_rows(head)),
        processing_class=tokenizer,
    )
    trainer.model.train()
    return trainer


def _collate(trainer, rows):
    return trainer.data_collator([dict(r) for r in rows])


def _logits(model, head, ids, mask=None):
    """The model's logits (QA: start and end stacked on the last dim), in float64."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    if head == "question_answering":
        return torch.stack([out.start_logits, out.end_logits], -1).double()
    return out.logits.double()


def _kl(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
    """T² · mean over rows of KL(softmax(t/T) || softmax(s/T)); rows ``(N, C)``."""
    s, t = s.double() / T, t.double() / T
    log_ps = s - s.exp().sum(-1, keepdim=True).log()
    log_pt = t - t.exp().sum(-1, keepdim=True).log()
    return T**2 * (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()


def _counted(head: str, rows: list[dict]) -> list[list[int]]:
    """Positions whose logits the KD term compares, per row (the student's positions for a causal LM)."""
    out = []
    for row in rows:
        n = len(row["input_ids"])
        labels = row["labels"]
        unlabelled = all(x == -100 for x in labels)
        keep = [j for j in range(n) if unlabelled or labels[j] != -100]
        if head == "causal_lm":  # position j predicts token j + 1
            keep = [j - 1 for j in keep if j >= 1]
        out.append(keep)
    return out


def _reference_kd(head, rows, s_logits, t_logits, T):
    """The KD term computed here: s_logits/t_logits ``(B, L, ...)`` right-padded (or ``(B, C)``)."""
    if head == "sequence_classification":
        return _kl(s_logits, t_logits, T)
    if head == "question_answering":  # one distribution over the real positions of each row, per end
        terms = []
        for end in range(2):
            per_row = [
                _kl(s_logits[i, :n, end][None], t_logits[i, :n, end][None], T) for i, n in enumerate(LENGTHS)
            ]
            terms.append(torch.stack(per_row).mean())
        return (terms[0] + terms[1]) / 2
    pairs = [(i, j) for i, keep in enumerate(_counted(head, rows)) for j in keep]
    s = torch.stack([s_logits[i, j] for i, j in pairs])
    t = torch.stack([t_logits[i, j] for i, j in pairs])
    return _kl(s, t, T)


# ---- the KD term, live teacher --------------------------------------------------------------------


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("kd_loss", ["kl", "mse"])
def test_kd_term_counts_the_right_positions(tmp_path, tokenizer, head, kd_loss):
    trainer = _trainer(tmp_path, tokenizer, head, kd_loss=kd_loss, temperature=3.0)
    rows = _rows(head)
    batch = _collate(trainer, rows)
    assert batch["input_ids"].shape == (len(LENGTHS), max(LENGTHS))
    s = _logits(trainer.model, head, batch["input_ids"], batch["attention_mask"])
    t = _logits(trainer.teacher, head, batch["input_ids"], batch["attention_mask"])
    got = trainer.compute_loss(trainer.model, batch)
    if kd_loss == "kl":
        expected = _reference_kd(head, rows, s, t, 3.0)
    elif head == "question_answering":  # each row's real positions only
        squares = torch.cat([(s[i, :n] - t[i, :n]) ** 2 for i, n in enumerate(LENGTHS)])  # (real tokens, 2)
        expected = squares.mean(0).mean()  # over the batch's real positions, then the two ends
    elif head == "sequence_classification":
        expected = ((s - t) ** 2).mean()
    else:
        pairs = [(i, j) for i, keep in enumerate(_counted(head, rows)) for j in keep]
        expected = torch.stack([((s[i, j] - t[i, j]) ** 2).mean() for i, j in pairs]).mean()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_regression_head_distils_the_teachers_score_by_mse(tmp_path, tokenizer):
    # KL over one logit is always 0: with num_labels=1 the teacher term is (s - t)², whatever kd_loss says.
    head = "sequence_classification"
    teacher, student = HEADS[head](1, 2, num_labels=1), HEADS[head](2, 1, num_labels=1)
    with torch.no_grad():
        teacher.classifier.bias.fill_(1.0)  # scores about 1 apart from the student's
    rows = [{**r, "labels": float(r["labels"])} for r in _rows(head)]
    trainer = _trainer(
        tmp_path, tokenizer, head, teacher=teacher, student=student, data=Dataset.from_list(rows)
    )
    batch = _collate(trainer, rows)
    s = _logits(student, head, batch["input_ids"], batch["attention_mask"])
    t = _logits(teacher, head, batch["input_ids"], batch["attention_mask"])
    got = trainer.compute_loss(trainer.model, batch)
    torch.testing.assert_close(got.double(), ((s - t) ** 2).mean(), rtol=1e-5, atol=1e-7)
    assert got > 0.5  # the KL it replaces would be exactly 0


@pytest.mark.parametrize("head", list(HEADS))
def test_terms_combine_with_their_weights(tmp_path, tokenizer, head):
    trainer = _trainer(tmp_path, tokenizer, head, alpha=0.3, beta=0.7, temperature=1.5)
    rows = _rows(head)
    batch = _collate(trainer, rows)
    s = _logits(trainer.model, head, batch["input_ids"], batch["attention_mask"])
    t = _logits(trainer.teacher, head, batch["input_ids"], batch["attention_mask"])
    labels = {k: batch[k] for k in trainer.label_names}
    with torch.no_grad():
        own = trainer.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **labels
        ).loss
    loss, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    kd = _reference_kd(head, rows, s, t, 1.5)
    torch.testing.assert_close(loss.double(), 0.3 * kd + 0.7 * own.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs.loss, own)  # the hard-label term is the student's own loss
    assert trainer._metrics["ce_loss"][0].item() == pytest.approx(own.item(), rel=1e-6)
    assert trainer._metrics["kd_loss"][0].item() == pytest.approx(kd.item(), rel=1e-5)


def test_evaluation_mode_gives_the_students_own_loss(tmp_path, tokenizer):
    head = "token_classification"
    trainer = _trainer(tmp_path, tokenizer, head, alpha=0.5, beta=0.5, temperature=4.0)
    batch = _collate(trainer, _rows(head))
    trainer.model.eval()
    with torch.no_grad():
        own = trainer.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
        loss = trainer.compute_loss(trainer.model, batch)
        pair = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    torch.testing.assert_close(loss, own.loss)
    assert isinstance(pair, tuple) and torch.equal(pair[0], loss) and torch.equal(pair[1].logits, own.logits)
    assert trainer._metrics == {}  # no KD term, no teacher


def test_weights_and_labels_decide_which_terms_run(tmp_path, tokenizer):
    head = "sequence_classification"
    rows = _rows(head)
    seen = []

    def record(module, args, kwargs):
        seen.append(set(kwargs))

    # beta = 0: the student gets no labels (with or without them in the batch), no hard-label term
    trainer = _trainer(tmp_path / "a", tokenizer, head, alpha=1.0, beta=0.0)
    trainer.model.register_forward_pre_hook(record, with_kwargs=True)
    trainer.compute_loss(trainer.model, _collate(trainer, rows))
    no_labels = _collate(trainer, [{k: v for k, v in r.items() if k != "labels"} for r in rows])
    trainer.compute_loss(trainer.model, no_labels)
    assert len(seen) == 2 and all("labels" not in kwargs for kwargs in seen)
    assert set(trainer._metrics) == {"kd_loss"}
    # alpha = 0: no teacher forward, no KD term
    trainer = _trainer(tmp_path / "b", tokenizer, head, alpha=0.0, beta=1.0)
    calls = []
    trainer.teacher.register_forward_hook(lambda *a: calls.append(1))
    trainer.compute_loss(trainer.model, _collate(trainer, rows))
    assert calls == [] and set(trainer._metrics) == {"ce_loss"}
    # beta > 0 and a batch without labels: refused, naming what to do
    message = (
        "beta=1.0 weights the hard-label loss but the batch has no ['labels']. Add labels (label -100 marks an "
        "unlabelled example), or set beta=0 to learn from the teacher alone."
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        trainer.compute_loss(trainer.model, no_labels)
    # beta > 0 and a batch of unlabelled rows only: the hard-label term is 0, not NaN
    trainer = _trainer(tmp_path / "c", tokenizer, head, alpha=0.5, beta=0.5)
    batch = _collate(trainer, [{**r, "labels": -100} for r in rows])
    loss = trainer.compute_loss(trainer.model, batch)
    assert trainer._metrics["ce_loss"][0].item() == 0.0
    torch.testing.assert_close(loss, 0.5 * trainer._metrics["kd_loss"][0])


# ---- the KD term from a cached top-k teacher --------------------------------------------------------


def _topk_reference(head, rows, s_logits, teacher, k, T, left):
    """Top-k KL computed here: each row's teacher logits alone (as the cache stores them), aligned to the
    student's padded batch on the side the tokenizer pads."""
    L = s_logits.shape[1]
    pairs_s, pairs_t = [], []
    for i, keep in enumerate(_counted(head, rows)):
        n = len(rows[i]["input_ids"])
        t_row = _logits(teacher, head, torch.tensor([rows[i]["input_ids"]]))[0]
        offset = L - n if left else 0
        for j in keep:
            values, ids = t_row[j].topk(k)
            pairs_s.append(s_logits[i, offset + j][ids])
            # the student's log-softmax over the whole vocabulary, read at the teacher's top k
            s_full = s_logits[i, offset + j].double() / T
            log_ps = s_full - s_full.exp().sum().log()
            pairs_t.append((values.double() / T, log_ps[ids]))
    per = []
    for values, log_ps in pairs_t:
        log_pt = values - values.exp().sum().log()
        per.append((log_pt.exp() * (log_pt - log_ps)).sum())
    return T**2 * torch.stack(per).mean()


@pytest.mark.parametrize(
    ("head", "padding_side"),
    [(h, "right") for h in HEADS] + [("causal_lm", "left")],
)
def test_cached_topk_teacher_gives_the_renormalised_kl(tmp_path, tokenizer, head, padding_side):
    tokenizer.padding_side = padding_side
    teacher, k = HEADS[head](1, 2), 5
    rows = _rows(head)
    if head not in ("masked_lm", "causal_lm"):  # dense logits only: top_k is refused before any work
        with pytest.raises(ValueError, match=f"top_k={k} applies to masked and causal LMs"):
            precompute_teacher_logits(teacher, Dataset.from_list(rows), top_k=k, cache_dir=tmp_path / "c")
        return
    data = precompute_teacher_logits(
        teacher, Dataset.from_list(rows), top_k=k, dtype="float32", cache_dir=tmp_path / "c"
    )
    trainer = _trainer(tmp_path, tokenizer, head, data=data, temperature=2.0)
    batch = _collate(trainer, list(data))
    assert batch["teacher_topk_values"].shape == (len(LENGTHS), max(LENGTHS), k)
    s = _logits(trainer.model, head, batch["input_ids"], batch["attention_mask"])
    got = trainer.compute_loss(trainer.model, batch)
    expected = _topk_reference(head, rows, s, teacher, k, 2.0, left=padding_side == "left")
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", ["masked_lm", "causal_lm"])
def test_cached_topk_of_the_whole_vocabulary_equals_the_live_teacher(tmp_path, tokenizer, head):
    teacher = HEADS[head](1, 2)
    rows = _rows(head)
    data = precompute_teacher_logits(
        teacher, Dataset.from_list(rows), top_k=V, dtype="float32", cache_dir=tmp_path / "c"
    )
    cached = _trainer(tmp_path / "a", tokenizer, head, data=data)
    live = _trainer(tmp_path / "b", tokenizer, head, teacher=teacher)
    got = cached.compute_loss(cached.model, _collate(cached, list(data)))
    want = live.compute_loss(live.model, _collate(live, rows))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert want > 1e-3


@pytest.mark.parametrize("head", list(HEADS))
def test_cached_dense_teacher_logits_equal_the_live_teacher(tmp_path, tokenizer, head):
    teacher = HEADS[head](1, 2)
    rows = _rows(head)
    dense = {"top_k": -1} if head in ("masked_lm", "causal_lm") else {}
    data = precompute_teacher_logits(
        teacher, Dataset.from_list(rows), dtype="float32", cache_dir=tmp_path / "c", **dense
    )
    cached = _trainer(tmp_path / "a", tokenizer, head, data=data)
    live = _trainer(tmp_path / "b", tokenizer, head, teacher=teacher)
    batch = _collate(cached, list(data))
    assert "teacher_logits" in batch and cached.teacher is None
    got = cached.compute_loss(cached.model, batch)
    want = live.compute_loss(live.model, _collate(live, rows))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert want > 1e-2
    # Called as a subclass would: the cached logits themselves, and no hidden states or attention maps.
    out = cached.compute_teacher_outputs(batch)
    assert out.logits is batch["teacher_logits"] and out.hidden_states is None and out.attentions is None
    out = live.compute_teacher_outputs(_collate(live, rows))
    assert out.hidden_states is None and out.attentions is None


@pytest.mark.parametrize("left", [False, True])
def test_collator_pads_teacher_columns_on_the_tokenizers_side(tokenizer, left):
    tokenizer.padding_side = "left" if left else "right"
    rows = [
        {
            "input_ids": [5, 6, 7],
            "labels": [5, 6, 7],
            "teacher_topk_values": [[1.0, 0.5]] * 3,
            "teacher_topk_indices": [[8, 9]] * 3,
        },
        {
            "input_ids": [5],
            "labels": [5],
            "teacher_topk_values": [[2.0, 1.5]],
            "teacher_topk_indices": [[10, 11]],
        },
    ]
    batch = DistillationDataCollator(tokenizer)(rows)
    short_values = batch["teacher_topk_values"][1]
    short_ids = batch["teacher_topk_indices"][1]
    real = 2 if left else 0  # the one real position of the short row
    assert batch["attention_mask"][1].tolist() == ([0, 0, 1] if left else [1, 0, 0])
    assert short_values[real].tolist() == [2.0, 1.5] and short_ids[real].tolist() == [10, 11]
    assert short_values.abs().sum() == 3.5 and short_ids.sum() == 21  # zeros elsewhere
    assert (
        batch["teacher_topk_indices"].dtype == torch.int64
        and batch["teacher_topk_values"].dtype == torch.float32
    )
    row = {
        "input_ids": [5],
        "labels": [5],
        "teacher_topk_values": [[2.0, 1.5]],
        "teacher_topk_indices": [[10, 11]],
    }
    one = DistillationDataCollator(tokenizer)([row])  # a last batch of one row
    assert one["teacher_topk_values"].tolist() == [[[2.0, 1.5]]]


def test_kd_term_without_attention_mask(tmp_path, tokenizer):
    # A batch without attention_mask: every position is real (causal LM: shifted; QA: no padding to fill).
    g = torch.Generator().manual_seed(3)
    for head in ("causal_lm", "question_answering"):
        trainer = _trainer(
            tmp_path / head, tokenizer, head, kd_loss="mse" if head == "question_answering" else "kl"
        )
        width = 2 if head == "question_answering" else V
        s, t = torch.randn(2, 5, width, generator=g), torch.randn(2, 5, width, generator=g)
        got = trainer.compute_kd_loss(s, TeacherOutput(logits=t), {})
        if head == "causal_lm":
            expected = _kl(s[:, :-1].reshape(-1, V), t[:, :-1].reshape(-1, V), 2.0)
            labels = torch.tensor([[-100, 7, 8, 9, 10], [-100, -100, -100, 7, 8]])
            labelled = trainer.compute_kd_loss(s, TeacherOutput(logits=t), {"labels": labels})
            pairs = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]  # position j predicts labelled j + 1
            s_rows, t_rows = (torch.stack([x[i, j] for i, j in pairs]) for x in (s, t))
            torch.testing.assert_close(labelled.double(), _kl(s_rows, t_rows, 2.0), rtol=1e-5, atol=1e-6)
        else:
            expected = ((s.double() - t.double()) ** 2).mean()
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_teacher_logits_of_another_width_are_refused(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, "sequence_classification")
    batch = _collate(trainer, _rows("sequence_classification"))
    s = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    message = (
        "Teacher logits have 5 classes but the student has 3: "
        "were the cached teacher_logits computed for another task or label set?"
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        trainer.compute_kd_loss(s, TeacherOutput(logits=torch.zeros(len(LENGTHS), 5)), batch)
    tokens = _trainer(tmp_path / "t", tokenizer, "token_classification")
    batch = _collate(tokens, _rows("token_classification"))
    s = tokens.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # 4 tags
    with pytest.raises(ValueError, match=r"^Teacher logits have 5 classes but the student has 4: "):
        tokens.compute_kd_loss(s, TeacherOutput(logits=torch.zeros(*s.shape[:2], 5)), batch)
    head = "sequence_classification"
    data = Dataset.from_list([{**r, "teacher_logits": [0.0, 1.0, 2.0]} for r in _rows(head)])
    cached_only = _trainer(tmp_path / "c", tokenizer, head, data=data)
    message = (
        "This batch has no teacher_logits, but the trainer reads the teacher from its 'logits' cache (chosen from "
        "the training dataset's columns): precompute the teacher's outputs for every example "
        "(hf_distill.precompute_teacher_logits), or pass teacher_model and a dataset without teacher columns."
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        cached_only.compute_loss(cached_only.model, _collate(cached_only, _rows(head)))


def test_collator_pads_the_teachers_own_tokenization_and_follows_the_students_length(tokenizer):
    from transformers import DataCollatorForTokenClassification

    rows = [
        {"input_ids": [5, 6, 7], "label": [0, 1, 0], "teacher_input_ids": [9, 8], "teacher_attention_mask": [1, 1],
         "teacher_logits": [[1.0, 2.0]] * 3},
        {"input_ids": [5], "label": [1], "teacher_input_ids": [9, 8, 7, 6], "teacher_attention_mask": [1, 1, 1, 1],
         "teacher_logits": [[3.0, 4.0]]},
    ]  # fmt: skip
    batch = DistillationDataCollator(tokenizer, teacher_pad_token_id=3)([dict(r) for r in rows])
    labels = batch["labels"] if "labels" in batch else batch["label"]
    assert labels.tolist() == [[0, 1, 0], [1, -100, -100]]  # "label" lists: token-level padding
    assert batch["teacher_input_ids"].tolist() == [[9, 8, 3, 3], [9, 8, 7, 6]]  # its own length, its pad id
    assert batch["teacher_attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["teacher_input_ids"].dtype == torch.int64 and batch["teacher_logits"].dtype == torch.float32
    assert batch["teacher_logits"].shape == (2, 3, 2)  # the student's length
    padded = DistillationDataCollator(
        tokenizer, base_collator=DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=8)
    )([dict(r) for r in rows])
    assert padded["input_ids"].shape == (2, 8) and padded["teacher_logits"].shape == (2, 8, 2)
    tensors = [
        {"input_ids": [5, 6], "labels": torch.tensor([0, 1])},
        {"input_ids": [5], "labels": torch.tensor([1])},
    ]
    assert DistillationDataCollator(tokenizer)(tensors)["labels"].tolist() == [[0, 1], [1, -100]]
    scalars = [
        {"input_ids": [5, 6], "labels": torch.tensor(0)},
        {"input_ids": [5], "labels": torch.tensor(2)},
    ]
    assert DistillationDataCollator(tokenizer)(scalars)["labels"].tolist() == [0, 2]


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
def test_the_teachers_own_tokenization_after_sequence_level_logits_is_padded_on_the_tokenizers_side(
    tokenizer, left
):
    tokenizer.padding_side = "left" if left else "right"
    rows = [
        {"input_ids": [5, 6], "labels": 0, "teacher_logits": [1.0, 2.0, 3.0], "teacher_input_ids": [9, 8, 7],
         "teacher_attention_mask": [1, 1, 1]},
        {"input_ids": [5], "labels": 1, "teacher_logits": [4.0, 5.0, 6.0], "teacher_input_ids": [9],
         "teacher_attention_mask": [1]},
    ]  # fmt: skip
    batch = DistillationDataCollator(tokenizer, teacher_pad_token_id=3)(rows)
    assert batch["teacher_logits"].tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    assert batch["teacher_input_ids"].tolist() == [[9, 8, 7], [3, 3, 9] if left else [9, 3, 3]]
    assert batch["teacher_attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1] if left else [1, 0, 0]]


def test_token_level_teacher_columns_of_a_batch_without_input_ids_pad_to_their_longest_row():
    rows = [
        {"labels": 0, "teacher_topk_values": [[1.0, 0.5]] * 2, "teacher_topk_indices": [[8, 9]] * 2},
        {"labels": 1, "teacher_topk_values": [[2.0, 1.5]], "teacher_topk_indices": [[10, 11]]},
    ]
    batch = DistillationDataCollator()(rows)
    assert batch["labels"].tolist() == [0, 1]
    assert batch["teacher_topk_values"].tolist() == [[[1.0, 0.5], [1.0, 0.5]], [[2.0, 1.5], [0.0, 0.0]]]
    assert batch["teacher_topk_indices"].tolist() == [[[8, 9], [8, 9]], [[10, 11], [0, 0]]]


def test_the_teachers_own_tokenization_replaces_every_student_column():
    """With ``teacher_input_ids`` the teacher reads only ``teacher_*`` columns (none of the student's)."""
    student = ["input_ids", "attention_mask", "token_type_ids"]
    own = [*student, "teacher_input_ids", "teacher_attention_mask"]
    assert teacher_sources(own, student) == {
        "attention_mask": "teacher_attention_mask",
        "input_ids": "teacher_input_ids",
    }
    assert teacher_sources(student, student) == {name: name for name in student}


@pytest.mark.parametrize(
    ("task", "label_names", "unit"),
    [
        ("sequence_classification", ["labels"], "example"),
        ("question_answering", ["start_positions", "end_positions"], "example"),
        ("token_classification", ["labels"], "token"),
        ("masked_lm", ["labels"], "token"),
        ("causal_lm", ["labels"], "token"),
    ],
)
def test_a_batch_without_labels_is_refused_when_beta_weighs_them(task, label_names, unit):
    message = (
        f"beta=0.5 weights the hard-label loss but the batch has no {label_names}. Add labels (label -100 "
        f"marks an unlabelled {unit}), or set beta=0 to learn from the teacher alone."
    )
    with pytest.raises(InputError, match="^" + re.escape(message) + "$"):
        TASK_SPECS[task].check_labels({"input_ids": torch.ones(1, 3), label_names[0]: None}, label_names, 0.5)


@pytest.mark.parametrize("task", ["sequence_classification", "causal_lm"])
def test_a_batch_without_labels_is_accepted_when_beta_is_zero(task):
    TASK_SPECS[task].check_labels({"input_ids": torch.ones(1, 3)}, ["labels"], 0.0)


def test_kd_mask_without_attention_mask_or_without_labels(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, "masked_lm")
    labels = torch.tensor([[-100, 7, -100], [-100, -100, -100]])
    real = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert trainer.spec.kd_mask({"labels": labels}, 3).tolist() == [[False, True, False], [False, False, False]]
    assert trainer.spec.kd_mask({"attention_mask": real}, 3).tolist() == real.bool().tolist()
    both = trainer.spec.kd_mask({"labels": labels, "attention_mask": real}, 3)
    assert both.tolist() == [[False, True, False], [True, True, False]]  # the unlabelled row: its real tokens


# ---- hidden states and attention maps ----------------------------------------------------------------


def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return per_position[mask.bool()].mean()


@pytest.mark.parametrize("name", ["mse", "cosine"])
def test_hidden_loss_projects_maps_masks_and_averages_layers(tmp_path, tokenizer, name):
    head = "sequence_classification"
    teacher = HEADS[head](1, 4, hidden=48)
    student = HEADS[head](2, 2, hidden=32)
    trainer = _trainer(
        tmp_path, tokenizer, head, teacher=teacher, student=student,
        alpha=0.0, beta=0.0, hidden_loss=name, hidden_loss_weight=2.0,
    )  # fmt: skip
    with torch.no_grad():  # a projection whose bias matters
        trainer.hidden_projection.bias.normal_()
    batch = _collate(trainer, _rows(head))
    mask = batch["attention_mask"]
    with torch.no_grad():
        s_hidden = student(
            input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=True
        ).hidden_states
        t_hidden = teacher(
            input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=True
        ).hidden_states
        W, b = trainer.hidden_projection.weight.double(), trainer.hidden_projection.bias.double()
    terms = []
    for s_layer, t_layer in [(1, 2), (2, 4)]:  # evenly spaced: student layer i <-> teacher layer 2i
        h = s_hidden[s_layer].double() @ W.T + b
        t = t_hidden[t_layer].double()
        if name == "mse":
            per = ((h - t) ** 2).mean(-1)
        else:
            per = 1 - (h * t).sum(-1) / (h.norm(dim=-1) * t.norm(dim=-1))
        terms.append(_masked_mean(per, mask))
    expected = 2.0 * torch.stack(terms).mean()
    got = trainer.compute_loss(trainer.model, batch)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert trainer._metrics["hidden_loss"][0].item() == pytest.approx(expected.item() / 2, rel=1e-5)
    assert set(trainer._metrics) == {"hidden_loss"}  # alpha = 0: no KD term even though the teacher ran
    # Cached logits in the batch do not stand in for the live teacher's hidden states.
    with_cached = trainer.compute_loss(
        trainer.model, {**batch, "teacher_logits": torch.zeros(len(LENGTHS), 3)}
    )
    torch.testing.assert_close(with_cached, got)
    zeros = torch.zeros(len(LENGTHS), 9, 2)
    topk = {"teacher_topk_values": zeros, "teacher_topk_indices": zeros.long()}
    torch.testing.assert_close(trainer.compute_loss(trainer.model, {**batch, **topk}), got)
    total, count = trainer._metrics["hidden_loss"]  # the sum over the three calls, for the next log
    assert count == 3 and total.item() == pytest.approx(3 * got.item() / 2, rel=1e-5)


def test_attention_loss_matches_each_student_layer_with_its_teacher_layer(tmp_path, tokenizer):
    head = "sequence_classification"
    teacher = HEADS[head](1, 4, attn_implementation="eager")
    student = HEADS[head](2, 2, attn_implementation="eager")
    trainer = _trainer(
        tmp_path, tokenizer, head, teacher=teacher, student=student,
        alpha=0.0, beta=0.0, attention_loss_weight=3.0, layer_map=[1, 4],
    )  # fmt: skip
    batch = _collate(trainer, _rows(head))
    mask = batch["attention_mask"]
    with torch.no_grad():
        s_att = student(input_ids=batch["input_ids"], attention_mask=mask, output_attentions=True).attentions
        t_att = teacher(input_ids=batch["input_ids"], attention_mask=mask, output_attentions=True).attentions
    # layer_map is 1-based over teacher layers; attentions[i] is layer i + 1's
    terms = [_masked_mean(((s_att[i].double() - t_att[t - 1].double()) ** 2).mean(dim=(1, 3)), mask)
             for i, t in enumerate([1, 4])]  # fmt: skip
    expected = 3.0 * torch.stack(terms).mean()
    got = trainer.compute_loss(trainer.model, batch)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
    assert expected > 1e-6


def test_attention_loss_without_a_layer_map_matches_evenly_spaced_teacher_layers(tmp_path, tokenizer):
    """Two student layers, four teacher layers: the default map is teacher layers 2 and 4."""
    head = "sequence_classification"
    got = {}
    for layer_map in (None, [2, 4]):
        trainer = _trainer(
            tmp_path, tokenizer, head,
            teacher=HEADS[head](1, 4, attn_implementation="eager"),
            student=HEADS[head](2, 2, attn_implementation="eager"),
            alpha=0.0, beta=0.0, attention_loss_weight=1.0, layer_map=layer_map,
        )  # fmt: skip
        got[str(layer_map)] = trainer.compute_loss(trainer.model, _collate(trainer, _rows(head)))
    torch.testing.assert_close(got["None"], got["[2, 4]"])


@pytest.mark.parametrize("sdpa", ["both", "teacher", "student"])
def test_attention_loss_refuses_models_without_attention_maps_or_with_other_head_counts(
    tmp_path, tokenizer, sdpa
):
    head = "sequence_classification"
    batch_rows = _rows(head)
    kinds = {side: "sdpa" if sdpa in (side, "both") else "eager" for side in ("teacher", "student")}
    no_maps = _trainer(
        tmp_path / "a", tokenizer, head,
        teacher=HEADS[head](1, 2, attn_implementation=kinds["teacher"]),
        student=HEADS[head](2, 1, attn_implementation=kinds["student"]),
        alpha=0.0, beta=0.0, attention_loss_weight=1.0,
    )  # fmt: skip
    message = "attention_loss_weight > 0 needs attention maps: load student and teacher with attn_implementation='eager'."
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        no_maps.compute_loss(no_maps.model, _collate(no_maps, batch_rows))
    heads = _trainer(
        tmp_path / "b", tokenizer, head,
        teacher=HEADS[head](1, 1, attn_implementation="eager", num_attention_heads=4),
        student=HEADS[head](2, 1, attn_implementation="eager"),
        alpha=0.0, beta=0.0, attention_loss_weight=1.0,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"as many heads in the student \(2\) as in the teacher \(4\)"):
        heads.compute_loss(heads.model, _collate(heads, batch_rows))


def test_hidden_loss_refuses_a_layer_map_that_does_not_fit(tmp_path, tokenizer):
    head = "sequence_classification"
    for layer_map in ([1], [2, 5]):
        trainer = _trainer(
            tmp_path, tokenizer, head, teacher=HEADS[head](1, 4), student=HEADS[head](2, 2),
            alpha=0.0, beta=0.0, hidden_loss="mse", hidden_loss_weight=1.0, layer_map=layer_map,
        )  # fmt: skip
        message = f"layer_map={layer_map} must have one entry per student layer (2) with teacher layers between 0 and 4."
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            trainer.compute_loss(trainer.model, _collate(trainer, _rows(head)))


@pytest.mark.parametrize("kd_loss", ["kl", "mse"])
def test_an_ensemble_distils_the_weighted_mixture(tmp_path, tokenizer, kd_loss):
    head = "sequence_classification"
    teachers = [HEADS[head](1, 2), HEADS[head](5, 1)]
    trainer = _trainer(
        tmp_path,
        tokenizer,
        head,
        teacher=teachers,
        kd_loss=kd_loss,
        teacher_weights=[1.0, 3.0],
        temperature=2.0,
    )
    batch = _collate(trainer, _rows(head))
    s = _logits(trainer.model, head, batch["input_ids"], batch["attention_mask"])
    t1, t2 = (_logits(t, head, batch["input_ids"], batch["attention_mask"]) for t in teachers)
    got = trainer.compute_loss(trainer.model, batch)
    if kd_loss == "mse":  # logit matching: the weighted mean of the logits
        expected = ((s - (0.25 * t1 + 0.75 * t2)) ** 2).mean()
    else:  # the mixture of soft labels, written as logits at T
        p = 0.25 * torch.softmax(t1 / 2, -1) + 0.75 * torch.softmax(t2 / 2, -1)
        expected = _kl(s, 2 * p.log(), 2.0)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


# ---- a live teacher's NaN ---------------------------------------------------------------------------


class _Steps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


@pytest.mark.parametrize("where", ["logits of the first micro-batch", "hidden states"])
def test_teacher_nan_stops_the_step_with_accumulation_and_in_hidden_states(tmp_path, tokenizer, where):
    head = "sequence_classification"
    teacher, student = HEADS[head](1, 2), HEADS[head](2, 1)
    calls = []

    def poison(module, args, output):
        calls.append(1)
        if where == "hidden states":
            output.hidden_states[1][0, 0, 0] = float("nan")  # logits stay finite
        elif len(calls) == 1:  # only the first of the step's two micro-batches; the second is finite
            output.logits[0, 0] = float("nan")
        return output

    teacher.register_forward_hook(poison)
    settings = {"hidden_loss": "mse", "hidden_loss_weight": 1.0} if where == "hidden states" else {}
    before = {k: v.clone() for k, v in student.state_dict().items()}
    steps = _Steps()
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(
            tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1, **settings
        ),
        train_dataset=Dataset.from_list(_rows(head)),
        processing_class=tokenizer,
        callbacks=[steps],
    )
    with pytest.raises(FloatingPointError, match="Step 1 .*NaN or inf"):
        trainer.train()
    assert len(calls) == 2 and steps.steps == 0
    for key, value in student.state_dict().items():
        assert torch.equal(value, before[key]), key
