"""benchmarks/bench_on_policy_trl.py: its worker measures both trainers on tiny in-process models (no GGUF), and the
summary and table read what the workers wrote."""

from __future__ import annotations

import json

import pytest
from conftest import load_module

SETTINGS = {
    "steps": 3,
    "batch": 2,
    "max_new_tokens": 4,
    "max_prompt_length": 16,
    "lmbda": 1.0,
    "jsd_mixture": 0.5,
    "temperature": 0.9,
    "learning_rate": 2e-4,
    "student_layers": 1,
    "lm_chunk_size": 8,
    "dtype": "float32",
    "seed": 42,
    "device": "cpu",
}


def _bench():
    return load_module("benchmarks/bench_on_policy_trl.py")


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    pytest.importorskip("trl")
    bench = _bench()
    out = tmp_path_factory.mktemp("bench")
    runs = {}
    for variant in bench.VARIANTS:
        student, teacher, tokenizer, data = bench.tiny_setup(SETTINGS)
        runs[variant] = bench.measure(
            variant, student, teacher, tokenizer, data, SETTINGS, str(out / variant)
        )
    return bench, runs


def test_the_worker_times_every_step_but_the_first_and_its_generation(measured):
    _, runs = measured
    for variant, run in runs.items():
        timed = SETTINGS["steps"] - 1
        assert len(run["step_seconds"]) == len(run["generation_seconds"]) == timed, variant
        assert all(0 < g < s for g, s in zip(run["generation_seconds"], run["step_seconds"], strict=True)), (
            variant
        )
        assert all(1 <= t <= SETTINGS["max_new_tokens"] for t in run["completion_tokens_per_row"]), variant
        # TRL counts its normaliser from the placeholder completions (max_new_tokens per row), ours from the
        # generated ones
        assert all(n > 0 for n in run["loss_normaliser"]), variant
        assert run["peak_mib"] >= 0 and run["loaded_mib"] > 0, variant
    trl = runs["TRL GKDTrainer"]
    assert trl["loss_normaliser"] == [SETTINGS["batch"] * SETTINGS["max_new_tokens"]] * SETTINGS["steps"]


def test_both_trainers_compute_the_same_loss_on_the_same_rollouts(measured):
    """The comparison is of one computation: the same rows, the same seed and the same settings give the same
    rollouts (the tiny vocabulary of 47 ids is under transformers' default top_k of 50, see CAVEATS) and the same
    loss at every step, where TRL's normaliser (the placeholders) equals the tokens generated."""
    bench, runs = measured
    ours, trl = runs[bench.OURS], runs[bench.TRL]
    assert ours["completion_tokens_per_row"] == trl["completion_tokens_per_row"]
    assert len(ours["losses"]) == len(trl["losses"]) == SETTINGS["steps"]
    full = [n == SETTINGS["batch"] * SETTINGS["max_new_tokens"] for n in ours["loss_normaliser"]]
    assert any(full)
    for step, same_normaliser in enumerate(full):
        if same_normaliser:
            assert ours["losses"][step] == pytest.approx(trl["losses"][step], rel=1e-4), step


def test_summary_and_table_read_every_round(measured):
    bench, runs = measured
    rounds = {variant: [run, run] for variant, run in runs.items()}
    summary = bench.summarise(rounds)
    assert set(summary) == set(bench.VARIANTS)
    for s in summary.values():
        assert s["timed_steps"] == 2 * (SETTINGS["steps"] - 1)
        assert 0 < s["generation_share"] < 1
        assert s["min_step_seconds"] <= s["median_step_seconds"] <= s["max_step_seconds"]
    results = {
        "settings": SETTINGS,
        "rounds": 2,
        "device": "cpu",
        "threads": 1,
        "load_average_1min": [0.0, 0.0, 0.0],
        "summary": summary,
        "ratios": {"step_time_ours_over_trl": 1.0, "peak_ours_over_trl": 1.0},
    }
    text = bench.table(json.loads(json.dumps(results)))
    assert all(f"| {variant} |" in text for variant in bench.VARIANTS)
    assert "step time 1.00x" in text


def test_settings_that_break_the_timing_are_refused():
    bench = _bench()
    with pytest.raises(SystemExit):
        bench.main(["--lmbda", "0.5"])


@pytest.mark.slow
def test_the_benchmark_runs_each_variant_in_a_fresh_process(tmp_path):
    """End to end through subprocesses, tiny models: about a minute here (each process imports transformers)."""
    pytest.importorskip("trl")
    bench = _bench()
    out = tmp_path / "on_policy_trl.json"
    results = bench.main(
        ["--tiny", "--rounds", "1", "--steps", "2", "--batch", "2", "--max_new_tokens", "3",
         "--max_prompt_length", "16", "--threads", "1", "--cache_dir", str(tmp_path), "--out", str(out)]
    )  # fmt: skip
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(results))
    assert set(written["summary"]) == set(bench.VARIANTS)
    assert set(written["ratios"]) == {"step_time_ours_over_trl", "peak_ours_over_trl"}
    assert written["caveats"] == list(bench.CAVEATS)
