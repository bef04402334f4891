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

A masked or causal LM keeps its ``--top_k`` logits per token; ``--num_samples`` writes the RS-KD cache
instead (tokens drawn from its softmax at ``--sample_temperature``, by default the run's ``--temperature``,
the one training with the cache must use), and both flags write both caches from one teacher pass:

    python scripts/precompute_teacher_logits.py --teacher_model_name_or_path path/to/lm --task causal_lm \
        --dataset_path path/to/tokenized_train --logits_dir path/to/teacher_logits \
        --top_k 9 --num_samples 12 --sample_head 2

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
from datasets import Dataset, DatasetDict, load_from_disk
from transformers import AutoTokenizer

from hf_distill import tasks
from hf_distill.cli import run_script
from hf_distill.config import DistillationConfig
from hf_distill.errors import InputError
from hf_distill.teacher_cache import (
    AUTOCAST_DTYPES,
    SAMPLE_SHAPE_OPTIONS,
    SAMPLING_DEFAULTS,
    STORAGE_DTYPES,
    cache_paths,
    precompute_teacher_caches,
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
from hf_distill.vocab_losses import DRAW_ALLOCATIONS, SAMPLE_SCHEMES

TASKS = (
    tasks.SEQUENCE_CLASSIFICATION,
    tasks.TOKEN_CLASSIFICATION,
    tasks.QUESTION_ANSWERING,
    tasks.MASKED_LM,
    tasks.CAUSAL_LM,
)


@dataclass
class PrecomputeArguments:
    """Where the cache goes, what it holds and how the teacher is run."""

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
        metadata={
            "help": "Masked/causal LM: logits kept per token (default 64, or no top-k cache with num_samples; -1 "
            "for dense)."
        },
    )
    num_samples: int | None = field(
        default=None,
        metadata={
            "help": "Masked/causal LM: the RS-KD cache, tokens drawn per token from the teacher's softmax (1 to "
            "255, 3 bytes a draw). With top_k too, both caches from one teacher pass."
        },
    )
    sample_temperature: float | None = field(
        default=None,
        metadata={
            "help": "With num_samples: the softmax temperature of the draws (default: the run's temperature, "
            "the recipe's or --temperature, which training with the cache must use)."
        },
    )
    sample_seed: int | None = field(
        default=None, metadata={"help": "With num_samples: seed of the draws (default: the run's seed)."}
    )
    sample_head: int = field(
        default=0,
        metadata={
            "help": "With num_samples: the sample_head most likely tokens per token kept exactly (4 bytes each) "
            "and the draws taken from the rest; 0 for plain RS-KD."
        },
    )
    sample_proposal_temperature: float = field(
        default=1.0,
        metadata={
            "help": "With num_samples: tau > 0, the draws come from p**(1/tau) and are stored with importance "
            "weights (4 bytes a draw); 1 draws from the teacher itself."
        },
    )
    sample_counts: bool = field(
        default=True,
        metadata={
            "help": "With num_samples: false stores the draws themselves, repeated ids included (2 bytes a draw), "
            "instead of each distinct id with its count (3 bytes a slot)."
        },
    )
    sample_scheme: str = field(
        default="iid",
        metadata={
            "help": "With num_samples: iid draws (the paper's) or systematic ones (evenly spaced points of the "
            "teacher's cumulative distribution from one uniform offset: unbiased, lower variance, same bytes).",
            "choices": list(SAMPLE_SCHEMES),
        },
    )
    sample_head_quantized: bool = field(
        default=False,
        metadata={
            "help": "With sample_head: the head's probabilities in 8 bits (k/255, stochastically rounded: unbiased), "
            "3 bytes a head token instead of 4."
        },
    )
    sample_allocation: str = field(
        default="even",
        metadata={
            "help": "With num_samples and sample_counts false: even (num_samples draws a token) or adaptive (a "
            "row's draws shared among its tokens by need, stored pooled in an interpolative code with the head's ids, about 8.8 bits a draw, with "
            "a 1-byte count a token).",
            "choices": list(DRAW_ALLOCATIONS),
        },
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


# The settings that shape the RS-KD draws, and their values when not given: the library's, except the temperature and
# seed, which default to the run's.
SAMPLING_OPTIONS = SAMPLING_DEFAULTS | {"sample_temperature": None, "sample_seed": None}


def check_cache_options(options: PrecomputeArguments, task: str) -> None:
    """Refuse, before any teacher is loaded (a recipe's is fine-tuned first), cache options that do not fit
    ``task``: ``--top_k``/``--num_samples`` for a teacher that is not a masked or causal LM, and the draws'
    settings without ``--num_samples``.

    The library refuses those too, but only once the teacher is built, and it cannot tell a given
    temperature or seed from the defaults. The values themselves (ranges, a head below the vocabulary)
    are left to :func:`precompute_teacher_caches`.
    """
    vocabulary = [f"--{name}" for name in ("top_k", "num_samples") if getattr(options, name) is not None]
    if vocabulary and task not in tasks.VOCABULARY_TASKS:
        flags = " and ".join(vocabulary)
        raise InputError(
            f"{flags}: masked and causal LM teachers only (--dataset_path with --task masked_lm or causal_lm); "
            f"a {task} teacher's cache holds its dense logits. Drop {flags}."
        )
    given = [f"--{name}" for name, unset in SAMPLING_OPTIONS.items() if getattr(options, name) != unset]
    if given and options.num_samples is None:
        raise InputError(
            f"{', '.join(given)}: settings of the RS-KD draws, which need --num_samples N (tokens drawn per "
            "token, 1 to 255); add it or drop them."
        )
    if not options.sample_counts and options.sample_proposal_temperature != 1.0:
        raise InputError(
            "--sample_counts false stores the draws themselves (1/n each), but a tempered proposal's draws need "
            f"their importance weights: drop --sample_proposal_temperature {options.sample_proposal_temperature:g} "
            "or --sample_counts false."
        )


def cache_formats(options: PrecomputeArguments, args: DistillationConfig) -> dict[str, dict[str, Any]]:
    """The caches to write, name -> format (``formats`` of :func:`precompute_teacher_caches`): the logits
    (top-k for a language model), the RS-KD draws with ``--num_samples``, or both.

    The draws default to the run's temperature and seed: the trainer refuses an RS-KD cache drawn at
    another temperature than the one it trains at.
    """
    if options.num_samples is None:
        return {"logits": {"top_k": options.top_k}}
    temperature = args.temperature if options.sample_temperature is None else options.sample_temperature
    sampled = {
        "num_samples": options.num_samples,
        "sample_temperature": temperature,
        "sample_seed": args.seed if options.sample_seed is None else options.sample_seed,
        **{name: getattr(options, name) for name in SAMPLE_SHAPE_OPTIONS},
    }
    if options.top_k is None:
        return {"sampled": sampled}
    return {"topk": {"top_k": options.top_k}, "sampled": sampled}


def write_caches(
    request: dict[str, Any], formats: dict[str, dict[str, Any]], **shared: Any
) -> dict[str, Dataset]:
    """Each format's cache, name -> the dataset with its columns: one format alone, several in one teacher pass."""
    if len(formats) == 1:
        ((name, spec),) = formats.items()
        return {name: precompute_teacher_logits(**request, **spec, **shared)}
    return precompute_teacher_caches(**request, formats=formats, **shared)


def summary(provenance: dict[str, Any]) -> dict[str, Any]:
    """What the script prints of a cache's provenance: the teacher, the storage and the format (the RS-KD
    draws' settings, head and proposal temperature included at their defaults, when there are draws)."""
    out = {k: provenance[k] for k in ("key", "teacher", "weights_hash", "dtype", "top_k", "num_rows")}
    if provenance.get("sampling"):
        out["sampling"] = {"head": 0, "proposal_temperature": 1.0, "counts": True, **provenance["sampling"]}
    out.update({k: provenance[k] for k in ("bytes_per_example", "bytes_per_token") if k in provenance})
    return out


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


def main(argv: list[str] | None = None) -> list[Path]:
    """Write the caches asked for; the provenance file of each (the top-k or dense one first)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    script, args, options = RecipeParser((*DATACLASSES, PrecomputeArguments)).parse_recipe_and_args(argv)
    # a recipe's teacher is distill_glue.py's sequence classifier
    check_cache_options(
        options, tasks.SEQUENCE_CLASSIFICATION if options.dataset_path is None else options.task
    )
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
    caches = write_caches(
        request,
        cache_formats(options, args),
        cache_dir=cache_dir,
        autocast_dtype=options.autocast_dtype,
        max_batch_tokens=options.max_batch_tokens,
        sort_window=options.sort_window,
        teacher_name=script.teacher_model_name_or_path,
    )
    seconds = time.perf_counter() - start
    provenances = [read_provenance(out) for out in caches.values()]
    metas = [cache_paths(cache_dir, provenance["key"])[1] for provenance in provenances]
    if not PartialState().is_main_process:
        return metas
    for provenance, meta in zip(provenances, metas, strict=True):
        print(json.dumps(summary(provenance), indent=2))
        print(f"cache: {meta}")
    rows = len(next(iter(caches.values())))
    print(
        f"{rows} examples in {seconds:.1f} s ({rows / seconds:.1f} examples/s, cache hits included), "
        f"{len(provenances[0].get('shards', [None]))} shard(s)"
        + (f", {len(caches)} caches from one teacher pass" if len(caches) > 1 else "")
    )
    return metas


if __name__ == "__main__":
    run_script(main)
