"""Reproduce the offline default's table over several seeds (median and spread) and record a small search.

    OMP_NUM_THREADS=2 python benchmarks/bench_offline.py --out benchmarks/results/offline.json

1. ``--seeds`` (default 42 43 44): the offline recipe once per student seed. The teacher is fine-tuned
   once (``teacher_seed``, default 42) and reused from the cache: the spread is the students' own.
2. ``--search``: the compact student (the cheapest) with each (temperature, alpha, beta) of ``GRID`` on the
   first seed, without its baseline; the setting with the best *validation* accuracy of the transfer-set
   row is reported (test accuracy is never used to choose).

Every finished run is appended to ``--out`` at once, so an interrupted benchmark keeps what it measured;
``--summarize`` prints the tables from that file without running anything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from hf_distill.text_classification import RecipeParser, run

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "offline" / "rotten_tomatoes.yaml"
# (temperature, alpha, beta); the recipe's own setting is the seeds' runs.
GRID = [(1.0, 0.5, 0.5), (4.0, 0.5, 0.5), (2.0, 0.9, 0.1), (4.0, 0.9, 0.1)]


def run_recipe(flags: list[str]) -> dict:
    script, args = RecipeParser().parse_recipe_and_args(["--config", str(RECIPE), *flags])
    start = time.perf_counter()
    summary = run(script, args)
    summary["wall_seconds"] = time.perf_counter() - start
    summary["flags"] = flags
    return summary


def append(out: Path, record: dict) -> None:
    records = json.loads(out.read_text()) if out.exists() else []
    records.append(record)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2))


def _accuracy(row: dict, split: str) -> float:
    return 100 * row["metrics"][split]["accuracy"]


def seed_table(records: list[dict], split: str = "test") -> str:
    """Median and spread (min-max) over seeds of every row of the recipe's runs."""
    runs = [r for r in records if r["kind"] == "seed"]
    if not runs:
        return "(no seed runs yet)"
    rows: dict[tuple, list[dict]] = {}
    for record in runs:
        for row in record["summary"]["results"]:
            rows.setdefault((row["name"], row["training"]), []).append(row)
    teacher_acc = statistics.median(_accuracy(r, split) for r in rows[next(iter(rows))])
    teacher_speed = statistics.median(r["examples_per_second"] for r in rows[next(iter(rows))])
    lines = [
        f"| model | training | {split} accuracy, median (min-max) | retention | parameters | examples/s | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for (name, training), group in rows.items():
        acc = [_accuracy(r, split) for r in group]
        speed = statistics.median(r["examples_per_second"] for r in group)
        lines.append(
            f"| {name} | {training} | {statistics.median(acc):.2f} ({min(acc):.2f}-{max(acc):.2f}), n={len(acc)} | "
            f"{100 * statistics.median(acc) / teacher_acc:.1f}% | {group[0]['parameters'] / 1e6:.1f}M | "
            f"{speed:.0f} | {speed / teacher_speed:.1f}x |"
        )
    walls = [r["summary"]["wall_seconds"] for r in runs]
    lines.append(f"\nWall time per seed run: {', '.join(f'{w:.0f} s' for w in walls)}.")
    return "\n".join(lines)


def search_table(records: list[dict]) -> str:
    runs = [r for r in records if r["kind"] == "search"]
    if not runs:
        return "(no search runs yet)"
    lines = [
        "| T | alpha | beta | training | validation accuracy | test accuracy |",
        "|---|---|---|---|---|---|",
    ]
    best = None
    for record in runs:
        T, alpha, beta = record["setting"]
        for row in record["summary"]["results"][1:]:
            val, test = _accuracy(row, "validation"), _accuracy(row, "test")
            lines.append(f"| {T} | {alpha} | {beta} | {row['training']} | {val:.2f} | {test:.2f} |")
            if row["training"] == "KD + transfer set" and (best is None or val > best[0]):
                best = (val, record["setting"])
    if best is not None:
        lines.append(f"\nBest by validation accuracy (KD + transfer set): T, alpha, beta = {best[1]}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/offline.json"))
    parser.add_argument("--seeds", type=int, nargs="*", default=[42, 43, 44])
    parser.add_argument("--teacher_seed", type=int, default=42)
    parser.add_argument(
        "--search", action="store_true", help="Also run the (T, alpha, beta) grid on the compact student."
    )
    parser.add_argument("--summarize", action="store_true", help="Only print the tables of --out.")
    parser.add_argument(
        "--flags", nargs=argparse.REMAINDER, default=[], help="Extra recipe flags for every run."
    )
    options = parser.parse_args(argv)

    if not options.summarize:
        base = ["--teacher_seed", str(options.teacher_seed), *options.flags]
        for seed in options.seeds:
            output = f"outputs/bench_offline/seed{seed}"
            summary = run_recipe([*base, "--seed", str(seed), "--output_dir", output])
            append(options.out, {"kind": "seed", "seed": seed, "summary": summary})
            print(seed_table(json.loads(options.out.read_text())), flush=True)
        if options.search:
            seed = options.seeds[0] if options.seeds else 42
            for T, alpha, beta in GRID:
                output = f"outputs/bench_offline/search-T{T}-a{alpha}-b{beta}"
                flags = ["--students", "compact", "--train_baseline", "false", "--seed", str(seed)]
                flags += [
                    "--temperature",
                    str(T),
                    "--alpha",
                    str(alpha),
                    "--beta",
                    str(beta),
                    "--output_dir",
                    output,
                ]
                summary = run_recipe([*base, *flags])
                append(
                    options.out,
                    {"kind": "search", "setting": [T, alpha, beta], "seed": seed, "summary": summary},
                )
                print(search_table(json.loads(options.out.read_text())), flush=True)

    records = json.loads(options.out.read_text())
    print(seed_table(records))
    print()
    print(search_table(records))


if __name__ == "__main__":
    main(sys.argv[1:])
