"""Language-model distillation over seeds: held-out perplexity, cache sizes, step times, and TRL's GKDTrainer beside ours.

Each seed is one full run of ``scripts/distill_lm.py`` (its own ``main``, so every card carries a command
that reproduces it) with ``--seed`` and ``--data_seed`` set: the teacher, the student's CE-only twin,
dense live KD, KD from the top-k cache and KD from the RS-KD cache at (about) the same bytes per token,
each student run from the same initialisation on the same blocks. The summary gives, over the seeds,
median (min-max) of validation and out-of-domain perplexity, each run's step time relative to its CE
twin, the caches' bytes per token, and the share of dense KD's gain over CE (in held-out loss, nats per
token) that each cached teacher keeps.

``--gkd`` adds a side-by-side step benchmark on the same blocks and the same student initialisation: CE only, KD from
the live teacher, the top-k cache and the RS-KD cache (the recipe's weights), and TRL's
``GKDTrainer`` (``lmbda=0``, ``beta=0``: supervised forward KL, full logits) against ``DistillationTrainer``
with the same loss (``alpha=1, beta=0``, live teacher, the chunked loss), each in a fresh process with
rounds interleaved: median step time and peak memory (RSS above the process's size after loading).
trl is a benchmark-only dependency (``pip install trl``).

    python benchmarks/bench_lm.py --seeds 42 43 44 --out benchmarks/results/lm.json
    python benchmarks/bench_lm.py --gkd --out benchmarks/results/lm.json      # the TRL comparison only
    python benchmarks/bench_lm.py --summarize --out benchmarks/results/lm.json
    python benchmarks/bench_lm.py --out lm.json --merge lm_s43.json lm_s44.json   # seeds run side by side
    python benchmarks/bench_lm.py --gkd --gkd_rounds 3 --gkd_variants "CE only" "KD, top-k cache" "KD, RS-KD cache" \
        "KD, RS-KD cache with an exact head" --rskd_head 4 8 --out benchmarks/results/lm_steps_idle.json
                                    # the sparse caches' steps against CE (the exact head: 4 tokens + 8 draws)

Extra flags after ``--`` go to ``scripts/distill_lm.py`` (e.g. ``-- --max_steps 20``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/offline/smollm2.yaml"
MODES = ("live", "topk", "sampled")


def run_seed(seed: int, out_dir: Path, extra: list[str]) -> dict[str, Any]:
    """One full run of the script's ``main`` at ``seed``; its ``results.json``."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import distill_lm

    flags = ["--config", str(RECIPE), "--seed", str(seed), "--data_seed", str(seed)]
    flags += ["--output_dir", str(out_dir / f"seed{seed}"), *extra]
    start = time.perf_counter()
    summary = distill_lm.main(flags)
    summary["bench_wall_seconds"] = time.perf_counter() - start
    return summary


def _records(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"seeds": {}, "gkd": None}


