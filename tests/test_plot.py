"""The results picture: one point per model row where the rows say, a PNG that is not blank, range bars."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import load_module
from matplotlib.image import imread

from hf_distill.text_classification.plot import plot_results

ROOT = Path(__file__).resolve().parent.parent


def row(name, student, training, accuracy, speed, parameters):
    return {
        "name": name,
        "student": student,
        "training": training,
        "metrics": {"validation": {"accuracy": accuracy - 0.01}, "test": {"accuracy": accuracy}},
        "examples_per_second": speed,
        "parameters": parameters,
    }


def summary(rows, **extra):
    return {
        "task": {"name": "news", "dataset": "news.csv", "dataset_config": None},
        "main_metric": "accuracy",
        "report_split": "test",
        "device": "cpu",
        "torch_threads": 2,
        "results": rows,
        **extra,
    }


ROWS = [
    row("teacher (some/teacher)", None, "fine-tuned on 100 labels", 0.90, 100.0, 22_000_000),
    row("layers student", "layers", "hard labels", 0.85, 200.0, 17_000_000),
    row("layers student", "layers", "KD", 0.87, 200.0, 17_000_000),
    row("compact student", "compact", "KD", 0.80, 2000.0, 4_000_000),
]


def pixels_vary(path: Path) -> float:
    image = imread(path)
    return float(np.asarray(image)[..., :3].std())


def test_one_point_per_row_on_the_report_split(tmp_path):
    path = tmp_path / "results.png"
    points = plot_results(summary(ROWS), path)
    assert [(p.examples_per_second, p.score, p.parameters) for p in points] == [
        (r["examples_per_second"], pytest.approx(100 * r["metrics"]["test"]["accuracy"]), r["parameters"])
        for r in ROWS
    ]
    assert [p.label for p in points] == [
        "teacher, fine-tuned on 100 labels (22.0M)",
        "layers student, hard labels (17.0M)",
        "layers student, KD (17.0M)",
        "compact student, KD (4.0M)",
    ]
    assert [p.kind for p in points] == ["teacher", "layers", "layers", "compact"]
    assert path.read_bytes().startswith(b"\x89PNG") and pixels_vary(path) > 0.05


def test_another_main_metric_and_split(tmp_path):
    rows = [dict(r, metrics={"validation": {"pearson": 0.5 + i / 10}}) for i, r in enumerate(ROWS)]
    points = plot_results(summary(rows, main_metric="pearson", report_split="validation"), tmp_path / "p.png")
    assert [p.score for p in points] == pytest.approx([50, 60, 70, 80])


def test_the_benchmark_draws_medians_with_min_max_bars(tmp_path):
    bench = load_module("benchmarks/bench_offline.py")
    records = []
    for seed, (acc, speed) in zip(
        (42, 43, 44), ((0.80, 1000.0), (0.84, 1400.0), (0.82, 1100.0)), strict=True
    ):
        rows = [
            row(f"teacher (t, seed {seed})", None, "fine-tuned", 0.9, 100.0, 22_000_000),
            row("compact student", "compact", "KD", acc, speed, 4_000_000),
        ]
        records.append({"kind": "seed", "seed": seed, "summary": summary(rows)})
    path = tmp_path / "offline.png"
    teacher, student = bench.seed_plot(records, path)
    assert (student.score, student.score_range) == (pytest.approx(82), (pytest.approx(80), pytest.approx(84)))
    assert (student.examples_per_second, student.speed_range) == (1100.0, (1000.0, 1400.0))
    assert teacher.score_range == (pytest.approx(90), pytest.approx(90)) and teacher.label.startswith(
        "teacher,"
    )
    assert pixels_vary(path) > 0.05
    assert bench.seed_plot(records, tmp_path / "none.png", kind="ensemble") == []


def test_a_nan_metric_is_left_out_of_the_picture(tmp_path):
    rows = [ROWS[0], dict(ROWS[1], metrics={"test": {"accuracy": float("nan")}})]
    points = plot_results(summary(rows), tmp_path / "nan.png")
    assert len(points) == 2 and pixels_vary(tmp_path / "nan.png") > 0.05
