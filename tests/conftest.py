"""Tiny models and datasets built in-process: no downloads."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from hf_distill import DistillationConfig

ROOT = Path(__file__).resolve().parent.parent


def load_module(relative: str) -> ModuleType:
    """A script or benchmark of the repository (``"benchmarks/bench_lm.py"``) imported as a module named for its
    file, and registered in ``sys.modules`` (dataclasses look their module up there)."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)]


def tiny_bert_config(num_layers: int = 2, hidden: int = 32, num_labels: int = 3, **kwargs) -> BertConfig:
    defaults = dict(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )
    defaults.update(kwargs)
    return BertConfig(**defaults)


def tiny_bert(seed: int = 0, **kwargs) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config(**kwargs))


@pytest.fixture
def tokenizer(tmp_path) -> BertTokenizerFast:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


def random_classification_dataset(
    n: int = 16, num_labels: int = 3, seed: int = 0, max_len: int = 12
) -> Dataset:
    """Rows of random word ids of varying length with a [CLS] ... [SEP] frame and a random label."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "token_type_ids": [], "labels": []}
    for _ in range(n):
        length = int(torch.randint(3, max_len - 2, (1,), generator=g))
        ids = [2] + torch.randint(5, len(VOCAB), (length,), generator=g).tolist() + [3]
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["token_type_ids"].append([0] * len(ids))
        rows["labels"].append(int(torch.randint(0, num_labels, (1,), generator=g)))
    return Dataset.from_dict(rows)


def config(tmp_path, **kwargs) -> DistillationConfig:
    """A CPU DistillationConfig for tests: no saving, no reporting, fixed seeds, a log every step."""
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_train_epochs=1,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        seed=0,
        data_seed=0,
    )
    defaults.update(kwargs)
    return DistillationConfig(**defaults)


class ForwardCounter:
    """Counts a model's forward passes (a forward hook)."""

    def __init__(self, model):
        self.calls = 0
        model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1