def _save(path: Path, records: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def _spread(values: list[float], fmt: str = "{:.1f}") -> str:
    if not values:
        return ""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def aggregate(seeds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per row (by training), over the seeds: perplexities, losses, step-time ratios; the cached teachers'
    share of dense KD's gain over CE in held-out loss."""
    rows: dict[str, dict[str, list[float]]] = {}
    names: dict[str, str] = {}
    for summary in seeds.values():
        for row in summary["rows"]:
            key = row["training"]
            names[key] = row["name"]
            r = rows.setdefault(key, {})
            for split in ("validation", "ood"):
                if split in row["metrics"]:
                    r.setdefault(f"{split}_perplexity", []).append(row["metrics"][split]["perplexity"])
                    r.setdefault(f"{split}_loss", []).append(row["metrics"][split]["loss"])
                    if row["metrics"][split].get("ece") is not None:
                        r.setdefault(f"{split}_ece", []).append(row["metrics"][split]["ece"])
            for field in (
                "step_time_vs_ce",
                "cache_bytes_per_token",
                "parameters",
                "generate_tokens_per_second",
            ):
                if row.get(field) is not None:
                    r.setdefault(field, []).append(row[field])
    gains: dict[str, dict[str, list[float]]] = {}
    for summary in seeds.values():
        by = {r["mode"]: r for r in summary["rows"] if r["kind"] != "teacher"}
        if None not in by:
            continue
        for split in ("validation", "ood"):
            if split not in by[None]["metrics"]:
                continue
            ce = by[None]["metrics"][split]["loss"]
            for mode in MODES:
                if mode in by:
                    gains.setdefault(mode, {}).setdefault(f"{split}_gain", []).append(
                        ce - by[mode]["metrics"][split]["loss"]
                    )
            if "live" in by:
                dense = ce - by["live"]["metrics"][split]["loss"]
                for mode in ("topk", "sampled"):
                    if mode in by and dense > 0:
                        kept = (ce - by[mode]["metrics"][split]["loss"]) / dense
                        gains[mode].setdefault(f"{split}_share_of_dense_gain", []).append(kept)
    return {"rows": rows, "names": names, "gains": gains}


def _seed_table(records: dict[str, Any]) -> list[str]:
    agg = aggregate(records["seeds"])
    lines = [
        f"Seeds {', '.join(sorted(records['seeds'], key=int))}: median (min-max).",
        "",
        "| model | training | validation perplexity | out-of-domain perplexity | validation loss gain over CE (nats/token) "
        "| share of dense KD's gain | ECE validation / out of domain | step time vs CE | cache bytes/token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    mode_of = {"KD, live teacher": "live", "KD, top-k cache": "topk", "KD, RS-KD cache": "sampled"}
    for training, r in agg["rows"].items():
        gain = agg["gains"].get(mode_of.get(training, ""), {})
        lines.append(
            f"| {agg['names'][training]} | {training} | {_spread(r.get('validation_perplexity', []))} | "
            f"{_spread(r.get('ood_perplexity', []))} | {_spread(gain.get('validation_gain', []), '{:+.3f}')} | "
            f"{_spread([100 * x for x in gain.get('validation_share_of_dense_gain', [])], '{:.0f}%')} | "
            f"{_spread(r.get('validation_ece', []), '{:.3f}')} / {_spread(r.get('ood_ece', []), '{:.3f}')} | "
            f"{_spread(r.get('step_time_vs_ce', []), '{:.2f}x')} | {_spread(r.get('cache_bytes_per_token', []))} |"
        )
    return lines


def _gkd_table(g: dict[str, Any]) -> list[str]:
    ce = statistics.median(g["variants"]["CE only"]["step_seconds"]) if "CE only" in g["variants"] else None
    lines = [
        f"Steps side by side: {g['steps']} steps of {g['batch']} x {g['block_size']} tokens per variant, each in a fresh "
        f"process, {len(next(iter(g['variants'].values()))['step_seconds'])} rounds interleaved, {g['threads']} threads "
        f"(load average after: {', '.join(f'{x:.1f}' for x in g['load_average'])}); the same student initialisation "
        "and blocks; median step time of each round (the first step left out) and peak memory above the loaded process:",
        "",
        "| trainer | median step (s) | step time vs CE only | peak memory above loaded (MB) |",
        "|---|---|---|---|",
    ]
    for name, v in g["variants"].items():
        ratio = f"{statistics.median(v['step_seconds']) / ce:.2f}x" if ce else ""
        lines.append(
            f"| {name} | {_spread(v['step_seconds'], '{:.2f}')} | {ratio} | {_spread(v['peak_mb'], '{:.0f}')} |"
        )
    return lines


def table(records: dict[str, Any]) -> str:
    """The README's tables: the seed runs, and the GKD comparison when measured."""
    lines = _seed_table(records) if records["seeds"] else []
    if records.get("gkd"):
        lines += ([""] if lines else []) + _gkd_table(records["gkd"])
    return "\n".join(lines)


# ---- the GKD comparison: one variant per fresh process ------------------------------------------------


def _gkd_worker(
    variant: str, steps: int, batch: int, block_size: int, cache: str, head: tuple[int, int] = (4, 8)
) -> dict[str, Any]:
    import torch
    from transformers import TrainerCallback, default_data_collator

    from hf_distill import DistillationConfig, DistillationDataCollator, DistillationTrainer, build_student
    from hf_distill.language_modeling import LMRecipeParser
    from hf_distill.language_modeling.data import load_corpus, pack
    from hf_distill.language_modeling.run import cache_formats
    from hf_distill.language_modeling.teacher import load_teacher

    # the recipe's corpus, blocks and teacher (so the seed runs' caches are hits), without its out-of-domain text
    script, recipe_args = LMRecipeParser().parse_recipe_and_args(
        ["--config", str(RECIPE), "--cache_dir", cache, "--output_dir", os.path.join(cache, "bench_steps")]
    )
    script.ood_dataset_name = None
    teacher = load_teacher(script)
    splits, _ = load_corpus(script)
    blocks = pack(splits["train"], teacher.tokenizer, block_size, max_blocks=script.max_train_blocks)
    formats = cache_formats(script, recipe_args)  # the run's own caches (the recipe's seed, 42, for the draws)
    rskd = formats["sampled"]
    sparse = {"KD, top-k cache": formats["topk"], "KD, RS-KD cache": rskd,
              HEAD_VARIANT: {**rskd, "sample_head": head[0], "num_samples": head[1]}}  # fmt: skip
    if variant in sparse:
        from hf_distill.offline import cache_dir
        from hf_distill.teacher_cache import precompute_teacher_logits

        preprocessing = {
            "dataset": script.dataset_name,
            "text_column": script.text_column,
            "block_size": block_size,
        }
        blocks = precompute_teacher_logits(
            teacher.model, blocks, tokenizer=teacher.tokenizer, preprocessing=preprocessing,
            cache_dir=cache_dir(cache) / "teacher_logits", teacher_name=script.teacher_model_name_or_path,
            max_batch_tokens=script.precompute_batch_tokens, **sparse[variant],
        )  # fmt: skip
    student = build_student(teacher.model, num_layers=script.student_num_layers)

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimes()
    common = dict(
        output_dir=os.path.join(cache, "bench_gkd", variant), per_device_train_batch_size=batch, max_steps=steps,
        learning_rate=2e-4, report_to="none", use_cpu=True, save_strategy="no", logging_steps=steps, seed=42,
        data_seed=42, lr_scheduler_type="constant",
    )  # fmt: skip
    loaded_mb = _rss_mb()
    if variant == "TRL GKDTrainer":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        config = GKDConfig(
            **common, lmbda=0.0, beta=0.0, temperature=1.0, max_length=block_size, seq_kd=False
        )
        trainer = GKDTrainer(
            model=student, teacher_model=teacher.model, args=config, train_dataset=blocks,
            processing_class=teacher.tokenizer, data_collator=default_data_collator, callbacks=[timer],
        )  # fmt: skip
    else:
        # the GKD twin learns from the teacher alone (alpha = 1, beta = 0); the recipe's runs use its weights
        weights = {"alpha": 1.0, "beta": 0.0} if variant == GKD_TWIN else {
            "alpha": 0.0 if variant == "CE only" else recipe_args.alpha, "beta": 1.0 if variant == "CE only" else recipe_args.beta}  # fmt: skip
        config = DistillationConfig(**common, **weights, temperature=1.0, kd_loss="kl")
        live = variant in (GKD_TWIN, "KD, live teacher", "CE only")
        trainer = DistillationTrainer(  # the library's collator: an adaptive cache's draws decoded and regrouped
            model=student, teacher_model=teacher.model if live else None, args=config, train_dataset=blocks,
            processing_class=teacher.tokenizer, data_collator=DistillationDataCollator(), callbacks=[timer],
        )  # fmt: skip
    torch.manual_seed(0)
    trainer.train()
    return {"step_seconds": timer.times[1:], "peak_mb": _peak_mb() - loaded_mb}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


GKD_TWIN = "hf-distill DistillationTrainer, KD only (alpha 1, beta 0), live teacher"
HEAD_VARIANT = "KD, RS-KD cache with an exact head"  # --rskd_head h n: h exact tokens and n draws of the rest
STEP_VARIANTS = (
    "CE only",
    "KD, live teacher",
    "KD, top-k cache",
    "KD, RS-KD cache",
    HEAD_VARIANT,
    GKD_TWIN,
    "TRL GKDTrainer",
)


def run_gkd(
    steps: int,
    batch: int,
    block_size: int,
    rounds: int,
    cache: str,
    variants: tuple[str, ...] = STEP_VARIANTS,
    head: tuple[int, int] = (4, 8),
) -> dict[str, Any]:
    results: dict[str, dict[str, list[float]]] = {v: {"step_seconds": [], "peak_mb": []} for v in variants}
    for _ in range(rounds):
        for variant in variants:
            command = [sys.executable, __file__, "--worker", variant, "--gkd_steps", str(steps), "--gkd_batch",
                       str(batch), "--gkd_block_size", str(block_size), "--cache_dir", cache,
                       "--rskd_head", *map(str, head)]  # fmt: skip
            done = subprocess.run(
                command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
            )
            if done.returncode != 0:
                raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
            out = json.loads(done.stdout.strip().splitlines()[-1])
            results[variant]["step_seconds"].append(statistics.median(out["step_seconds"]))
            results[variant]["peak_mb"].append(out["peak_mb"])
            print(f"bench_lm: {variant}: step {results[variant]['step_seconds'][-1]:.2f} s, "
                  f"peak {out['peak_mb']:.0f} MB", flush=True)  # fmt: skip
    import torch

    return {"steps": steps, "batch": batch, "block_size": block_size, "threads": torch.get_num_threads(),
            "load_average": os.getloadavg(), "rskd_head": list(head), "variants": results}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/lm.json")
    parser.add_argument("--runs_dir", type=Path, default=ROOT / "outputs/bench_lm")
    parser.add_argument("--summarize", action="store_true")
    parser.add_argument(
        "--merge", type=Path, nargs="*", default=[],
        help="fold the seeds of these results files (seeds run in other processes) into --out",
    )  # fmt: skip
    parser.add_argument("--gkd", action="store_true")
    parser.add_argument("--gkd_steps", type=int, default=5)
    parser.add_argument("--gkd_batch", type=int, default=2)
    parser.add_argument("--gkd_block_size", type=int, default=256)
    parser.add_argument("--gkd_rounds", type=int, default=2)
    parser.add_argument(
        "--cache_dir", default=os.environ.get("HF_DISTILL_CACHE", str(Path.home() / ".cache/hf_distill"))
    )
    parser.add_argument(
        "--gkd_variants", nargs="+", choices=STEP_VARIANTS, default=list(STEP_VARIANTS),
        help="the step benchmark's variants (default: all)",
    )  # fmt: skip
    parser.add_argument(
        "--rskd_head", type=int, nargs=2, default=[4, 8], metavar=("HEAD", "DRAWS"),
        help=f"'{HEAD_VARIANT}': exact tokens and draws of the rest",
    )  # fmt: skip
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    head = tuple(args.rskd_head)
    if args.worker:
        out = _gkd_worker(
            args.worker, args.gkd_steps, args.gkd_batch, args.gkd_block_size, args.cache_dir, head
        )
        print(json.dumps(out))
        return
    records = _records(args.out)
    for other in args.merge:
        for seed, summary in _records(other)["seeds"].items():
            if seed in records["seeds"]:
                raise SystemExit(
                    f"bench_lm: seed {seed} is in both {args.out} and {other}; merge one of them only."
                )
            records["seeds"][seed] = summary
        _save(args.out, records)
    for seed in args.seeds:
        if str(seed) in records["seeds"]:
            print(f"bench_lm: seed {seed} is in {args.out} already; skipped", flush=True)
            continue
        records["seeds"][str(seed)] = run_seed(seed, args.runs_dir, extra)
        records.setdefault("extra_flags", extra)
        _save(args.out, records)
    if args.gkd:
        records["gkd"] = run_gkd(
            args.gkd_steps,
            args.gkd_batch,
            args.gkd_block_size,
            args.gkd_rounds,
            args.cache_dir,
            tuple(args.gkd_variants),
            head,
        )
        _save(args.out, records)
    if records["seeds"] or records.get("gkd"):
        print(table(records))


if __name__ == "__main__":
    main()
