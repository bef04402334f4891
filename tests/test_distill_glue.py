"""End to end: ``scripts/distill_glue.py`` on the offline recipe, with stand-in wheels and tiny models."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_module
from launch import accelerate_launch
from offline_fixtures import fake_wheels
from transformers import AutoModelForSequenceClassification

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "distill_glue.py"
RECIPE = ROOT / "recipes" / "offline" / "rotten_tomatoes.yaml"

distill_glue = load_module("scripts/distill_glue.py")


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
    # The plan comes first: the teacher to fine-tune and every student run with its steps.
    plan = out[out.index("hf_distill: the plan") : out.index("stage 1, fine-tuning the teacher")]
    assert "stage 1, teacher: offline:all-MiniLM-L6-v2, fine-tuned on 32 labelled examples" in plan
    assert "teacher logits: over 96 training texts, computed once and cached" in plan
    for row in summary["results"][1:]:
        assert f"{row['student']} student, {row['training']}: {row['steps']} steps" in plan
        # then one line per finished stage, with its wall time
        assert re.search(
            rf"done: stage 2, {row['student']} student, {re.escape(row['training'])} .* in [0-9.]+ s", out
        )
    assert re.search(r"done: stage 1, the teacher .* in [0-9.]+ s", out)

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
    # The run's picture beside results.json, one point per row; each card shows its copy.
    picture = (tmp_path / "out" / "results.png").read_bytes()
    assert picture.startswith(b"\x89PNG")
    assert "](results.png)" in card
    for row in saved["results"][1:]:
        folder = Path(row["output_dir"])
        assert (folder / "results.png").exists() == (row["training"] != "hard labels")
        if row["training"] != "hard labels":
            assert (folder / "results.png").read_bytes() == picture
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


def sst2_task(label_names=("negative", "positive")):
    from hf_distill.text_classification.data import TextTask

    return TextTask("sst2", "nyu-mll/glue", "sst2", ("sentence",), label_names, metric="glue")


def test_which_checkpoints_serve_as_teacher(tmp_path):
    from conftest import tiny_bert
    from transformers import AutoConfig, BertModel

    from hf_distill.text_classification.teacher import labels_fit

    backbone = tmp_path / "backbone"
    BertModel(tiny_bert(num_labels=2).config).save_pretrained(backbone)
    generic = tmp_path / "generic"
    tiny_bert(num_labels=2).save_pretrained(generic)  # LABEL_0, LABEL_1: matched by position
    named = tmp_path / "named"
    tiny_bert(num_labels=2, id2label={0: "positive", 1: "negative"}).save_pretrained(named)
    sst2, mnli = sst2_task(), sst2_task(("entailment", "neutral", "contradiction"))
    assert not labels_fit(AutoConfig.from_pretrained(backbone), sst2, "teacher")  # fine-tuned first
    assert labels_fit(AutoConfig.from_pretrained(generic), sst2, "teacher")
    assert not labels_fit(AutoConfig.from_pretrained(generic), mnli, "teacher")  # 2 labels, MNLI has 3
    assert labels_fit(AutoConfig.from_pretrained(named), sst2, "teacher")  # same names, reordered on load
    with pytest.raises(
        ValueError, match=r"\['positive', 'negative'\].*\['entailment', 'neutral', 'contradiction'\]"
    ):
        labels_fit(AutoConfig.from_pretrained(named), mnli, "teacher")


def test_students_of_each_kind(tmp_path):
    from conftest import tiny_bert

    from hf_distill.text_classification import DistillTextArguments
    from hf_distill.text_classification.students import make_student

    teacher = tiny_bert(num_layers=4, num_labels=2)
    task = sst2_task()
    tiny_bert(num_layers=4, num_labels=2, id2label={0: "positive", 1: "negative"}).save_pretrained(
        tmp_path / "ckpt"
    )
    script = DistillTextArguments(
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
    checkpoint = make_student("checkpoint", teacher, script, task)  # its labels reordered by name
    assert checkpoint.config.num_hidden_layers == 4 and checkpoint.config.id2label == {
        0: "negative",
        1: "positive",
    }


def test_teacher_key_changes_with_what_changes_the_teacher(tokenizer):
    from conftest import random_classification_dataset

    from hf_distill import DistillationConfig
    from hf_distill.text_classification import DistillTextArguments
    from hf_distill.text_classification.teacher import teacher_key

    task, train = sst2_task(), random_classification_dataset(num_labels=2)
    args = DistillationConfig(output_dir="unused", report_to="none")
    script = DistillTextArguments(teacher_model_name_or_path="a/b")
    key = teacher_key("a/b", train, task, script, args)
    assert key == teacher_key("a/b", train, task, script, args)
    assert key != teacher_key("a/c", train, task, script, args)
    assert key != teacher_key("a/b", train.select(range(8)), task, script, args)
    assert key != teacher_key("a/b", train, sst2_task(("bad", "good")), script, args)
    for change in ({"teacher_learning_rate": 1e-4}, {"teacher_num_train_epochs": 1.0}, {"teacher_seed": 7}):
        other = DistillTextArguments(teacher_model_name_or_path="a/b", **change)
        assert key != teacher_key("a/b", train, task, other, args), change
    # the students' settings do not change the teacher
    other = DistillTextArguments(teacher_model_name_or_path="a/b", students=["compact"])
    assert key == teacher_key("a/b", train, task, other, args)


def test_measure_speed_and_table(tokenizer):
    from conftest import random_classification_dataset, tiny_bert

    from hf_distill.text_classification import format_table
    from hf_distill.text_classification.evaluation import measure_speed

    rows = random_classification_dataset(n=8, num_labels=2).remove_columns("labels")
    speed = measure_speed(tiny_bert(num_labels=2), rows, tokenizer, num_samples=8, batch_size=4)
    assert speed > 0

    def row(name, training, accuracy, parameters, speed):
        metrics = {"test": {"accuracy": accuracy}}
        return {"name": name, "training": training, "metrics": metrics, "parameters": parameters,
                "examples_per_second": speed}  # fmt: skip

    summary = {
        "main_metric": "accuracy",
        "report_split": "test",
        "results": [row("teacher", "t", 0.8, 20e6, 100.0), row("student", "KD", 0.76, 5e6, 400.0)],
    }
    table = format_table(summary).splitlines()
    assert table[0].startswith("| model | training | accuracy (test) |")
    assert table[-1] == "| student | KD | 76.00 | 95.0% | 5.0M | 400 | 4.0x |"


_KILL_AFTER_CHECKPOINT = """
import os, runpy, signal, sys
from transformers import Trainer

