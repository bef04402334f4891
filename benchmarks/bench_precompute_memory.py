"""Peak memory of the LM default's teacher pass (both caches, one pass) at its default and other batch sizes.

Each setting runs in a fresh process: the recipe's teacher and training blocks are loaded, freed heap memory is
handed back and the peak resident size reset (as ``benchmarks/bench_lm_loss.py`` measures), then
:func:`hf_distill.teacher_cache.precompute_teacher_caches` writes the recipe's top-k and RS-KD caches (its
``cache_formats``) to an empty directory. Reported: the peak resident size during the pass minus the resident size
before it (so above the teacher and the blocks), and the float32 logits of one forward (``tokens x V x 4``),
which the default batch (:func:`hf_distill.teacher_cache.precompute.default_batch_tokens`) holds at 1 GiB. Memory
does not depend on what else runs; time does, and is not reported.

    python benchmarks/bench_precompute_memory.py                       # the default batch only
    python benchmarks/bench_precompute_memory.py --batch_tokens 0 4096 16384   # 0: the default

Results: ``benchmarks/results/precompute_memory.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/offline/smollm2.yaml"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def worker(batch_tokens: int | None) -> dict[str, Any]:
    from bench_lm_loss import _reset_peak_resident, _status_bytes

    from hf_distill.language_modeling import LMRecipeParser
    from hf_distill.language_modeling.data import load_corpus, pack
    from hf_distill.language_modeling.run import cache_formats
    from hf_distill.language_modeling.teacher import load_teacher
    from hf_distill.teacher_cache import precompute_teacher_caches
    from hf_distill.teacher_cache.precompute import default_batch_tokens

    with tempfile.TemporaryDirectory() as tmp:
        script, args = LMRecipeParser().parse_recipe_and_args(["--config", str(RECIPE), "--output_dir", tmp])
        script.ood_dataset_name = None
        teacher = load_teacher(script)
        splits, _ = load_corpus(script)
        blocks = pack(
            splits["train"], teacher.tokenizer, script.block_size, max_blocks=script.max_train_blocks
        )
        vocab = teacher.model.get_output_embeddings().weight.shape[0]
        tokens = batch_tokens or default_batch_tokens(vocab)
        before = _reset_peak_resident()
        precompute_teacher_caches(
            teacher.model, blocks, cache_formats(script, args), tokenizer=teacher.tokenizer,
            preprocessing={"dataset": script.dataset_name, "block_size": script.block_size},
            cache_dir=Path(tmp) / "teacher_logits", teacher_name=script.teacher_model_name_or_path,
            max_batch_tokens=batch_tokens,
        )  # fmt: skip
        peak = _status_bytes("VmHWM") - before
    return {
        "batch_tokens": tokens,
        "default": batch_tokens is None,
        "vocab": vocab,
        "train_tokens": len(blocks) * script.block_size,
        "logits_per_forward_gib": tokens * vocab * 4 / 2**30,
        "peak_above_loaded_gib": peak / 2**30,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_tokens", type=int, nargs="+", default=[0], help="0: the default batch")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/precompute_memory.json")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.worker or None)))
        return
    from bench_lm_loss import WORKER_ENV

    rows = []
    for tokens in args.batch_tokens:
        done = subprocess.run(
            [sys.executable, __file__, "--worker", str(tokens)], capture_output=True, text=True,
            env={**os.environ, **WORKER_ENV, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"bench_precompute_memory: batch {tokens} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['batch_tokens']:>6} tokens{' (default)' if r['default'] else ''}: logits "
              f"{r['logits_per_forward_gib']:.2f} GiB a forward, peak {r['peak_above_loaded_gib']:.2f} GiB "
              "above the loaded teacher", flush=True)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"recipe": str(RECIPE.relative_to(ROOT)), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
