"""Your own data through ``scripts/distill_glue.py``: files, folders, labels, carved splits, and the checks that
refuse bad data before anything is trained or written."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import load_module, tiny_bert
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from offline_fixtures import fake_wheels
from transformers import AutoModelForSequenceClassification

from hf_distill.cli import run_script
from hf_distill.text_classification import data
from hf_distill.text_classification.teacher import reorder_labels

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "custom" / "csv.yaml"
EXAMPLE = ROOT / "recipes" / "custom" / "reviews.csv"

distill_glue = load_module("scripts/distill_glue.py")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return fake_wheels(tmp_path_factory.mktemp("cache"))


def flags(cache: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--config", str(RECIPE),
        "--cache_dir", str(cache),
        "--output_dir", str(output),
        "--max_seq_length", "16",
        "--teacher_num_train_epochs", "1",
        "--num_train_epochs", "1",
        "--per_device_train_batch_size", "8",
        "--speed_samples", "8",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randint(5, 58)}" for _ in range(n))


def check_run(output: Path, metrics: set[str]) -> dict:
    """results.json has ``metrics`` on every evaluation split; every student reloads with the data's labels."""
    saved = json.loads((output / "results.json").read_text())
    assert [(r["student"], r["training"]) for r in saved["results"][1:]] == [
        ("layers", "hard labels"),
        ("layers", "KD"),
    ]
    for row in saved["results"]:
        for split in saved["eval_splits"]:
            assert set(row["metrics"][split]) == metrics, (row["name"], split)
    return saved


def test_csv_with_string_labels(cache, tmp_path):
    output = tmp_path / "out"
    distill_glue.main(flags(cache, output, "--dataset_name", str(EXAMPLE)))
    saved = check_run(output, {"accuracy", "macro_f1"})
    assert saved["task"]["label_names"] == ["negative", "neutral", "positive"]  # sorted distinct values
    # 48 rows: test then validation carved from train, 15% each, seeded
    assert saved["splits"]["test"] == {"source": "carved from train", "seed": 42, "size": 0.15, "rows": 7}
    assert saved["splits"]["validation"]["rows"] == 6 and saved["splits"]["train"]["rows"] == 35
    for row in saved["results"][1:]:
        student = AutoModelForSequenceClassification.from_pretrained(row["output_dir"])
        assert student.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
        assert student.config.label2id == {"negative": 0, "neutral": 1, "positive": 2}
    card = (Path(saved["results"][2]["output_dir"]) / "README.md").read_text()
    assert "reviews.csv" in card and "macro_f1" in card


def test_json_lines_text_pairs_with_float_labels_is_regression(cache, tmp_path):
    rng = random.Random(0)
    path = tmp_path / "pairs.jsonl"
    with path.open("w") as f:
        for _ in range(40):
            row = {
                "premise": words(rng, 5),
                "hypothesis": words(rng, 3),
                "score": round(rng.uniform(0, 5), 2),
            }
            f.write(json.dumps(row) + "\n")
    output = tmp_path / "out"
    distill_glue.main(
        flags(cache, output, "--dataset_name", str(path), "--text_columns", "premise", "hypothesis")
        + ["--label_column", "score"]
    )
    saved = check_run(output, {"pearson", "spearmanr"})
    assert saved["task"]["label_names"] is None and saved["main_metric"] == "pearson"
    student = AutoModelForSequenceClassification.from_pretrained(saved["results"][2]["output_dir"])
    assert student.config.num_labels == 1 and student.config.problem_type == "regression"


def test_saved_folder_without_a_test_split(cache, tmp_path):
    rng = random.Random(1)
    features = Features({"sentence": Value("string"), "topic": ClassLabel(names=["sport", "music", "food"])})

    def split(n):
        return Dataset.from_dict(
            {"sentence": [words(rng, 6) for _ in range(n)], "topic": [i % 3 for i in range(n)]},
            features=features,
        )

    DatasetDict({"train": split(40), "validation": split(9)}).save_to_disk(tmp_path / "saved")
    output = tmp_path / "out"
    distill_glue.main(
        flags(cache, output, "--dataset_name", str(tmp_path / "saved"), "--text_columns", "sentence")
        + ["--label_column", "topic", "--test_size", "8"]
    )
    saved = check_run(output, {"accuracy", "macro_f1"})
    assert saved["splits"]["validation"] == {"source": "validation", "rows": 9}
    assert saved["splits"]["test"] == {"source": "carved from train", "seed": 42, "size": 8.0, "rows": 8}
    assert saved["splits"]["train"]["rows"] == 32 and saved["report_split"] == "test"
    student = AutoModelForSequenceClassification.from_pretrained(saved["results"][1]["output_dir"])
    assert student.config.id2label == {0: "sport", 1: "music", 2: "food"}  # a ClassLabel keeps its order


