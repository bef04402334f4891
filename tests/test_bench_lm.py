"""benchmarks/bench_lm.py's summary: each cached teacher's gain over the CE twin of its own seed, and its share
of dense KD's gain, computed from the rows as an independent check writes them out here."""

from __future__ import annotations

import math

import pytest
from conftest import load_module


def _bench():
    return load_module("benchmarks/bench_lm.py")


def _summary(ce: float, live: float, topk: float, sampled: float) -> dict:
    def row(kind, training, mode, loss, **extra):
        metrics = {s: {"loss": loss, "perplexity": math.exp(loss)} for s in ("validation", "ood")}
        return {"name": kind, "kind": kind, "training": training, "mode": mode, "metrics": metrics, **extra}

    return {
        "rows": [
            row("teacher", "teacher", None, 2.0),
            row("layers", "CE only", None, ce, step_time_vs_ce=1.0),
            row("layers", "KD, live teacher", "live", live, step_time_vs_ce=1.6),
            row("layers", "KD, top-k cache", "topk", topk, step_time_vs_ce=1.05, cache_bytes_per_token=36.0),
            row(
                "layers",
                "KD, RS-KD cache",
                "sampled",
                sampled,
                step_time_vs_ce=1.02,
                cache_bytes_per_token=36.1,
            ),
        ]
    }


def test_gains_and_shares_are_taken_against_each_seeds_own_twin():
    bench = _bench()
    seeds = {"1": _summary(5.0, 4.0, 4.5, 4.1), "2": _summary(6.0, 5.5, 5.9, 5.6)}
    agg = bench.aggregate(seeds)
    assert agg["gains"]["live"]["validation_gain"] == pytest.approx([1.0, 0.5])
    assert agg["gains"]["sampled"]["validation_share_of_dense_gain"] == pytest.approx([0.9, 0.8])
    assert agg["gains"]["topk"]["validation_share_of_dense_gain"] == pytest.approx([0.5, 0.2])
    assert agg["rows"]["KD, RS-KD cache"]["cache_bytes_per_token"] == [36.1, 36.1]
    table = bench.table({"seeds": seeds, "gkd": None})
    assert (
        "| layers | KD, RS-KD cache | " in table and "85% (80%-90%)" in table
    )  # median (min-max) of the shares


def test_no_share_when_dense_kd_does_not_gain():
    bench = _bench()
    agg = bench.aggregate({"1": _summary(5.0, 5.2, 5.1, 5.0)})
    assert "validation_share_of_dense_gain" not in agg["gains"]["sampled"]  # a share of a loss is meaningless
    assert agg["gains"]["live"]["validation_gain"] == pytest.approx([-0.2])


def test_ece_per_row_over_the_seeds_and_absent_where_a_run_predates_it():
    bench = _bench()
    seeds = {
        "1": _summary(5.0, 4.0, 4.5, 4.1),
        "2": _summary(6.0, 5.5, 5.9, 5.6),
        "3": _summary(6.0, 5.5, 5.9, 5.6),
    }
    for seed, summary in seeds.items():
        for i, row in enumerate(summary["rows"]):
            if seed != "3":  # seed 3's run predates the ECE column
                row["metrics"]["validation"]["ece"] = 0.01 * (i + 1) + 0.001 * int(seed)
                row["metrics"]["ood"]["ece"] = 0.1 * (i + 1)
    agg = bench.aggregate(seeds)
    assert agg["rows"]["KD, top-k cache"]["validation_ece"] == pytest.approx([0.041, 0.042])
    table = bench.table({"seeds": seeds, "gkd": None})
    topk = next(line for line in table.splitlines() if "| KD, top-k cache |" in line)
    assert "| 0.042 (0.041-0.042) / 0.400 (0.400-0.400) |" in topk


def test_merge_folds_other_files_seeds_and_refuses_a_seed_twice(tmp_path):
    bench = _bench()
    out, other = tmp_path / "lm.json", tmp_path / "lm_s2.json"
    bench._save(out, {"seeds": {"1": _summary(5.0, 4.0, 4.5, 4.1)}, "gkd": None})
    bench._save(other, {"seeds": {"2": _summary(6.0, 5.5, 5.9, 5.6)}, "gkd": None})
    bench.main(["--out", str(out), "--merge", str(other)])
    merged = bench._records(out)
    assert sorted(merged["seeds"]) == ["1", "2"]
    assert merged["seeds"]["2"] == bench._records(other)["seeds"]["2"]
    with pytest.raises(SystemExit, match="seed 2 is in both"):
        bench.main(["--out", str(out), "--merge", str(other)])
    assert sorted(bench._records(out)["seeds"]) == ["1", "2"]  # nothing written is lost
