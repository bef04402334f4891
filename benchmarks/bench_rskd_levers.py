"""RS-KD levers over seeds: the share of dense KD's gain that an RS-KD cache keeps, one lever at a time.

Each seed runs ``scripts/distill_lm.py`` on the LM recipe with ``--teacher_modes sampled`` and the lever's cache
settings (``--sample_head``, ``--num_samples``, ``--sample_proposal_temperature``, ``--sample_counts``), so that only the RS-KD student
is trained. Its held-out loss is set against the CE twin and the dense (live-teacher) student **of the same seed**
in a reference file written by ``benchmarks/bench_lm.py`` (same recipe, blocks and initialisation, and the rate and
schedule the reference rows were trained with, :func:`reference_training_flags`; training on CPU is deterministic):

    share = (loss_CE - loss_lever) / (loss_CE - loss_dense)

``--with_ce SEED ...`` also trains the CE twin in those seeds, and the results record how far its held-out loss
is from the reference's (the check that the reference still describes the code).

    python benchmarks/bench_rskd_levers.py --seeds 42 43 44 --sample_head 4 --num_samples 8 --with_ce 42
    python benchmarks/bench_rskd_levers.py --summarize

Extra flags after ``--`` go to ``scripts/distill_lm.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lm import ROOT, _spread, run_seed  # noqa: E402  (the seed runs and the spread, as bench_lm makes them)

from hf_distill.vocab_losses import DRAW_ALLOCATIONS, SAMPLE_SCHEMES  # noqa: E402

SPLITS = ("validation", "ood")


def lever_name(
    sample_head: int,
    num_samples: int,
    proposal_temperature: float,
    counts: bool = True,
    scheme: str = "iid",
    head_quantized: bool = False,
    allocation: str = "even",
) -> str:
    """The key of one lever: ``head4_n8``, ``head0_n12_tau1.5``, ``head3_n14_draws`` (draws stored without counts),
    ``head3_n13_draws_systematic`` (systematic draws), ``head3q8_n15_draws`` (the head in 8 bits),
    ``head3_n13_draws_systematic_adaptive`` (draws allocated by need)."""
    name = f"head{sample_head}{'q8' if head_quantized else ''}_n{num_samples}"
    name = name if proposal_temperature == 1.0 else f"{name}_tau{proposal_temperature:g}"
    name = name if counts else f"{name}_draws"
    name = name if scheme == "iid" else f"{name}_{scheme}"
    return name if allocation == "even" else f"{name}_{allocation}"


def _row(summary: dict[str, Any], mode: str | None) -> dict[str, Any] | None:
    rows = [r for r in summary["rows"] if r["kind"] != "teacher" and r["mode"] == mode]
    return rows[0] if rows else None


def shares(reference: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """Per split: the lever's loss, its gain over the reference CE twin and its share of the reference's dense
    gain (absent where dense KD does not gain); the ECE and bytes per token of the lever's student; and, when
    ``run`` trained its own CE twin, that twin's loss minus the reference's."""
    ce, dense, lever = _row(reference, None), _row(reference, "live"), _row(run, "sampled")
    if ce is None or dense is None or lever is None:
        raise ValueError("the reference needs the CE and live rows of the seed, and the run its RS-KD row")
    out: dict[str, Any] = {"cache_bytes_per_token": lever.get("cache_bytes_per_token")}
    own_ce = _row(run, None)
    for split in SPLITS:
        if split not in lever["metrics"]:
            continue
        loss = lever["metrics"][split]["loss"]
        ce_loss, dense_loss = ce["metrics"][split]["loss"], dense["metrics"][split]["loss"]
        entry = {"loss": loss, "gain": ce_loss - loss, "ece": lever["metrics"][split].get("ece")}
        if ce_loss - dense_loss > 0:
            entry["share_of_dense_gain"] = (ce_loss - loss) / (ce_loss - dense_loss)
        if own_ce is not None:
            entry["ce_minus_reference_ce"] = own_ce["metrics"][split]["loss"] - ce_loss
        out[split] = entry
    return out


def _values(seeds: list[dict[str, Any]], split: str, key: str) -> list[float]:
    return [s[split][key] for s in seeds if s.get(split, {}).get(key) is not None]


def table(records: dict[str, Any]) -> str:
    """One line per lever: seeds, bytes per token, share of dense gain (validation, out of domain), ECE."""
    lines = [
        "| lever | seeds | bytes/token | share of dense KD's gain, validation | out of domain | validation ECE |",
        "|---|---|---|---|---|---|",
    ]
    for name, seeds in records["levers"].items():
        got = list(seeds.values())
        share = {
            split: _spread([100 * x for x in _values(got, split, "share_of_dense_gain")], "{:.1f}%")
            for split in SPLITS
        }
        ece = _values(got, "validation", "ece")
        lines.append(
            f"| {name} | {', '.join(sorted(seeds, key=int))} | "
            f"{_spread([s['cache_bytes_per_token'] for s in got], '{:.1f}')} | {share['validation']} | "
            f"{share['ood']} | {_spread(ece, '{:.3f}') if ece else ''} |"
        )
    return "\n".join(lines)


def lever_flags(lever: dict[str, Any], with_ce: bool) -> list[str]:
    """``scripts/distill_lm.py`` flags that train only the lever's RS-KD student (and the CE twin ``with_ce``)."""
    return [
        "--teacher_modes", "sampled", "--sample_head", str(lever["sample_head"]),
        "--num_samples", str(lever["num_samples"]),
        "--sample_proposal_temperature", str(lever["proposal_temperature"]),
        "--sample_counts", str(lever.get("counts", True)).lower(),
        "--sample_scheme", lever.get("scheme", "iid"),
        "--sample_head_quantized", str(lever.get("head_quantized", False)).lower(),
        "--sample_allocation", lever.get("allocation", "even"),
        "--train_baseline", str(with_ce).lower(),
    ]  # fmt: skip