# ---- checks: a clear error, and output_dir untouched -----------------------------------------------


def write_csv(path: Path, rows: list[tuple[str, str]], header=("text", "label")) -> Path:
    lines = [",".join(header)] + [f'"{t}",{label}' for t, label in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def good_rows(n: int = 30, labels=("a", "b")) -> list[tuple[str, str]]:
    rng = random.Random(2)
    return [(words(rng, 4), labels[i % len(labels)]) for i in range(n)]


@pytest.fixture
def output(tmp_path):
    """An output folder holding an earlier run's file, which a refused run must leave as it was."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "results.json").write_text('{"earlier": "run"}')
    return folder


@pytest.fixture
def refused(cache, output, capsys):
    """Run the script with ``extra`` flags through ``run_script`` as the command line does: it must exit with
    code 2 and one ``error:`` line, no traceback, and leave ``output`` as it was. Returns the message."""

    def run(*extra: str) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            run_script(distill_glue.main, flags(cache, output, *extra))
        err = capsys.readouterr().err
        assert exited.value.code == 2
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
        assert errors[0].startswith("distill_glue.py: error: ")
        assert [p.name for p in output.iterdir()] == ["results.json"]
        assert (output / "results.json").read_text() == '{"earlier": "run"}'
        return errors[0].removeprefix("distill_glue.py: error: ")

    return run


def test_missing_column_names_the_columns_present(refused, tmp_path):
    path = write_csv(tmp_path / "d.csv", good_rows(), header=("review", "label"))
    message = refused("--dataset_name", str(path))
    assert "no column 'text'" in message and "['review', 'label']" in message


def test_label_never_seen_in_training(refused, tmp_path):
    train = write_csv(tmp_path / "train.csv", good_rows())
    test = write_csv(tmp_path / "test.csv", good_rows(6, labels=("a", "c")))
    message = refused("--dataset_name", str(train), "--test_file", str(test))
    assert "test split has labels ['c']" in message and "Training labels: ['a', 'b']" in message


def test_empty_and_null_texts(refused, tmp_path):
    rows = good_rows()
    rows[3], rows[7] = ("", "a"), ("   ", "b")
    path = write_csv(tmp_path / "d.csv", rows)
    message = refused("--dataset_name", str(path), "--test_size", "0", "--validation_size", "0.2")
    assert "rows with an empty or null text" in message and "drop_empty_texts" in message


def test_fewer_than_two_classes(refused, tmp_path):
    path = write_csv(tmp_path / "d.csv", good_rows(labels=("a",)))
    assert "at least two" in refused("--dataset_name", str(path))


def test_unknown_split_name(refused, tmp_path):
    path = write_csv(tmp_path / "d.csv", good_rows())
    message = refused("--dataset_name", str(path), "--validation_split", "dev")
    assert "validation_split='dev' is not a split" in message and "['train']" in message


def test_teacher_with_other_label_names(refused, tmp_path):
    teacher = tmp_path / "teacher"
    model = tiny_bert(num_labels=2, id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1})
    model.save_pretrained(teacher)
    path = write_csv(tmp_path / "d.csv", good_rows())
    message = refused("--dataset_name", str(path), "--teacher_model_name_or_path", str(teacher))
    assert "predicts the labels ['cat', 'dog']" in message and "data's labels are ['a', 'b']" in message


def test_a_data_file_that_is_not_there(refused):
    message = refused("--dataset_name", "nothere.csv")
    assert message == "No such data file: 'nothere.csv'."


def test_a_hub_dataset_that_cannot_be_reached(refused, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = refused("--dataset_name", "someone/no-such-dataset")
    assert message.startswith("Cannot read the data 'someone/no-such-dataset': ")


def test_a_teacher_that_is_not_there(refused, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_csv(tmp_path / "d.csv", good_rows())
    message = refused("--dataset_name", str(path), "--teacher_model_name_or_path", str(tmp_path / "nothere"))
    assert message.startswith(f"Cannot read the teacher '{tmp_path / 'nothere'}': ")


@pytest.mark.parametrize(
    "extra, expected",
    [
        (("--temperature", "0"), "temperature must be > 0, got 0.0"),  # DistillationConfig
        (("--students", "checkpoint"), "'checkpoint' but student_model_name_or_path is not set"),
        (("--max_seq_length", "1"), "max_seq_length must be >= 2, got 1"),  # DistillTextArguments
        (("--no_such_flag", "1"), "Unknown command-line arguments ['--no_such_flag', '1']"),
    ],
)
def test_a_refused_setting(refused, extra, expected):
    assert expected in refused(*extra)


def test_a_recipe_that_is_not_there(cache, output, capsys, tmp_path):
    with pytest.raises(SystemExit) as exited:
        run_script(
            distill_glue.main, ["--config", str(tmp_path / "nothere.yaml"), "--output_dir", str(output)]
        )
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith(f"distill_glue.py: error: Cannot read the recipe {tmp_path}")


def test_a_recipe_with_an_unknown_key(cache, output, capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.read_text() + "\ntemprature: 2\n")
    with pytest.raises(SystemExit) as exited:
        run_script(distill_glue.main, ["--config", str(recipe), "--output_dir", str(output)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("distill_glue.py: error: ") and "unknown recipe keys ['temprature']" in err
    assert len(err.splitlines()) == 1


def test_drop_empty_texts_drops_them(tmp_path):
    ds = DatasetDict(
        {"train": Dataset.from_dict({"text": ["w5", "", None, "w6"], "label": ["a", "b", "a", "b"]})}
    )
    kept = data.check_texts(ds, ["text"], drop=True)
    assert kept["train"]["text"] == ["w5", "w6"]


def test_a_teacher_with_the_labels_in_another_order_is_reordered():
    names = ("negative", "neutral", "positive")
    teacher = tiny_bert(num_labels=3, id2label={0: "positive", 1: "negative", 2: "neutral"})
    inputs = {"input_ids": torch.tensor([[2, 7, 9, 3]])}
    before = teacher(**inputs).logits[0]
    reorder_labels(teacher, names)
    after = teacher(**inputs).logits[0]
    assert teacher.config.id2label == dict(enumerate(names))
    # each name keeps its logit: the same numbers up to BLAS rounding (a permuted matmul is another computation)
    torch.testing.assert_close(after, before[[1, 2, 0]], rtol=1e-6, atol=1e-6)


# ---- file formats and labels, read by the library (no run) ------------------------------------------


def test_every_file_format_glob_and_validation_file_reads_the_same_rows(tmp_path):
    texts, labels = [f"w{i} w{i + 1}" for i in range(6)], ["b", "a", "b", "a", "b", "a"]
    table = Dataset.from_dict({"text": texts, "label": labels})
    table.to_csv(str(tmp_path / "d.csv"), index=False)
    table.to_csv(str(tmp_path / "d.tsv"), index=False, sep="\t")
    table.to_json(str(tmp_path / "d.jsonl"))
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.select(range(3)).to_csv(str(tmp_path / "part-0.csv"), index=False)
    table.select(range(3, 6)).to_csv(str(tmp_path / "part-1.csv"), index=False)
    for name in ("d.csv", "d.tsv", "d.jsonl", "d.parquet", "part-*.csv"):
        train = data.read_dataset(str(tmp_path / name))["train"]
        assert sorted(zip(train["text"], train["label"], strict=True)) == sorted(
            zip(texts, labels, strict=True)
        ), name
    splits = data.read_dataset(
        str(tmp_path / "d.parquet"),
        validation_file=str(tmp_path / "part-0.csv"),
        test_file=str(tmp_path / "d.tsv"),
    )
    assert sorted(splits) == ["test", "train", "validation"]
    assert splits["validation"]["text"] == texts[:3] and splits["test"]["label"] == labels


def test_null_labels_are_refused_with_their_rows():
    splits = DatasetDict(
        {"train": Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": ["x", None, "y", None]})}
    )
    with pytest.raises(ValueError, match=r"'label' has 2 null values \(rows \[1, 3\]\)"):
        data.label_names(splits, "label")
    scores = DatasetDict({"train": Dataset.from_dict({"text": ["a", "b"], "label": [0.5, None]})})
    with pytest.raises(ValueError, match=r"1 null values \(rows \[1\]\)"):
        data.label_names(scores, "label")  # regression too


@pytest.mark.parametrize(
    ("labels", "names", "ids"),
    [
        ([2, 0, 10, 0, 2], ("0", "2", "10"), [1, 0, 2, 0, 1]),  # integer labels: sorted as numbers
        (["pos", "neg", "neu", "neg"], ("neg", "neu", "pos"), [2, 0, 1, 0]),
        (["b", "a"], ("a", "b"), [1, 0]),
    ],
)
def test_each_row_gets_the_class_id_of_its_label(labels, names, ids):
    splits = DatasetDict({"train": Dataset.from_dict({"text": ["t"] * len(labels), "label": labels})})
    assert data.label_names(splits, "label") == names
    encoded = data.encode_labels(splits["train"], "label", names)
    assert encoded["label"] == ids
    assert [encoded.features["label"].int2str(i) for i in encoded["label"]] == [str(v) for v in labels]


def test_a_class_label_in_another_order_maps_by_name():
    feature = ClassLabel(names=["pos", "neg"])
    train = Dataset.from_dict(
        {"text": ["t"] * 3, "label": [0, 1, 0]}, features=Features(text=Value("string"), label=feature)
    )
    encoded = data.encode_labels(train, "label", ("neg", "pos"))
    assert encoded["label"] == [1, 0, 1]  # pos, neg, pos under the new order
