"""End to end: ``scripts/distill_glue.py`` on the offline recipe, with stand-in wheels and tiny models."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from launch import accelerate_launch
from offline_fixtures import fake_wheels
from transformers import AutoModelForSequenceClassification

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "distill_glue.py"
RECIPE = ROOT / "recipes" / "offline" / "rotten_tomatoes.yaml"

spec = importlib.util.spec_from_file_location("distill_glue", SCRIPT)
distill_glue = importlib.util.module_from_spec(spec)
spec.loader.exec_module(distill_glue)


def tiny_flags(cache: Path, output: Path) -> list[str]:
    """The offline recipe shrunk: 96 training texts of which 32 labelled, 32 evaluation examples."""
    return [
        "--config", str(RECIPE),
        "--cache_dir", str(cache),
        "--output_dir", str(output),
        "--max_seq_length", "16",
        "--max_train_samples", "96",
        "--num_labelled", "32",
        "--max_eval_samples", "32",
        "--teacher_num_train_epochs", "1",
        "--num_train_epochs", "1",
        "--compact_num_train_epochs", "1",
        "--per_device_train_batch_size", "16",
        "--speed_samples", "16",
        "--logging_steps", "1",
        "--disable_tqdm", "true",
    ]  # fmt: skip


@pytest.fixture
def cache(tmp_path):
    return fake_wheels(tmp_path / "cache")


def test_offline_recipe_end_to_end(cache, tmp_path, capsys):
    summary = distill_glue.main(tiny_flags(cache, tmp_path / "out"))
    out = capsys.readouterr().out
    assert "stage 1, fine-tuning the teacher" in out
    assert "| teacher (offline:all-MiniLM-L6-v2) |" in out  # the table

    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["results"] == json.loads(json.dumps(summary["results"]))
    rows = [(r["student"], r["training"]) for r in saved["results"]]
    assert rows == [
        (None, "fine-tuned on 32 labels"),
        ("layers", "hard labels"),
        ("layers", "KD"),
        ("compact", "hard labels"),
        ("compact", "KD"),
        ("compact", "KD + transfer set"),
    ]
    assert saved["labelled_examples"] == 32 and saved["train_examples"] == 96
    by_row = {(r["student"], r["training"]): r for r in saved["results"]}
    # Baseline and distilled runs of a student take the same steps: over the labelled rows (2 steps of
    # 16) for the layers student, over the whole transfer set (6 steps) for the compact one.
    assert {by_row["layers", t]["steps"] for t in ("hard labels", "KD")} == {2}
    assert {by_row["compact", t]["steps"] for t in ("hard labels", "KD", "KD + transfer set")} == {6}
    for row in saved["results"]:
        assert set(row["metrics"]) == {"validation", "test"}
        assert 0.0 <= row["metrics"]["test"]["accuracy"] <= 1.0
        assert row["examples_per_second"] > 0
    teacher = saved["results"][0]
    assert teacher["parameters"] > by_row["layers", "KD"]["parameters"] > 0
    assert by_row["compact", "KD"]["parameters"] != by_row["layers", "KD"]["parameters"]

    # Every student is saved with its tokenizer; distilled ones with a model card.
    for row in saved["results"][1:]:
        folder = Path(row["output_dir"])
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        assert model.config.num_labels == 2 and (folder / "tokenizer_config.json").exists()
        assert (folder / "README.md").exists() == (row["training"] != "hard labels")
    card = (Path(by_row["compact", "KD + transfer set"]["output_dir"]) / "README.md").read_text()
    assert str(RECIPE) in card and "python scripts/distill_glue.py --config" in card  # how to reproduce it
    layers = AutoModelForSequenceClassification.from_pretrained(by_row["layers", "KD"]["output_dir"])
    assert layers.config.num_hidden_layers == 3 and layers.config.distillation["teacher_num_layers"] == 4

    # A second run reuses the fine-tuned teacher (same folder, weights untouched) and its cached logits.
    teacher_dir = Path(teacher["output_dir"])
    assert teacher_dir.is_relative_to(cache / "teachers")
    weights = teacher_dir / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = distill_glue.main(tiny_flags(cache, tmp_path / "out2") + ["--students", "compact"])
    out = capsys.readouterr().out
    assert "reusing the fine-tuned teacher" in out and "stage 1, fine-tuning" not in out
    assert again["results"][0]["output_dir"] == teacher["output_dir"] and weights.stat().st_mtime_ns == stamp
    assert again["results"][0]["metrics"] == teacher["metrics"]
    assert [r["training"] for r in again["results"][1:]] == ["hard labels", "KD", "KD + transfer set"]


def test_two_cpu_processes(cache, tmp_path):
    """``accelerate launch`` with two CPU processes (gloo) runs the whole script."""
    # On failure, LaunchFailed shows each rank's own traceback and the launcher's whole output.
    script = [SCRIPT, *tiny_flags(cache, tmp_path / "out"), "--use_cpu", "true"]
    result = accelerate_launch(script, processes=2, log_dir=tmp_path / "logs", cwd=ROOT, timeout=600)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["num_processes"] == 2
    assert len(saved["results"]) == 6
    # The global batch is 2 x 16: half the steps of one process.
    assert {r["steps"] for r in saved["results"] if r["student"] == "compact"} == {3}
    assert result.stdout.count("| teacher (offline:all-MiniLM-L6-v2) |") == 1  # the main process prints


# ---- the pipeline's pieces (fast) ---------------------------------------------------------------


def test_needs_finetuning(tmp_path):
    from conftest import tiny_bert
    from transformers import BertModel

    from hf_distill.data import get_task
    from hf_distill.pipeline import needs_finetuning

    sst2, mnli = get_task("sst2"), get_task("mnli")
    backbone = tmp_path / "backbone"
    BertModel(tiny_bert(num_labels=2).config).save_pretrained(backbone)
    classifier = tmp_path / "classifier"
    tiny_bert(num_labels=2).save_pretrained(classifier)
    assert needs_finetuning(str(backbone), sst2, None)
    assert not needs_finetuning(str(classifier), sst2, None)
    assert needs_finetuning(str(classifier), mnli, None)  # 2 labels, MNLI has 3
    assert needs_finetuning(str(classifier), sst2, True) and not needs_finetuning(str(backbone), sst2, False)


def test_students_of_each_kind(tmp_path):
    from conftest import tiny_bert

    from hf_distill.data import get_task
    from hf_distill.pipeline import make_student
    from hf_distill.script_args import DistillGlueArguments

    teacher = tiny_bert(num_layers=4, num_labels=2)
    task = get_task("sst2")
    teacher.save_pretrained(tmp_path / "ckpt")
    script = DistillGlueArguments(
        task_name="sst2",
        students=["layers", "compact", "checkpoint"],
        student_num_layers=2,
        student_model_name_or_path=str(tmp_path / "ckpt"),
        compact_hidden_size=16,
        compact_num_layers=1,
    )
    layers = make_student("layers", teacher, script, task)
    assert layers.config.num_hidden_layers == 2 and layers.config.distillation["teacher_layers"] == [0, 3]
    compact = make_student("compact", teacher, script, task)
    assert (compact.config.hidden_size, compact.config.num_hidden_layers) == (16, 1)
    assert compact.config.vocab_size == teacher.config.vocab_size
    assert compact.config.id2label == {0: "negative", 1: "positive"}
    checkpoint = make_student("checkpoint", teacher, script, task)
    assert checkpoint.config.num_hidden_layers == 4 and checkpoint.config.id2label[1] == "positive"


def test_teacher_key_changes_with_what_changes_the_teacher(tokenizer):
    from conftest import random_classification_dataset

    from hf_distill import DistillationConfig
    from hf_distill.data import get_task
    from hf_distill.pipeline import teacher_key
    from hf_distill.script_args import DistillGlueArguments

    task, train = get_task("sst2"), random_classification_dataset(num_labels=2)
    args = DistillationConfig(output_dir="unused", report_to="none")
    script = DistillGlueArguments(task_name="sst2", teacher_model_name_or_path="a/b")
    key = teacher_key("a/b", train, task, script, args)
    assert key == teacher_key("a/b", train, task, script, args)
    assert key != teacher_key("a/c", train, task, script, args)
    assert key != teacher_key("a/b", train.select(range(8)), task, script, args)
    assert key != teacher_key("a/b", train, get_task("rte"), script, args)
    for change in ({"teacher_learning_rate": 1e-4}, {"teacher_num_train_epochs": 1.0}, {"teacher_seed": 7}):
        other = DistillGlueArguments(task_name="sst2", teacher_model_name_or_path="a/b", **change)
        assert key != teacher_key("a/b", train, task, other, args), change
    # the students' settings do not change the teacher
    other = DistillGlueArguments(task_name="sst2", teacher_model_name_or_path="a/b", students=["compact"])
    assert key == teacher_key("a/b", train, task, other, args)


def test_measure_speed_and_table(tokenizer):
    from conftest import random_classification_dataset, tiny_bert

    from hf_distill.pipeline import format_table, measure_speed

    rows = random_classification_dataset(n=8, num_labels=2).remove_columns("labels")
    speed = measure_speed(tiny_bert(num_labels=2), rows, tokenizer, num_samples=8, batch_size=4)
    assert speed > 0

    def row(name, training, accuracy, parameters, speed):
        metrics = {"test": {"accuracy": accuracy}}
        return {"name": name, "training": training, "metrics": metrics, "parameters": parameters,
                "examples_per_second": speed}  # fmt: skip

    summary = {
        "task": "rotten_tomatoes",
        "report_split": "test",
        "results": [row("teacher", "t", 0.8, 20e6, 100.0), row("student", "KD", 0.76, 5e6, 400.0)],
    }
    table = format_table(summary).splitlines()
    assert table[0].startswith("| model | training | accuracy (test) |")
    assert table[-1] == "| student | KD | 76.00 | 95.0% | 5.0M | 400 | 4.0x |"
