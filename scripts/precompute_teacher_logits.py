"""Fill the teacher-logit cache once (e.g. on a GPU), so students can be trained later anywhere without the teacher.

For a recipe (the teacher must already be fine-tuned for the task: a sequence classifier with the
task's labels; the training set is built as the recipe builds it):

    python scripts/precompute_teacher_logits.py --config recipes/glue/sst2.yaml \
        --teacher_model_name_or_path outputs/sst2/teacher --logits_dir outputs/sst2/teacher_logits

For any tokenized dataset saved with ``Dataset.save_to_disk`` and any teacher head:

    python scripts/precompute_teacher_logits.py --teacher_model_name_or_path path/to/teacher \
        --dataset_path path/to/tokenized_train --logits_dir path/to/teacher_logits --autocast_dtype bfloat16

One process does the work (``accelerate launch`` also works: the main process computes, the others
read). Train from the cache with ``hf_distill.teacher_cache.load_teacher_cache(logits_dir, ...)`` as
the training dataset and ``teacher_model=None``; the provenance is in the ``.json`` beside the cache.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import DatasetDict, load_from_disk
from transformers import AutoConfig, AutoTokenizer

from hf_distill import data, offline, tasks
from hf_distill.script_args import DATACLASSES, DistillGlueArguments, RecipeParser
from hf_distill.teacher_cache import (
    AUTOCAST_DTYPES,
    STORAGE_DTYPES,
    precompute_teacher_logits,
    read_provenance,
)
from hf_distill.teachers import load_teacher

TASKS = (
    tasks.SEQUENCE_CLASSIFICATION,
    tasks.TOKEN_CLASSIFICATION,
    tasks.QUESTION_ANSWERING,
    tasks.MASKED_LM,
    tasks.CAUSAL_LM,
)


@dataclass
class PrecomputeArguments:
    """Where the cache goes and how the teacher is run."""

    logits_dir: str | None = field(
        default=None,
        metadata={"help": "Directory of the cache (default: <cache_dir>/teacher_logits/<task_name>)."},
    )
    dataset_path: str | None = field(
        default=None,
        metadata={
            "help": "A tokenized dataset saved with save_to_disk, instead of the recipe's training set."
        },
    )
    dataset_split: str = field(
        default="train", metadata={"help": "Split of dataset_path when it is a DatasetDict."}
    )
    task: str = field(
        default="sequence_classification",
        metadata={"help": "Teacher head for dataset_path.", "choices": list(TASKS)},
    )
    logits_dtype: str = field(
        default="float16", metadata={"help": "Stored precision.", "choices": list(STORAGE_DTYPES)}
    )
    top_k: int | None = field(
        default=None,
        metadata={"help": "Masked/causal LM: logits kept per token (default 64; -1 for dense)."},
    )
    autocast_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Run the teacher under torch.autocast in this dtype (GPU).",
            "choices": [*AUTOCAST_DTYPES, None],
        },
    )
    max_batch_tokens: int = field(
        default=65536, metadata={"help": "Padded tokens per forward pass; halved on out-of-memory."}
    )
    sort_window: int = field(default=4096, metadata={"help": "Examples sorted by length together."})


def recipe_train_dataset(args: DistillGlueArguments, tokenizer):
    """The recipe's training set, tokenized: the first max_train_samples rows; with transfer_set, every
    row with labels beyond num_labelled set to -100, else the num_labelled labelled rows."""
    task = data.get_task(args.task_name)
    train = data.load_task_dataset(task, args.cache_dir, seed=args.dataset_seed)["train"]
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    labelled, transfer = data.split_labelled(train, args.num_labelled)
    dataset = transfer if args.transfer_set else labelled
    preprocessing = {
        "max_seq_length": args.max_seq_length,
        "truncation": True,
        "text_fields": task.text_fields,
    }
    return data.tokenize(dataset, tokenizer, task, args.max_seq_length), preprocessing


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    recipe_args, _, args = RecipeParser((*DATACLASSES, PrecomputeArguments)).parse_recipe_and_args(argv)
    teacher_path = offline.resolve_model_path(recipe_args.teacher_model_name_or_path, recipe_args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    if args.dataset_path is not None:
        dataset = load_from_disk(args.dataset_path)
        dataset = dataset[args.dataset_split] if isinstance(dataset, DatasetDict) else dataset
        task, preprocessing = args.task, {}  # the saved dataset's fingerprint covers its preprocessing
    else:
        task = tasks.SEQUENCE_CLASSIFICATION
        labels = data.get_task(recipe_args.task_name).num_labels
        if AutoConfig.from_pretrained(teacher_path).num_labels != labels:
            raise ValueError(
                f"{recipe_args.teacher_model_name_or_path} is not a {labels}-label classifier for "
                f"{recipe_args.task_name}: fine-tune the teacher first (scripts/distill_glue.py) and pass "
                "--teacher_model_name_or_path <the fine-tuned checkpoint>."
            )
        dataset, preprocessing = recipe_train_dataset(recipe_args, tokenizer)
    teacher = load_teacher(teacher_path, task)
    teacher.to("cuda" if torch.cuda.is_available() else "cpu")
    logits_dir = args.logits_dir or str(
        offline.cache_dir(recipe_args.cache_dir) / "teacher_logits" / recipe_args.task_name
    )
    start = time.perf_counter()
    out = precompute_teacher_logits(
        teacher,
        dataset,
        tokenizer=tokenizer,
        preprocessing=preprocessing,
        cache_dir=logits_dir,
        dtype=args.logits_dtype,
        top_k=args.top_k,
        autocast_dtype=args.autocast_dtype,
        max_batch_tokens=args.max_batch_tokens,
        sort_window=args.sort_window,
        teacher_name=recipe_args.teacher_model_name_or_path,
    )
    seconds = time.perf_counter() - start
    provenance = read_provenance(out)
    summary = {k: provenance[k] for k in ("key", "teacher", "weights_hash", "dtype", "top_k", "num_rows")}
    summary.update({k: provenance[k] for k in ("bytes_per_example", "bytes_per_token") if k in provenance})
    print(json.dumps(summary, indent=2))
    print(
        f"{len(out)} examples in {seconds:.1f} s ({len(out) / seconds:.1f} examples/s, cache hits included)"
    )
    print(f"cache: {out.cache_files[0]['filename']}")
    return Path(out.cache_files[0]["filename"])


if __name__ == "__main__":
    main(sys.argv[1:])