def reference_training_flags(reference: dict[str, Any]) -> list[str]:
    """The rate and schedule that trained a seed's reference rows (its ``settings``), as ``scripts/distill_lm.py``
    flags: the lever trains as its CE and dense rows did, whatever the recipe says now. Files written before the
    schedule was recorded (2026-12-07) were all trained at a rate held after 5 warm-up steps."""
    settings = reference["settings"]
    return [
        "--learning_rate", str(settings["learning_rate"]),
        "--lr_scheduler_type", settings.get("lr_scheduler_type", "constant_with_warmup"),
        "--warmup_steps", str(settings.get("warmup_steps", 5)),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[])
    parser.add_argument("--sample_head", type=int, default=4)
    parser.add_argument("--num_samples", type=int, default=8)
    parser.add_argument("--sample_proposal_temperature", type=float, default=1.0)
    parser.add_argument(
        "--sample_counts", choices=("true", "false"), default="true",
        help="false: the cache stores the draws themselves (2 bytes a draw), not distinct ids with counts",
    )  # fmt: skip
    parser.add_argument(
        "--sample_scheme", choices=SAMPLE_SCHEMES, default="iid",
        help="systematic: one uniform offset per token and evenly spaced points of the teacher's CDF",
    )  # fmt: skip
    parser.add_argument(
        "--sample_head_quantized", choices=("true", "false"), default="false",
        help="true: the head's probabilities in 8 bits, stochastically rounded (3 bytes a head token)",
    )  # fmt: skip
    parser.add_argument(
        "--sample_allocation", choices=DRAW_ALLOCATIONS, default="even",
        help="adaptive: a block's draws shared among its tokens by need (1 byte a token for the counts)",
    )  # fmt: skip
    parser.add_argument(
        "--with_ce", type=int, nargs="*", default=[], help="seeds that also train the CE twin"
    )
    parser.add_argument("--reference", type=Path, default=ROOT / "benchmarks/results/lm.json")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/rskd_levers.json")
    parser.add_argument("--runs_dir", type=Path, default=ROOT / "outputs/bench_rskd_levers")
    parser.add_argument("--summarize", action="store_true")
    args = parser.parse_args(argv)
    reference = json.loads(args.reference.read_text())["seeds"]
    records = json.loads(args.out.read_text()) if args.out.is_file() else {"levers": {}, "runs": {}}
    lever = {"sample_head": args.sample_head, "num_samples": args.num_samples,
             "proposal_temperature": args.sample_proposal_temperature,
             "counts": args.sample_counts == "true", "scheme": args.sample_scheme,
             "head_quantized": args.sample_head_quantized == "true",
             "allocation": args.sample_allocation}  # fmt: skip
    name = lever_name(**lever)
    for seed in args.seeds:
        if str(seed) not in reference:
            raise SystemExit(
                f"bench_rskd_levers: seed {seed} is not in {args.reference}; run bench_lm.py --seeds {seed}"
            )
        flags = [
            *lever_flags(lever, seed in args.with_ce),
            *reference_training_flags(reference[str(seed)]),
            *extra,
        ]
        summary = run_seed(seed, args.runs_dir / name, flags)
        # read again before writing: another lever's run may have written since this one started
        records = json.loads(args.out.read_text()) if args.out.is_file() else {"levers": {}, "runs": {}}
        records["levers"].setdefault(name, {})[str(seed)] = shares(reference[str(seed)], summary)
        records["runs"].setdefault(name, {})[str(seed)] = {
            "wall_seconds": summary["bench_wall_seconds"], "extra_flags": extra, **lever}  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
    if records["levers"]:
        print(table(records))


if __name__ == "__main__":
    main()
