"""On-policy distillation of an instruction model over seeds: does training on the student's own completions buy
what it should?

Each seed is one full run of ``scripts/distill_lm.py --config recipes/offline/smollm2_instruct.yaml`` (its own
``main``) with ``--seed`` and ``--data_seed`` set: stage 1 heals the layer-cut student off-policy, then from the same
stage-1 student the on-policy run and its off-policy twin take the same number of steps, and CE (SFT on the
teacher's completions) takes as many steps in all. The summary gives, over the seeds, median (min-max) of the
held-out metrics of every regime (``reverse_kl``: KL(student || teacher) per token on the student's own samples,
what on-policy training optimises; ``forward_kl`` on the teacher's completions; ``rouge_l`` against the teacher's
greedy completion), the on-policy run's reduction of held-out reverse KL against its off-policy twin in every seed
(goal: at least 20% in every seed, ranges apart), its step time against the twin's, and where it loses.

At equal wall time: the on-policy step also generates, so it is slower; ``equal_wall_time`` reads off how many
off-policy steps the on-policy run's stage-2 time would have bought (the twin's step time), without a second run.

    python benchmarks/bench_on_policy.py --seeds 42 43 44 --out benchmarks/results/on_policy.json
    python benchmarks/bench_on_policy.py --summarize --out benchmarks/results/on_policy.json

Extra flags after ``--`` go to ``scripts/distill_lm.py`` (e.g. ``-- --on_policy_steps 10``). Timings count only
from a machine otherwise idle: the summary records the load average beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/offline/smollm2_instruct.yaml"
METRICS = ("reverse_kl", "forward_kl", "rouge_l")
GOAL = 0.20  # on-policy's held-out reverse KL at least 20% below its off-policy twin's


def run_seed(seed: int, out_dir: Path, extra: list[str]) -> dict[str, Any]:
    """One full run of the script's ``main`` at ``seed``; its ``results.json`` and the load around it."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import distill_lm

    flags = ["--config", str(RECIPE), "--seed", str(seed), "--data_seed", str(seed)]
    flags += ["--output_dir", str(out_dir / f"seed{seed}"), *extra]
    load_before = os.getloadavg()
    start = time.perf_counter()
    summary = distill_lm.main(flags)
    summary["bench_wall_seconds"] = time.perf_counter() - start
    summary["load_average"] = {"before": load_before, "after": os.getloadavg()}
    return summary


def _spread(values: list[float], fmt: str = "{:.3f}") -> str:
    if not values:
        return ""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def regime_values(seeds: dict[str, dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per regime (row ``training``): each held-out metric's and the step time's values over the seeds."""
    regimes: dict[str, dict[str, list[float]]] = {}
    for summary in seeds.values():
        for row in summary["rows"]:
            into = regimes.setdefault(row["training"], {})
            for key in METRICS:
                into.setdefault(key, []).append(row["metrics"]["validation"][key])
            if row.get("step_seconds"):
                into.setdefault("step_seconds", []).append(row["step_seconds"])
    return regimes


def aggregate(seeds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per regime over the seeds: each held-out metric and step time; per seed: on-policy against its twin."""
    regimes = regime_values(seeds)
    per_seed = {}
    for seed, summary in seeds.items():
        rows = {r["training"]: r for r in summary["rows"]}
        on, off = rows.get("on-policy"), rows.get("off-policy")
        if on is None or off is None:
            continue
        rkl_on, rkl_off = (r["metrics"]["validation"]["reverse_kl"] for r in (on, off))
        record = {
            "reverse_kl_reduction": 1 - rkl_on / rkl_off,
            "forward_kl_change": on["metrics"]["validation"]["forward_kl"]
            / off["metrics"]["validation"]["forward_kl"]
            - 1,
            "rouge_l_change": on["metrics"]["validation"]["rouge_l"]
            - off["metrics"]["validation"]["rouge_l"],
        }
        if on.get("step_seconds") and off.get("step_seconds"):
            record["step_time_vs_off_policy"] = on["step_seconds"] / off["step_seconds"]
            stage2 = on["steps"] - rows["off-policy (stage 1)"]["steps"]
            record["equal_wall_time_off_policy_steps"] = stage2 * on["step_seconds"] / off["step_seconds"]
        per_seed[seed] = record
    reductions = [r["reverse_kl_reduction"] for r in per_seed.values()]
    on_values, off_values = regimes.get("on-policy", {}), regimes.get("off-policy", {})
    apart = bool(on_values and off_values) and max(on_values["reverse_kl"]) < min(off_values["reverse_kl"])
    return {
        "regimes": {
            t: {k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in m.items()}
            for t, m in regimes.items()
        },  # fmt: skip
        "per_seed": per_seed,
        "goal_met": bool(reductions) and min(reductions) >= GOAL and apart,
        "ranges_apart": apart,
    }


def table(seeds: dict[str, dict[str, Any]]) -> str:
    regimes = regime_values(seeds)
    lines = [
        f"Seeds {', '.join(seeds)}: median (min-max).",
        "",
        "| training | held-out reverse KL | held-out forward KL | ROUGE-L vs teacher | step (s) |",
        "|---|---|---|---|---|",
    ]
    for training, m in regimes.items():
        cells = [_spread(m[k]) for k in METRICS] + [_spread(m.get("step_seconds", []), "{:.2f}")]
        lines.append(f"| {training} | " + " | ".join(cells) + " |")
    agg = aggregate(seeds)
    if agg["per_seed"]:
        lines.append("")
        reductions = [r["reverse_kl_reduction"] for r in agg["per_seed"].values()]
        lines.append(
            "On-policy's held-out reverse KL against its off-policy twin: "
            + ", ".join(f"seed {s}: {r['reverse_kl_reduction']:+.1%}" for s, r in agg["per_seed"].items())
            + f" (goal: at least {GOAL:.0%} lower in every seed, ranges apart: "
            + ("met" if agg["goal_met"] else "not met")
            + f"; median {statistics.median(reductions):+.1%})."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[42, 43, 44])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/on_policy.json")
    parser.add_argument("--runs_dir", type=Path, default=ROOT / "outputs/bench_on_policy")
    parser.add_argument("--summarize", action="store_true", help="only summarise the seeds already in --out")
    options = parser.parse_args(argv)
    records = json.loads(options.out.read_text()) if options.out.is_file() else {"seeds": {}}
    if not options.summarize:
        for seed in options.seeds:
            records["seeds"][str(seed)] = run_seed(seed, options.runs_dir, extra)
            records["summary"] = aggregate(records["seeds"])
            options.out.parent.mkdir(parents=True, exist_ok=True)
            options.out.write_text(json.dumps(records, indent=1, sort_keys=True, default=str) + "\n")
    print(table(records["seeds"]))
    return records


if __name__ == "__main__":
    main()
