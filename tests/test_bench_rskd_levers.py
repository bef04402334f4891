"""benchmarks/bench_rskd_levers.py: a lever's share of dense KD's gain, set against the CE and dense rows of the
same seed in the reference file."""

from __future__ import annotations

import pytest
from conftest import load_module


def _bench():
    return load_module("benchmarks/bench_rskd_levers.py")


def _row(kind, mode, loss, ece=None, **extra):
    metrics = {s: {"loss": loss + (1.0 if s == "ood" else 0.0), "ece": ece} for s in ("validation", "ood")}
    return {"kind": kind, "mode": mode, "metrics": metrics, **extra}


REFERENCE = {"rows": [_row("teacher", None, 2.0), _row("layers", None, 5.0), _row("layers", "live", 4.0),
                      _row("layers", "sampled", 4.15, cache_bytes_per_token=36.0)]}  # fmt: skip


def test_the_share_is_taken_against_the_reference_twin_and_dense_run():
    bench = _bench()
    run = {
        "rows": [
            _row("teacher", None, 2.0),
            _row("layers", "sampled", 4.08, ece=0.02, cache_bytes_per_token=39.5),
        ]
    }
    out = bench.shares(REFERENCE, run)
    assert out["validation"]["share_of_dense_gain"] == pytest.approx(0.92)
    assert out["validation"]["gain"] == pytest.approx(0.92)
    assert out["validation"]["ece"] == 0.02 and out["cache_bytes_per_token"] == 39.5
    assert "ce_minus_reference_ce" not in out["validation"]  # no CE twin trained in this run


def test_a_run_with_its_own_ce_twin_records_its_distance_from_the_reference():
    bench = _bench()
    run = {"rows": [_row("layers", None, 5.001), _row("layers", "sampled", 4.5, cache_bytes_per_token=40.0)]}
    out = bench.shares(REFERENCE, run)
    assert out["ood"]["ce_minus_reference_ce"] == pytest.approx(0.001)
    assert out["ood"]["share_of_dense_gain"] == pytest.approx(0.5)  # still against the reference's twin


def test_no_share_without_a_dense_gain_and_a_refusal_without_the_rows():
    bench = _bench()
    flat = {"rows": [_row("layers", None, 5.0), _row("layers", "live", 5.1)]}
    out = bench.shares(flat, {"rows": [_row("layers", "sampled", 4.9, cache_bytes_per_token=36.0)]})
    assert "share_of_dense_gain" not in out["validation"]
    with pytest.raises(ValueError, match="CE and live rows"):
        bench.shares({"rows": [_row("layers", None, 5.0)]}, {"rows": [_row("layers", "sampled", 4.9)]})


def test_the_table_gives_median_and_range_over_seeds_per_lever():
    bench = _bench()
    assert bench.lever_name(4, 8, 1.0) == "head4_n8" and bench.lever_name(0, 12, 1.5) == "head0_n12_tau1.5"
    assert bench.lever_name(3, 13, 1.0, counts=False, scheme="systematic") == "head3_n13_draws_systematic"
    assert bench.lever_name(3, 15, 1.0, counts=False, head_quantized=True) == "head3q8_n15_draws"
    assert (
        bench.lever_name(3, 14, 1.0, False, "systematic", True, "adaptive")
        == "head3q8_n14_draws_systematic_adaptive"
    )
    seeds = {
        str(s): {"cache_bytes_per_token": 39.0, "validation": {"share_of_dense_gain": x, "ece": 0.01},
                 "ood": {"share_of_dense_gain": x - 0.1}}
        for s, x in ((42, 0.898), (43, 0.95), (44, 0.91))
    }  # fmt: skip
    table = bench.table({"levers": {"head4_n8": seeds}})
    # one decimal: a share of 89.8% is not printed as a 90% that meets the goal
    row = "| head4_n8 | 42, 43, 44 | 39.0 (39.0-39.0) | 91.0% (89.8%-95.0%) | 81.0% (79.8%-85.0%) | 0.010 (0.010-0.010) |"
    assert row in table


def test_a_lever_trains_at_the_rate_and_schedule_of_its_reference_rows():
    """Not the recipe's current ones: a held-rate reference (its file written before the schedule was recorded)
    gives a held-rate lever, a decayed one a decayed lever."""
    from hf_distill.language_modeling import LMRecipeParser

    bench = _bench()
    old = {"settings": {"learning_rate": 2e-4}}
    new = {"settings": {"learning_rate": 8e-4, "lr_scheduler_type": "linear", "warmup_steps": 3}}
    for reference, expected in ((old, (2e-4, "constant_with_warmup", 5)), (new, (8e-4, "linear", 3))):
        flags = bench.reference_training_flags(reference)
        parsed = LMRecipeParser().parse_recipe_and_args(
            ["--config", str(bench.ROOT / "recipes/offline/smollm2.yaml"), "--output_dir", "unused", *flags]
        )
        args = next(part for part in parsed if hasattr(part, "lr_scheduler_type"))
        assert (args.learning_rate, args.lr_scheduler_type, args.warmup_steps) == expected
