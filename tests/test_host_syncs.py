"""``DistillationTrainer.compute_loss`` never makes the host wait for the device, and keeps its loss values.

On a GPU, reading a device value on the host (``.item()``, ``if tensor:``, ``.tolist()``, ``.cpu()``, a
boolean-mask index...) stalls the CPU until every queued kernel has run, so the next step cannot be
queued meanwhile. These tests count such calls on CPU, made by hf_distill's own code, while
``compute_loss`` runs, for a live teacher and cached logits, labelled and unlabelled batches.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from conftest import config, random_classification_dataset, tiny_bert, tiny_bert_config
from torch.overrides import TorchFunctionMode
from transformers import BertForMaskedLM, BertForTokenClassification

import hf_distill
from hf_distill import DistillationTrainer
from hf_distill.teacher_cache import precompute_teacher_logits, weights_hash

PACKAGE = str(Path(hf_distill.__file__).parent)
TORCH = str(Path(torch.__file__).parent)
# Tensor methods that read a device value on the host.
SYNCING = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")


class HostSyncs:
    """Counts host-device synchronisations while active: ``ours`` those made by hf_distill's code.

    A call is hf_distill's when the nearest caller outside torch is in the hf_distill package (a
    sync inside a transformers model's forward is the model's, not ours).
    """

    def __init__(self):
        self.ours: list[str] = []
        self.others: list[str] = []
        self._saved = {}
        self._own: dict[str, bool] = {}

    def _record(self, name: str) -> None:
        for frame in reversed(traceback.extract_stack()[:-2]):
            if frame.filename.startswith(TORCH):
                continue
            where = f"{name} at {frame.filename}:{frame.lineno}"
            (self.ours if frame.filename.startswith(PACKAGE) else self.others).append(where)
            return

    def _wrap(self, name: str):
        original = self._saved[name]

        def counted(tensor, *args, **kwargs):
            self._record(name)
            return original(tensor, *args, **kwargs)

        return counted

    def __enter__(self):
        for name in SYNCING:
            self._saved[name] = getattr(torch.Tensor, name)
            self._own[name] = name in vars(torch.Tensor)
            setattr(torch.Tensor, name, self._wrap(name))
        # Indexing is watched through a torch-function mode, not by setting torch.Tensor.__getitem__: a
        # __getitem__ set on the class gives every tensor the sequence protocol for the rest of the process
        # (CPython keeps the sq_item slot after the attribute is deleted), and torch.tensor([tensor(0),
        # tensor(2)]) then fails with "len() of a 0-d tensor" in later tests.
        self._mode = _MaskIndexing(self._record)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for name, method in self._saved.items():  # put back exactly what was there
            if self._own[name]:
                setattr(torch.Tensor, name, method)
            else:
                delattr(torch.Tensor, name)


class _MaskIndexing(TorchFunctionMode):
    """Records indexing by a boolean mask (its size is read on the host)."""

    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__ and _is_mask(args[1]):
            self.record("boolean-mask index")
        return func(*args, **(kwargs or {}))


def _is_mask(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def test_the_counter_leaves_torch_tensor_as_it_found_it():
    before = dict(vars(torch.Tensor))
    with HostSyncs():
        torch.ones(2).tolist()
    assert dict(vars(torch.Tensor)) == before
    assert torch.tensor([torch.tensor(0), torch.tensor(2)]).tolist() == [0, 2]


def test_the_counter_sees_syncs_and_tells_ours_from_others():
    with HostSyncs() as syncs:
        weights_hash(tiny_bert(seed=1))  # hf_distill code that copies weights to the host
        assert (torch.ones(2) > 0).all()  # test code
        torch.ones(3)[torch.tensor([True, False, True])]
    assert syncs.ours and all("teacher_cache/key.py" in s for s in syncs.ours)
    assert any("__bool__" in s for s in syncs.others) and any("boolean-mask" in s for s in syncs.others)


def _token_rows(n: int = 8, unlabelled: bool = False):
    data = random_classification_dataset(n, seed=4).remove_columns("labels")
    g = torch.Generator().manual_seed(4)
    labels = [
        [-100] * len(ids) if unlabelled else torch.randint(0, 4, (len(ids),), generator=g).tolist()
        for ids in data["input_ids"]
    ]
    return data.add_column("labels", labels)


def _case(name: str, tmp_path):
    """(student, teacher or None, training rows) of a test case."""
    if name.startswith("token"):
        torch.manual_seed(2)
        student = BertForTokenClassification(tiny_bert_config(num_labels=4, num_layers=1))
        torch.manual_seed(1)
        teacher = BertForTokenClassification(tiny_bert_config(num_labels=4)).eval()
        rows = _token_rows(unlabelled="unlabelled" in name)
    elif name.startswith("masked_lm"):
        torch.manual_seed(2)
        student = BertForMaskedLM(tiny_bert_config(num_layers=1))
        torch.manual_seed(1)
        teacher = BertForMaskedLM(tiny_bert_config()).eval()
        rows = _token_rows().map(
            lambda r: {"labels": [t if i % 3 == 1 else -100 for i, t in enumerate(r["input_ids"])]}
        )
    else:
        student, teacher = tiny_bert(seed=2, num_layers=1), tiny_bert(seed=1)
        rows = random_classification_dataset(8, seed=4)
        if "unlabelled" in name:
            rows = rows.map(lambda r: {"labels": -100})
    if "cached" in name:
        rows = precompute_teacher_logits(teacher, rows, cache_dir=tmp_path / "cache", dtype="float32")
        teacher = None
    return student, teacher, rows


CASES = [
    "live_labelled",
    "live_unlabelled",
    "cached_labelled",
    "cached_unlabelled",
    "token_live_labelled",
    "token_cached_unlabelled",
    "masked_lm_cached_topk",
]


@pytest.mark.parametrize("case", CASES)
def test_compute_loss_makes_no_host_sync(tmp_path, tokenizer, case):
    student, teacher, rows = _case(case, tmp_path)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config(tmp_path, alpha=0.6, beta=0.4),
        train_dataset=rows,
        processing_class=tokenizer,
    )
    trainer._set_signature_columns_if_needed()
    keep = set(trainer._signature_columns)
    batch = trainer.data_collator([{k: v for k, v in r.items() if k in keep} for r in rows])
    trainer.model.train()
    with HostSyncs() as syncs:
        for _ in range(2):
            loss = trainer.compute_loss(trainer.model, batch)
    assert syncs.ours == []
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("labelled", [True, False])
def test_loss_values_are_kd_plus_the_students_own_loss(tmp_path, tokenizer, labelled):
    """alpha * KD + beta * CE with CE the student's own loss, or exactly 0 for a batch with no label."""
    student, teacher, rows = _case("cached_labelled" if labelled else "cached_unlabelled", tmp_path)
    trainer = DistillationTrainer(
        model=student,
        args=config(tmp_path, alpha=0.6, beta=0.4, temperature=2.0),
        train_dataset=rows,
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([dict(r) for r in rows.remove_columns("token_type_ids")])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    if labelled:
        out = student(**inputs, labels=batch["labels"])
        ce = out.loss
    else:
        out, ce = student(**inputs), torch.tensor(0.0)
    kd = hf_distill.kl_div_loss(out.logits, batch["teacher_logits"], 2.0)
    torch.testing.assert_close(loss, 0.6 * kd + 0.4 * ce, rtol=0, atol=0)
    (sum_ce, count) = trainer._metrics["ce_loss"]
    assert count == 1 and sum_ce.item() == ce.item()
