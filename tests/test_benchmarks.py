"""benchmarks/bench_gpu.py runs end to end at toy sizes on CPU (about 15 s) and writes a complete results file."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_module


def _bench():
    return load_module("benchmarks/bench_gpu.py")


def test_bench_gpu_tiny_writes_every_measurement(tmp_path):
    bench = _bench()
    returned = bench.main(["--tiny", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "gpu_tiny.json").read_text())
    assert results == json.loads(json.dumps(returned))
    pre = results["precompute"]
    assert pre["argmax_agree"] == 1.0 and pre["max_abs_diff_cache_vs_naive"] < 1e-2  # same logits
    for entry in (pre["naive"], *(v for k, v in pre.items() if k.startswith("cache_budget"))):
        assert entry["examples_per_s"] > 0 and entry["useful_tflops"] > 0
    for batch in bench.TINY.batch_sizes:
        steps = results["steps"][f"batch_{batch}"]
        assert set(steps["median_ms"]) == set(bench.VARIANTS)
        assert all(ms > 0 for ms in steps["median_ms"].values())
        assert steps["steps_timed_per_variant"] == (bench.TINY.steps - bench.TINY.warmup) * bench.TINY.rounds
    for kind in ("sequence_classification", "token_classification", "masked_lm_top_k"):
        rates = results["ceiling"][kind]
        assert rates["tokens_per_s"] == pytest.approx(
            rates["examples_per_s"] * results["ceiling"]["mean_tokens"]
        )


def test_near_free_teacher_has_the_real_output_shapes():
    bench = _bench()
    dataset = bench.make_dataset(6, vocab=500)
    lengths = [len(ids) for ids in dataset["input_ids"]]
    assert min(lengths) >= 8 and max(lengths) <= bench.MAX_LENGTH
    assert all(ids[0] == 2 and ids[-1] == 3 for ids in dataset["input_ids"])
    device = bench.Device("cpu")
    ids = torch.tensor([dataset["input_ids"][0][:8], dataset["input_ids"][1][:8]])
    for kind, shape in [
        ("sequence_classification", (2, bench.NUM_LABELS)),
        ("token_classification", (2, 8, bench.NUM_LABELS)),
        ("masked_lm_top_k", (2, 8, bench.FREE_VOCAB)),
    ]:
        teacher, _ = bench.free_teacher(kind, device)
        assert teacher(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.shape == shape


def _bench_offline():
    return load_module("benchmarks/bench_offline.py")


def test_every_offline_search_setting_is_a_valid_recipe_override():
    from hf_distill.text_classification import RecipeParser

    bench = _bench_offline()
    for setting, flags in bench.SEARCH.items():
        script, args = RecipeParser().parse_recipe_and_args(
            ["--config", str(bench.RECIPE), *bench.LAYERS, *flags]
        )
        assert script.students == ["layers"], setting
        if setting in bench.TWIN:  # shares the hard-label row of a setting with the same steps and training
            twin = RecipeParser().parse_recipe_and_args(
                ["--config", str(bench.RECIPE), *bench.LAYERS, *bench.SEARCH[bench.TWIN[setting]]]
            )
            assert (twin[1].num_train_epochs, twin[1].learning_rate) == (
                args.num_train_epochs,
                args.learning_rate,
            )
            assert twin[0].transfer_set == script.transfer_set


def _row(training, steps, val, test):
    return {
        "training": training,
        "steps": steps,
        "metrics": {"validation": {"accuracy": val}, "test": {"accuracy": test}},
    }


def test_offline_search_table_measures_each_kd_row_against_its_twin_and_chooses_on_validation():
    bench = _bench_offline()
    teacher = _row("fine-tuned", 0, 0.8, 0.8)
    shared, child = "transfer set (2 epochs)", "transfer set, T=4"
    assert bench.TWIN[child] == shared
    records = [
        {
            "kind": "search",
            "setting": shared,
            "seed": 42,
            "summary": {
                "results": [teacher, _row("hard labels", 610, 0.75, 0.74), _row("KD", 610, 0.76, 0.79)]
            },
        },
        {
            "kind": "search",
            "setting": child,
            "seed": 42,
            "summary": {
                "results": [teacher, _row("KD", 610, 0.78, 0.70), _row("KD + transfer set", 610, 0.776, 0.90)]
            },
        },
    ]
    table = bench.search_table(records)
    assert f"| {child} | KD | 610 | 78.00 | +3.00 | 70.00 |" in table
    assert f"| {shared} | KD | 610 | 76.00 | +1.00 | 79.00 |" in table
    # chosen on validation (78.00), not on test (90.00); rows within half a point of it are listed as ties
    assert f"Best KD row by validation accuracy: {child} (KD, 78.00)." in table
    assert table.endswith(
        f"points of it (ties on 1,000 validation snippets): {child} (KD + transfer set, 77.60, 610 steps)."
    )


def test_bench_on_policy_compares_each_seed_with_its_off_policy_twin():

    bench = load_module("benchmarks/bench_on_policy.py")

    def row(training, rkl, fkl, rouge, steps, step_seconds):
        metrics = {"reverse_kl": rkl, "forward_kl": fkl, "rouge_l": rouge}
        return {
            "training": training,
            "metrics": {"validation": metrics},
            "steps": steps,
            "step_seconds": step_seconds,
        }

    def seed(on_rkl):
        return {"rows": [row("off-policy (stage 1)", 2.0, 2.0, 0.1, 4, 1.0), row("on-policy", on_rkl, 1.9, 0.2, 10, 3.0),
                         row("off-policy", 1.0, 1.5, 0.3, 10, 1.0)]}  # fmt: skip

    met = bench.aggregate({"1": seed(0.7), "2": seed(0.75)})
    assert met["goal_met"] and met["per_seed"]["1"]["reverse_kl_reduction"] == pytest.approx(0.3)
    assert met["per_seed"]["1"]["equal_wall_time_off_policy_steps"] == pytest.approx(18.0)  # 6 steps at 3x
    missed = bench.aggregate({"1": seed(0.7), "2": seed(0.9)})  # 10% in one seed
    assert not missed["goal_met"] and "not met" in bench.table({"1": seed(0.7), "2": seed(0.9)})