save = Trainer._save_checkpoint

def save_then_die(self, *args, **kwargs):  # SIGKILL right after a checkpoint of one run
    save(self, *args, **kwargs)
    if self.args.output_dir.endswith({slug!r}) and self.state.global_step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)

Trainer._save_checkpoint = save_then_die
sys.argv = [{script!r}, *{flags!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.slow
def test_killed_run_resumes_without_retraining_finished_stages(cache, tmp_path, capsys):
    """SIGKILL in stage 2 after a checkpoint; ``--resume_from_checkpoint true`` keeps the teacher and the
    finished runs, continues the cut-off run from its checkpoint, and ends with the uninterrupted run's weights."""
    from safetensors.torch import load_file

    # Random sampling: Accelerate's seedable sampler replays the cut-off epoch's order (the recipe's
    # group_by_length sampler draws a new order for it on resume, so weights would differ after the cut).
    extra = ["--students", "compact", "--save_strategy", "steps", "--save_steps", "1"]
    extra += ["--train_sampling_strategy", "random"]
    reference = tmp_path / "reference"
    distill_glue.main([*tiny_flags(cache, reference), *extra])  # stage 1 fine-tunes and caches the teacher

    output = tmp_path / "out"
    killer = tmp_path / "kill.py"
    flags = [*tiny_flags(cache, output), *extra]
    killer.write_text(
        _KILL_AFTER_CHECKPOINT.format(slug="compact-kd", step=3, script=str(SCRIPT), flags=flags)
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, str(killer)], env=env, capture_output=True, text=True, cwd=ROOT)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (output / "compact-kd" / "checkpoint-3").is_dir() and not (
        output / "compact-kd" / "hf_distill_run.json"
    ).exists()
    finished = output / "compact-hard-labels" / "model.safetensors"
    stamp = finished.stat().st_mtime_ns
    capsys.readouterr()

    summary = distill_glue.main([*flags, "--resume_from_checkpoint", "true"])
    out = capsys.readouterr().out
    assert "reusing the fine-tuned teacher" in out and "stage 1, fine-tuning" not in out
    assert "compact student, hard labels: finished before, kept" in out
    assert f"resumed from {output / 'compact-kd' / 'checkpoint-3'}" in out
    assert finished.stat().st_mtime_ns == stamp  # the finished run was not trained again
    expected = json.loads((reference / "results.json").read_text())
    for row, want in zip(summary["results"][1:], expected["results"][1:], strict=True):
        got = load_file(Path(row["output_dir"]) / "model.safetensors")
        ref = load_file(Path(want["output_dir"]) / "model.safetensors")
        for name, value in ref.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=f"{row['training']}: {name}")
        for split, metrics in want["metrics"].items():
            assert row["metrics"][split] == pytest.approx(metrics)


