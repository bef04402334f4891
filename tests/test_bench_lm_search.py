"""benchmarks/bench_lm_search.py: every point is a valid override of the LM recipe, points share a CE twin only
when nothing the CE student sees differs, and each gain is measured against that twin."""

from __future__ import annotations

import pytest
from conftest import load_module

from hf_distill.language_modeling import LMRecipeParser


@pytest.fixture(scope="module")
def bench():
    return load_module("benchmarks/bench_lm_search.py")


def _parse(bench, flags):
    cmd = bench.command("p", flags, bench.ROOT / "unused", with_twin=True)
    return LMRecipeParser().parse_recipe_and_args(cmd[cmd.index("--config") :])


def _value(parsed, key):
    return next(getattr(part, key) for part in parsed if hasattr(part, key))


def test_every_point_parses_and_sets_its_flags(bench):
    for name, flags in bench.POINTS.items():
        parsed = _parse(bench, flags)
        assert _value(parsed, "teacher_modes") == ["live"], name
        for key, value in flags.items():
            assert _value(parsed, key) == value, (name, key)


def test_points_with_one_twin_key_train_the_same_ce_student(bench):
    ce_settings = (
        "student_num_layers",
        "learning_rate",
        "max_steps",
        "max_train_blocks",
        "seed",
        "warmup_steps",
        "lr_scheduler_type",
    )
    by_twin = {}
    for name, flags in bench.POINTS.items():
        parsed = _parse(bench, flags)
        by_twin.setdefault(bench.twin_key(flags), []).append((name, [_value(parsed, k) for k in ce_settings]))
    assert len(by_twin) > 1  # the search changes what the CE student sees in some points
    for points in by_twin.values():
        assert len({tuple(v) for _, v in points}) == 1, points
    # and points with different keys differ in what the CE student sees
    firsts = [points[0][1] for points in by_twin.values()]
    assert len({tuple(v) for v in firsts}) == len(firsts)


def _results(kd_val, kd_ood, ce=None):
    def row(training, val, ood):
        metrics = {
            s: {"loss": v, "perplexity": 2.0**v, "ece": 0.01} for s, v in (("validation", val), ("ood", ood))
        }
        return {"training": training, "metrics": metrics}

    rows = [{"training": "teacher", "metrics": {}}, row("KD, live teacher", kd_val, kd_ood)]
    return {"rows": rows + ([row("CE only", *ce)] if ce else [])}


def test_gain_is_over_the_twin_of_its_key_and_the_table_orders_by_validation(bench):
    base = bench.point_record("base", {}, ["cmd"], _results(5.0, 6.0, ce=(5.3, 6.2)))
    alpha = bench.point_record("alpha", {"alpha": 0.9}, ["cmd"], _results(4.9, 6.1))  # no twin: shares base's
    deep = bench.point_record("deep", {"student_num_layers": 15}, ["cmd"], _results(4.5, 5.0, ce=(4.55, 5.5)))
    orphan = bench.point_record(
        "orphan", {"learning_rate": 1.0}, ["cmd"], _results(1.0, 1.0)
    )  # twin never ran
    alpha["kd"]["validation"]["ece"] = None  # a point run before results.json had ECE
    gains = bench.gains({"base": base, "alpha": alpha, "deep": deep, "orphan": orphan})
    assert gains["base"]["validation"] == pytest.approx(0.3)
    assert gains["alpha"]["validation"] == pytest.approx(0.4)
    assert gains["alpha"]["ood"] == pytest.approx(0.1)
    assert gains["deep"]["validation"] == pytest.approx(0.05)  # its own twin, not base's
    assert "orphan" not in gains
    table = bench.table({"points": {"base": base, "alpha": alpha, "deep": deep, "orphan": orphan}})
    body = [line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:]]
    # ordered by validation gain, although deep has the lowest validation loss and base the best OOD gain
    assert body == ["alpha", "base", "deep"]
    assert table.splitlines()[2].endswith("| +0.400 | +0.100 |  |")


def test_points_run_over_the_rate_the_search_held_not_the_recipes_current_one(bench):
    """The recipe now decays its rate from 8e-4; a point that sets no rate still runs as it ran, at 2e-4 held."""
    recipe = LMRecipeParser().parse_recipe_and_args(["--config", str(bench.RECIPE), "--output_dir", "unused"])
    assert (_value(recipe, "learning_rate"), _value(recipe, "lr_scheduler_type")) == (8e-4, "linear")
    held = _parse(bench, bench.POINTS["d10_a08"])
    assert (_value(held, "learning_rate"), _value(held, "lr_scheduler_type")) == (2e-4, "constant_with_warmup")
    decayed = _parse(bench, bench.POINTS["d10_lin_lr8e-4_a08"])
    assert (_value(decayed, "learning_rate"), _value(decayed, "lr_scheduler_type")) == (8e-4, "linear")
