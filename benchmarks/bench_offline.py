"""Reproduce the offline default's table over several full runs (median and spread), search the layers student's
settings on validation, and distil the teachers' ensemble. Each run is ``scripts/distill_glue.py``'s own ``main``
on ``recipes/offline/rotten_tomatoes.yaml`` plus flags. The README's results were made with (about 1 h 45 min on
2 CPU cores):

    export OMP_NUM_THREADS=2
    python benchmarks/bench_offline.py --search --seeds --out benchmarks/results/offline_search.json
    python benchmarks/bench_offline.py --seeds 42 43 44 --ensemble --out benchmarks/results/offline_v3.json

1. ``--search``: the layers student (initialised from teacher layers) on the first seed, one run per setting of
   ``SEARCH`` (epochs, transfer set, temperature, loss weights, hidden-state losses), each KD row against the
   hard-label twin of the same steps (settings with the same steps share one twin, ``TWIN``). The best KD row
   on **validation** is reported with the rows tied with it (``TIE_POINTS``); test accuracy is never used to
   choose. ``--seeds`` with no value runs only the search.
2. ``--seeds`` (default 42 43 44): the recipe once per seed, the teacher's fine-tuning seed varied with the
   students' (``--teacher_seed`` = ``--seed``), so the spread covers the whole method. ``--flags`` adds recipe
   flags to every run (e.g. a setting to try).
3. ``--ensemble``: per seed, the three teachers of ``--seeds`` (cached by the seed runs) as an ensemble
   (``teacher_seeds``): each teacher, the ensemble's own accuracy, a student of one teacher and of the ensemble.
   ``--skip_seed_runs`` runs only these.

Every finished run is appended to ``--out`` at once, so an interrupted benchmark keeps what it measured (an
interrupted search continues where it stopped); ``--summarize`` prints the tables from that file without running
anything.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

from hf_distill.text_classification import plot

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "offline" / "rotten_tomatoes.yaml"


def _distill_glue():
    spec = importlib.util.spec_from_file_location("distill_glue", ROOT / "scripts" / "distill_glue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Layers-student settings searched on validation: name -> recipe flags (on top of the recipe's own). Settings
# with the same number of steps share one hard-label twin (trained with the first of them), since that row does
# not depend on the distillation settings.
LAYERS = ["--students", "layers"]
# 610 steps: 2 epochs over all training texts
TRANSFER = ["--transfer_set", "layers", "--num_train_epochs", "2"]
SEARCH: dict[str, list[str]] = {
    "3 epochs (the earlier recipe; T=2, 0.5/0.5 throughout)": ["--num_train_epochs", "3"],
    "9 epochs": ["--num_train_epochs", "9"],
    "transfer set (2 epochs)": TRANSFER,
    "transfer set, T=1": [*TRANSFER, "--temperature", "1"],
    "transfer set, T=4": [*TRANSFER, "--temperature", "4"],
    "transfer set, 1.0/0.0 (soft labels only)": [*TRANSFER, "--alpha", "1.0", "--beta", "0.0"],
    "9 epochs, cosine hidden loss": [
        "--num_train_epochs",
        "9",
        "--hidden_loss",
        "cosine",
        "--hidden_loss_weight",
        "1.0",
    ],
    "9 epochs, MSE hidden loss": [
        "--num_train_epochs",
        "9",
        "--hidden_loss",
        "mse",
        "--hidden_loss_weight",
        "1.0",
    ],
}
# KD rows this close to the best on validation are ties (5 of the 1,000 validation snippets); among ties the
# recipe keeps its temperature and weights and takes the fewest steps.
TIE_POINTS, VALIDATION_ROWS = 0.5, 1000
# setting -> the earlier setting whose hard-label row it shares (same steps, same hard-label training).
TWIN = {name: "transfer set (2 epochs)" for name in SEARCH if name.startswith("transfer set, ")}
TWIN |= {name: "9 epochs" for name in SEARCH if name.startswith("9 epochs, ")}


def run_recipe(flags: list[str]) -> dict:
    """One run of the main job, as ``python scripts/distill_glue.py --config <recipe> <flags>`` (its cards say so)."""
    start = time.perf_counter()
    summary = _distill_glue().main(["--config", os.path.relpath(RECIPE), *flags])
    summary["wall_seconds"] = time.perf_counter() - start
    summary["flags"] = flags
    return summary


def _records(out: Path) -> list[dict]:
    return json.loads(out.read_text()) if out.exists() else []


def append(out: Path, record: dict) -> None:
    records = _records(out)
    records.append(record)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2))


def _accuracy(row: dict, split: str) -> float:
    return 100 * row["metrics"][split]["accuracy"]


def seed_table(records: list[dict], kind: str = "seed", split: str = "test") -> str:
    """Median and spread (min-max) over the runs of every row; retention against each run's own first teacher."""
    runs = [r for r in records if r["kind"] == kind]
    if not runs:
        return f"(no {kind} runs yet)"
    rows = _rows_by_model(runs)
    lines = [
        f"| model | training | {split} accuracy, median (min-max) | retention | parameters | examples/s | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for (name, training), group in rows.items():
        acc = [_accuracy(r, split) for r, _ in group]
        retention = statistics.median(_accuracy(r, split) / _accuracy(t, split) for r, t in group)
        speed = statistics.median(r["examples_per_second"] for r, _ in group)
        speedup = statistics.median(r["examples_per_second"] / t["examples_per_second"] for r, t in group)
        lines.append(
            f"| {name} | {training} | {statistics.median(acc):.2f} ({min(acc):.2f}-{max(acc):.2f}), n={len(acc)} | "
            f"{100 * retention:.1f}% | {group[0][0]['parameters'] / 1e6:.1f}M | {speed:.0f} | {speedup:.1f}x |"
        )
    walls = [r["summary"]["wall_seconds"] for r in runs]
    lines.append(f"\nWall time per run: {', '.join(f'{w:.0f} s' for w in walls)}.")
    return "\n".join(lines)


def _rows_by_model(runs: list[dict]) -> dict[tuple[str, str], list[tuple[dict, dict]]]:
    """(model, training) -> that row of every run, with the run's first teacher row."""
    rows: dict[tuple[str, str], list[tuple[dict, dict]]] = {}
    for record in runs:
        results = record["summary"]["results"]
        for row in results:
            name = row["name"].split(" (")[0] if row["student"] is None else row["name"]
            rows.setdefault((name, row["training"]), []).append((row, results[0]))
    return rows


def seed_plot(records: list[dict], path: Path, kind: str = "seed", split: str = "test") -> list[plot.Point]:
    """The picture of :func:`seed_table`: each row's median test accuracy against its median speed, with
    min-max bars over the runs (``hf_distill.text_classification.plot.draw``). Returns the points drawn."""
    runs = [r for r in records if r["kind"] == kind]
    if not runs:
        return []
    points = []
    for (name, training), group in _rows_by_model(runs).items():
        row = group[0][0]
        acc = [_accuracy(r, split) for r, _ in group]
        speed = [r["examples_per_second"] for r, _ in group]
        points.append(
            plot.Point(
                label=f"{name}, {training} ({row['parameters'] / 1e6:.1f}M)",
                kind=plot.kind_of(row),
                training=training,
                examples_per_second=statistics.median(speed),
                score=statistics.median(acc),
                parameters=row["parameters"],
                speed_range=(min(speed), max(speed)),
                score_range=(min(acc), max(acc)),
            )
        )
    summary = runs[0]["summary"]
    return plot.draw(
        points,
        path,
        ylabel=f"{split} accuracy (%)",
        title=f"{summary['task']['name']}, offline default: {len(runs)} runs (seeds "
        f"{', '.join(str(r['seed']) for r in runs)})",
        note=f"{summary['device']}, {summary['torch_threads']} threads",
    )


def search_table(records: list[dict]) -> str:
    """Every KD row of the search with its validation gain over the hard-label twin of the same steps."""
    runs = [r for r in records if r["kind"] == "search"]
    if not runs:
        return "(no search runs yet)"
    hard = {}
    for record in runs:
        for row in record["summary"]["results"][1:]:
            if row["training"] == "hard labels":
                hard[record["setting"]] = row
    lines = [
        "| setting | training | steps | validation accuracy | gain over hard labels (validation) | test accuracy |",
        "|---|---|---|---|---|---|",
    ]
    kd_rows = []
    for record in runs:
        setting = record["setting"]
        twin = hard.get(TWIN.get(setting, setting))
        for row in record["summary"]["results"][1:]:
            val, test = _accuracy(row, "validation"), _accuracy(row, "test")
            gain = "" if twin is None or row is twin else f"{val - _accuracy(twin, 'validation'):+.2f}"
            lines.append(
                f"| {setting} | {row['training']} | {row['steps']} | {val:.2f} | {gain} | {test:.2f} |"
            )
            if row["training"] != "hard labels":
                kd_rows.append((val, setting, row["training"], row["steps"]))
    if kd_rows:
        best = max(kd_rows, key=lambda r: r[0])  # the first of equals
        lines.append(f"\nBest KD row by validation accuracy: {best[1]} ({best[2]}, {best[0]:.2f}).")
        ties = [r for r in kd_rows if best[0] - r[0] <= TIE_POINTS and r is not best]
        lines.append(
            f"Within {TIE_POINTS} points of it (ties on {VALIDATION_ROWS:,} validation snippets): "
            + ("; ".join(f"{s} ({t}, {v:.2f}, {n} steps)" for v, s, t, n in ties) or "none")
            + "."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/offline_v2.json"))
    parser.add_argument("--seeds", type=int, nargs="*", default=[42, 43, 44])
    parser.add_argument("--search", action="store_true", help="First search the layers student's settings.")
    parser.add_argument(
        "--ensemble", action="store_true", help="Also distil the seeds' teachers as an ensemble."
    )
    parser.add_argument(
        "--skip_seed_runs",
        action="store_true",
        help="Do not run the seed runs (e.g. only --ensemble, on cached teachers).",
    )
    parser.add_argument("--summarize", action="store_true", help="Only print the tables of --out.")
    parser.add_argument(
        "--flags", nargs=argparse.REMAINDER, default=[], help="Extra recipe flags for every run."
    )
    options = parser.parse_args(argv)

    if not options.summarize:
        first = options.seeds[0] if options.seeds else 42
        if options.search:
            done = [r for r in _records(options.out) if r["kind"] == "search" and r["seed"] == first]
            for setting, flags in SEARCH.items():
                if any(r["setting"] == setting for r in done):
                    continue  # measured before (an interrupted search continues where it stopped)
                output = "outputs/bench_offline/search-" + "".join(c if c.isalnum() else "-" for c in setting)
                seed = ["--seed", str(first), "--teacher_seed", str(first)]
                twin = ["--train_baseline", "false"] if setting in TWIN else []
                summary = run_recipe([*options.flags, *LAYERS, *flags, *twin, *seed, "--output_dir", output])
                append(options.out, {"kind": "search", "setting": setting, "seed": first, "summary": summary})
                print(search_table(_records(options.out)), flush=True)
        for seed in [] if options.skip_seed_runs else options.seeds:
            flags = [*options.flags, "--seed", str(seed), "--teacher_seed", str(seed)]
            summary = run_recipe([*flags, "--output_dir", f"outputs/bench_offline/seed{seed}"])
            append(options.out, {"kind": "seed", "seed": seed, "summary": summary})
            print(seed_table(_records(options.out)), flush=True)
        if options.ensemble:
            teachers = [str(s) for s in options.seeds]
            for seed in options.seeds:
                flags = [*options.flags, *LAYERS, "--seed", str(seed), "--teacher_seeds", *teachers]
                flags += ["--hidden_loss_weight", "0", "--train_baseline", "false"]
                summary = run_recipe([*flags, "--output_dir", f"outputs/bench_offline/ensemble{seed}"])
                append(options.out, {"kind": "ensemble", "seed": seed, "summary": summary})
                print(seed_table(_records(options.out), kind="ensemble"), flush=True)

    records = _records(options.out)
    if seed_plot(records, options.out.with_suffix(".png")):
        print(f"Picture of the seed runs: {options.out.with_suffix('.png')}")
    print(seed_table(records))
    print()
    print(seed_table(records, kind="ensemble"))
    print()
    print(search_table(records))


if __name__ == "__main__":
    main(sys.argv[1:])