def test_ensemble_of_teacher_seeds(cache, tmp_path):
    """``teacher_seeds``: one fine-tuned teacher per seed, the ensemble's own score, and a student of each."""
    flags = tiny_flags(cache, tmp_path / "out") + [
        "--students",
        "layers",
        "--transfer_set",
        "layers",
        "--train_baseline",
        "false",
    ]
    summary = distill_glue.main([*flags, "--teacher_seeds", "1", "2"])
    rows = [(r["name"], r["training"]) for r in summary["results"]]
    assert rows == [
        ("teacher (offline:all-MiniLM-L6-v2, seed 1)", "fine-tuned on 32 labels"),
        ("teacher (offline:all-MiniLM-L6-v2, seed 2)", "fine-tuned on 32 labels"),
        ("ensemble of 2 teachers (seeds 1, 2)", "mean of the teachers' soft labels"),
        ("layers student", "KD"),
        ("layers student", "KD + transfer set"),
        ("layers student", "KD from the ensemble"),
        ("layers student", "KD from the ensemble + transfer set"),
    ]
    first, second, ensemble = summary["results"][:3]
    assert first["output_dir"] != second["output_dir"]
    hashes = summary["teacher_weights_hash"]
    assert len(hashes) == 2 and hashes[0] != hashes[1]
    assert set(ensemble["metrics"]["test"]) == {"accuracy", "macro_f1"}
    card = (Path(summary["results"][5]["output_dir"]) / "README.md").read_text()
    assert "ensemble, seeds 1, 2" in card and f"{hashes[0]}, {hashes[1]}" in card


def test_cached_ensemble_logits_are_the_live_mixture(tmp_path, tokenizer):
    from conftest import config, random_classification_dataset, tiny_bert

    from hf_distill import ensemble_logits, precompute_teacher_logits
    from hf_distill.text_classification.run import _ensemble_logits

    teachers = [tiny_bert(seed=1), tiny_bert(seed=2)]
    data = random_classification_dataset(6)
    cached = [
        precompute_teacher_logits(t, data, cache_dir=tmp_path / "logits", dtype="float32") for t in teachers
    ]
    args = config(tmp_path, temperature=3.0, teacher_weights=[0.25, 0.75])
    mixture = _ensemble_logits(cached, args)
    for i, row in enumerate(data):
        inputs = {k: torch.tensor([row[k]]) for k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.no_grad():
            live = ensemble_logits([t.eval()(**inputs).logits for t in teachers], [0.25, 0.75], 3.0)
        torch.testing.assert_close(torch.tensor(mixture[i]["teacher_logits"]), live[0], rtol=0, atol=1e-5)


def test_hidden_loss_from_the_recipe(cache, tmp_path):
    """A hidden-state loss runs the teacher live beside its cached logits; the baseline has no teacher term."""
    flags = tiny_flags(cache, tmp_path / "out") + [
        "--students",
        "layers",
        "--transfer_set",
        "layers",
        "--hidden_loss",
        "cosine",
    ]
    summary = distill_glue.main([*flags, "--hidden_loss_weight", "1.0"])
    losses = {r["training"]: r["train_losses"] for r in summary["results"][1:]}
    assert {"kd_loss", "ce_loss", "hidden_loss"} <= set(losses["KD"]) and losses["KD"]["hidden_loss"] > 0
    assert set(losses["hard labels"]) == {"loss", "ce_loss"}
    card = (Path(summary["results"][2]["output_dir"]) / "README.md").read_text()
    assert "| hidden_loss | `cosine` (weight 1.0) |" in card


def test_ensemble_accuracy_is_that_of_the_mean_soft_labels(tmp_path, tokenizer):
    from conftest import config, random_classification_dataset, tiny_bert

    from hf_distill.text_classification.data import TextTask
    from hf_distill.text_classification.evaluation import evaluate_ensemble

    task = TextTask("t", "d", None, ("text",), ("a", "b", "c"))  # accuracy and macro-F1
    data = random_classification_dataset(24, seed=5)
    models = [tiny_bert(seed=s).eval() for s in (1, 2, 3)]
    args = config(tmp_path, train_sampling_strategy="group_by_length", per_device_eval_batch_size=4)
    got = evaluate_ensemble(models, task, {"test": data}, args, tokenizer)["test"][
        "accuracy"
    ]  # rows reordered
    with torch.no_grad():
        probs = []
        for row in data:
            inputs = {k: torch.tensor([row[k]]) for k in ("input_ids", "attention_mask", "token_type_ids")}
            probs.append(torch.stack([m(**inputs).logits[0].softmax(-1) for m in models]).mean(0))
    expected = (torch.stack(probs).argmax(-1) == torch.tensor(data["labels"])).float().mean().item()
    assert got == pytest.approx(expected)


def test_push_to_hub_publishes_the_best_distilled_row_on_validation():
    from hf_distill.text_classification.report import HARD_LABELS, RunResult, best_distilled

    def row(name, student, training, validation, test):
        metrics = {"validation": {"accuracy": validation}, "test": {"accuracy": test}}
        return RunResult(name, student, training, metrics, parameters=1, examples_per_second=1.0)

    results = [
        row("teacher", None, "fine-tuned on 10 labels", 0.99, 0.99),  # the teacher: never published
        row("layers hard", "layers", HARD_LABELS, 0.95, 0.95),  # a hard-label row: never published
        row("layers KD", "layers", "KD", 0.70, 0.90),  # best distilled on test only
        row("compact KD", "compact", "KD", 0.80, 0.60),  # best distilled on validation
    ]
    assert best_distilled(results, "accuracy").name == "compact KD"
    without_validation = [
        RunResult(r.name, r.student, r.training, {"test": r.metrics["test"]}, 1, 1.0) for r in results
    ]
    assert best_distilled(without_validation, "accuracy").name == "layers KD"  # then the report split
