"""Fill the teacher-logit cache once (e.g. on a GPU), so students can be trained later anywhere without the teacher.

For a recipe: the teacher of ``scripts/distill_glue.py`` (stage 1: fine-tuned first when the recipe
asks for it, and kept in ``<cache_dir>/teachers``), its logits over the recipe's training texts, in
``<cache_dir>/teacher_logits``, exactly the cache a later ``distill_glue.py`` run with the same
recipe and ``--cache_dir`` reads instead of running the teacher:

    python scripts/precompute_teacher_logits.py --config recipes/glue/sst2.yaml --cache_dir /shared/hf_distill

For any tokenized dataset saved with ``Dataset.save_to_disk`` and any teacher head:

    python scripts/precompute_teacher_logits.py --teacher_model_name_or_path path/to/teacher \
        --dataset_path path/to/tokenized_train --logits_dir path/to/teacher_logits --autocast_dtype bfloat16

then train with ``hf_distill.teacher_cache.load_teacher_cache(logits_dir, ...)`` as the training
dataset and ``teacher_model=None``. The provenance is in the ``.json`` beside the cache.

Under ``accelerate launch`` every process computes its own shard of the cache (``cache_dir``/``--logits_dir``
must be on a filesystem every machine sees); the main process writes the provenance listing them:

    accelerate launch --num_processes 8 scripts/precompute_teacher_logits.py --config recipes/glue/sst2.yaml \
        --cache_dir /shared/hf_distill
    # two machines of 8 GPUs, the same command on each with --machine_rank 0 / 1:
    accelerate launch --num_machines 2 --num_processes 16 --machine_rank 0 --main_process_ip 10.0.0.1 \
        --main_process_port 29500 scripts/precompute_teacher_logits.py --config recipes/glue/sst2.yaml \
        --cache_dir /shared/hf_distill

The cache is the same whatever the number of processes, and a killed run resumes from its complete shards.

A refused request or cache prints one ``precompute_teacher_logits.py: error: ...`` line and exits with
code 2; ``--debug`` (or ``HF_DISTILL_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import PartialState
from datasets import DatasetDict, load_from_disk
from transformers import AutoTokenizer

from hf_distill import tasks
from hf_distill.cli import run_script
from hf_distill.config import DistillationConfig
from hf_distill.errors import InputError
from hf_distill.teacher_cache import (
    AUTOCAST_DTYPES,
    STORAGE_DTYPES,
    precompute_teacher_logits,
    read_provenance,
)
from hf_distill.teachers import load_teacher
from hf_distill.text_classification import (
    DATACLASSES,
    DistillTextArguments,
    RecipeParser,
    get_teacher,
    prepare,
    teacher_cache_settings,
)
from hf_distill.text_classification.offline import cache_dir, resolve_model_path

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
        metadata={
            "help": "Directory of the cache (default: <cache_dir>/teacher_logits, where distill_glue.py reads)."
        },
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
    logits_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Stored precision (default: float32 for a recipe, what distill_glue.py reads; float16 for "
            "dataset_path).",
            "choices": [*STORAGE_DTYPES, None],
        },
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


def recipe_request(script: DistillTextArguments, args: DistillationConfig) -> dict[str, Any]:
    """What ``scripts/distill_glue.py`` (``hf_distill.text_classification.run``) caches for this recipe: its
    teacher (stage 1), its tokenized training texts (every row, the transfer set) and its cache settings."""
    prepared = prepare(script, args)
    cache = cache_dir(script.cache_dir)
    teacher = get_teacher(script, args, prepared.task, prepared.labelled, prepared.tokenizer, cache)
    return {
        "teacher": teacher.model.to(args.device),
        "dataset": prepared.transfer,
        "tokenizer": prepared.tokenizer,
        **teacher_cache_settings(script, prepared.task, cache),
    }


def dataset_request(script: DistillTextArguments, args: DistillationConfig, options: PrecomputeArguments):
    """A saved tokenized dataset and a teacher of any head (its tokenizer beside it)."""
    path = resolve_model_path(script.teacher_model_name_or_path, script.cache_dir)
    dataset = load_from_disk(options.dataset_path)
    dataset = dataset[options.dataset_split] if isinstance(dataset, DatasetDict) else dataset
    return {
        "teacher": load_teacher(path, options.task).to(args.device),
        "dataset": dataset,
        "tokenizer": AutoTokenizer.from_pretrained(path),
        "preprocessing": {},  # the saved dataset's fingerprint covers how it was made
        "cache_dir": None,
        "dtype": "float16",
    }


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    script, args, options = RecipeParser((*DATACLASSES, PrecomputeArguments)).parse_recipe_and_args(argv)
    if options.dataset_path is None:
        request = recipe_request(script, args)
    else:
        request = dataset_request(script, args, options)
    default_dir = request.pop("cache_dir")
    cache_dir = options.logits_dir or default_dir
    if cache_dir is None:
        raise InputError("--dataset_path needs --logits_dir: the directory the cache is written to.")
    request["dtype"] = options.logits_dtype or request["dtype"]
    start = time.perf_counter()
    out = precompute_teacher_logits(
        **request,
        cache_dir=cache_dir,
        top_k=options.top_k,
        autocast_dtype=options.autocast_dtype,
        max_batch_tokens=options.max_batch_tokens,
        sort_window=options.sort_window,
        teacher_name=script.teacher_model_name_or_path,
    )
    seconds = time.perf_counter() - start
    provenance = read_provenance(out)
    meta = Path(cache_dir) / f"teacher-logits-{provenance['key']}.json"
    if not PartialState().is_main_process:
        return meta
    summary = {k: provenance[k] for k in ("key", "teacher", "weights_hash", "dtype", "top_k", "num_rows")}
    summary.update({k: provenance[k] for k in ("bytes_per_example", "bytes_per_token") if k in provenance})
    print(json.dumps(summary, indent=2))
    print(
        f"{len(out)} examples in {seconds:.1f} s ({len(out) / seconds:.1f} examples/s, cache hits included), "
        f"{len(provenance.get('shards', [None]))} shard(s)"
    )
    print(f"cache: {meta}")
    return meta


if __name__ == "__main__":
    run_script(main)
