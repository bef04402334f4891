"""The two entry points: :func:`precompute_teacher_logits` (compute once, cache, reuse) and
:func:`load_teacher_cache` (open a cache made elsewhere, checked against what is expected)."""

from __future__ import annotations

import datetime
import errno
import hashlib
import logging
import os
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset, concatenate_datasets
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..errors import InputError
from ..tasks import VOCABULARY_TASKS, base_model, task_of
from .inference import _TeacherLogits
from .key import (
    _CACHE_PREFIX,
    _KEY_COMPONENTS,
    READABLE_FORMAT_VERSIONS,
    _config_hash,
    _key_of,
    _mismatch,
    _provenance_path,
    cache_paths,
    read_provenance,
    teacher_cache_key,
    weights_hash,
    write_json_atomic,
)
from .shards import (
    all_processes,
    check_shards,
    compute_own_shards,
    on_main,
    open_shards,
    plan_shards,
    remove_records,
)
from .storage import (
    _describe_size,
    _features,
    _open_arrow,
    _storage_size,
    check_finite_logits,
    format_columns,
    provenance_shards,
    stored_columns,
)

logger = logging.getLogger(__name__)

# The default tokens per forward: one forward's float32 logits stay within LOGITS_BYTES (1 GiB), so that the
# whole teacher pass stays within about 2 GiB above the teacher (benchmarks/bench_precompute_memory.py).
LOGITS_BYTES = 2**30
MIN_BATCH_TOKENS = 256
MAX_BATCH_TOKENS = 16384


def default_batch_tokens(num_outputs: int) -> int:
    """Tokens per teacher forward by default: ``clip(LOGITS_BYTES // (4 * num_outputs), 256, 16384)``.

    ``num_outputs`` is the number of logits per token (the vocabulary ``V`` of a language model). One
    forward's float32 logits ``[tokens, V]`` then take at most ``LOGITS_BYTES`` = 1 GiB (unless ``V`` is
    beyond 2**20, where the 256-token floor holds): ``V = 49,152`` gives 5,461 tokens. The pass holds about
    1.5 times one forward's logits at its peak (the logits, and what each format computes from them), so the
    default stays within about 2 GiB; the earlier 16,384 tokens held 3.0 GiB per copy of the logits. A
    classifier's few outputs get the 16,384 cap.
    """
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}.")
    return min(MAX_BATCH_TOKENS, max(MIN_BATCH_TOKENS, LOGITS_BYTES // (4 * num_outputs)))


# What the provenance lists of each shard.
_SHARD_ENTRY = ("file", "index", "num_shards", "start", "num_rows", "arrow_bytes", "arrow_sha256")


def precompute_teacher_logits(
    teacher: nn.Module,
    dataset: Dataset,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    dtype: str = "float16",
    top_k: int | None = None,
    num_samples: int | None = None,
    sample_temperature: float = 1.0,
    sample_seed: int = 0,
    sample_head: int = 0,
    sample_proposal_temperature: float = 1.0,
    sample_counts: bool = True,
    sample_scheme: str = "iid",
    sample_head_quantized: bool = False,
    sample_allocation: str = "even",
    autocast_dtype: str | None = None,
    max_batch_tokens: int | None = None,
    max_batch_size: int = 512,
    sort_window: int = 4096,
    teacher_name: str | None = None,
    expected_key: str | None = None,
) -> Dataset:
    """``dataset`` with the teacher's outputs added as columns, computed once and cached.

    Args:
        teacher: the teacher model, already on the device it should run on (``teacher.to("cuda")``).
        dataset: a tokenized dataset (``input_ids``, optionally ``attention_mask``/``token_type_ids``,
            or ``teacher_input_ids``... for a sequence classifier with its own tokenizer).
        tokenizer: the tokenizer of the teacher's inputs: its pad id is used and its hash is in the key.
        preprocessing: the settings used to tokenize ``dataset`` (e.g. ``{"max_length": 128,
            "truncation": True}``); JSON-serialisable, part of the key and of the provenance.
        cache_dir: where the cache lives. Default: beside ``dataset``'s own cache files; a dataset
            held only in memory without ``cache_dir`` is computed in memory, uncached.
        dtype: stored precision, ``"float16"`` (default; values beyond its range raise) or ``"float32"``.
        top_k: masked/causal LM only: store the ``k`` largest logits per token (default
            ``DEFAULT_TOP_K``; ``-1`` for dense ``[L, V]``). Must be None for other tasks.
        num_samples: masked/causal LM only, instead of top-k: the RS-KD format (Anshumann et al., ACL
            2025). Per token, ``num_samples`` draws from the teacher's softmax at ``sample_temperature``,
            stored as ``teacher_sample_ids`` (the distinct ids) and ``teacher_sample_counts`` (how often
            each was drawn; 0 marks an empty slot), ``[L, num_samples]`` each, ids in uint16 when the
            vocabulary fits, counts in uint8: 3 bytes per draw. ``sample_seed`` seeds the draws (each
            row from the seed and its tokens, so batching, sharding and the other formats computed in
            the same pass do not change them).
        sample_head: with ``num_samples``: keep the ``sample_head`` most likely tokens exactly
            (``teacher_head_ids`` and ``teacher_head_probs``, ``[L, h]``, their probabilities at
            ``sample_temperature`` in ``dtype``: 4 bytes per head token in float16) and draw the
            ``num_samples`` from the rest (:func:`hf_distill.vocab_losses.sample_head_and_tail`); 0
            (default) for plain RS-KD. Must be below the vocabulary size.
        sample_proposal_temperature: with ``num_samples``: ``tau``, the draws (of the tail, with a
            head) come from the proposal ``q ∝ p**(1/tau)`` and each distinct id is stored with its
            self-normalised importance weight ``c_j p_j / q_j`` (``teacher_sample_weights`` in the
            stored dtype, in place of the counts: 4 bytes per draw in float16); 1 (default) draws from
            ``p`` itself.
        sample_counts: with ``num_samples``: False stores the draws themselves, ``teacher_sample_ids``
            ``[L, num_samples]`` with repeated ids and no counts column, each draw weighing ``1 /
            num_samples`` (:func:`hf_distill.vocab_losses.draws_of`): 2 bytes per draw instead of 3, so a
            byte budget holds half as many draws again when most draws are distinct (a flat teacher at
            ``T = 2``). Not with a tempered proposal (its draws need their weights).
        sample_scheme: with ``num_samples``: ``"iid"`` (default) draws independently, as the paper does;
            ``"systematic"`` draws by systematic sampling, one uniform offset per token and the ``n``
            evenly spaced points of its cumulative distribution (:func:`hf_distill.vocab_losses._draw`):
            unbiased as well, with each token drawn ``floor(n p)`` or ``ceil(n p)`` times. Same columns
            and bytes.
        sample_head_quantized: with ``sample_head``: the head's probabilities stored in 8 bits,
            ``teacher_head_quanta`` (uint8 ``k``, read as ``k / 255``), stochastically rounded so that the
            target stays unbiased (:func:`hf_distill.vocab_losses.quantize_probs`): 3 bytes a head token
            instead of 4, so a byte budget holds more draws. Cache format 4.
        sample_allocation: with ``num_samples`` and ``sample_counts=False``: ``"even"`` (default), ``num_samples``
            draws a token; ``"adaptive"``, each row's ``num_samples * L`` draws shared among its tokens in
            proportion to ``m_t sqrt(1 - ||q_t||^2)`` (tail mass and spread; at least 1, at most 255 each:
            :func:`hf_distill.vocab_losses.allocate_draws`), which minimises the row's summed error of iid
            draws. Stored pooled, one interpolative code a row (``teacher_sample_code``, uint8, about 8.8 bits a draw
            instead of 16: :mod:`hf_distill.draw_code`), with each token's count in ``teacher_sample_lengths``
            ``[L, 1]`` (uint8). With a head its ids go in the code too (each token's ascending, its probabilities
            stored in their order; no ``teacher_head_ids`` column): cache format 8; without one, format 7.
        autocast_dtype: ``"bfloat16"`` or ``"float16"`` to run the teacher under ``torch.autocast``.
        max_batch_tokens: padded tokens per forward pass (rows times longest row); default
            :func:`default_batch_tokens` of the teacher's logits per token (its vocabulary for a
            language model), so one forward's float32 logits take at most 1 GiB; halved on
            out-of-memory (the window is run again; garbage is collected and the device cache
            emptied then only) until a batch fits.
        max_batch_size: rows per forward pass at most.
        sort_window: examples sorted by length together (one ``Dataset.map`` batch); results are
            returned in the dataset's order.
        teacher_name: the teacher's id or path for the provenance (default: its config's ``_name_or_path``).
        expected_key: refuse (``ValueError``) unless the computed key equals this one.

    The CPU side is columnar (no per-row Python; see :class:`_TeacherLogits`), so on a GPU the
    teacher's forward sets the pace: around a teacher that costs nothing it reaches about 10^5
    examples/s on one CPU core (``benchmarks/bench_gpu.py``, the ceiling section).

    Under ``accelerate launch`` every process computes its own contiguous shard of the dataset and
    writes it under the key; the main process checks them all and writes the provenance listing
    them; every process returns the whole dataset (:mod:`.shards`). ``cache_dir`` must be on a
    filesystem every process sees (every machine, with ``--num_machines``). The cache is the same
    whatever the number of processes; a killed run resumes from its complete shards. The returned
    dataset's provenance: :func:`read_provenance`.
    """
    fmt = {"top_k": top_k, "num_samples": num_samples, "sample_temperature": sample_temperature,
           "sample_seed": sample_seed, "sample_head": sample_head,
           "sample_proposal_temperature": sample_proposal_temperature, "sample_counts": sample_counts,
           "sample_scheme": sample_scheme, "sample_head_quantized": sample_head_quantized,
           "sample_allocation": sample_allocation, "expected_key": expected_key}  # fmt: skip
    return precompute_teacher_caches(
        teacher,
        dataset,
        {"cache": fmt},
        tokenizer=tokenizer,
        preprocessing=preprocessing,
        cache_dir=cache_dir,
        dtype=dtype,
        autocast_dtype=autocast_dtype,
        max_batch_tokens=max_batch_tokens,
        max_batch_size=max_batch_size,
        sort_window=sort_window,
        teacher_name=teacher_name,
    )["cache"]


# The settings that shape the RS-KD draws, and their values when a format leaves them out (the key's sampling
# fields are these names without "sample_"). All but the temperature and seed need num_samples.
SAMPLING_DEFAULTS = {
    "sample_temperature": 1.0,
    "sample_seed": 0,
    "sample_head": 0,
    "sample_proposal_temperature": 1.0,
    "sample_counts": True,
    "sample_scheme": "iid",
    "sample_head_quantized": False,
    "sample_allocation": "even",
}
# Those that shape the draws, all but the temperature and seed: a format that sets them needs num_samples.
SAMPLE_SHAPE_OPTIONS = tuple(name for name in SAMPLING_DEFAULTS if name not in ("sample_temperature", "sample_seed"))
# What a format of precompute_teacher_caches may set: precompute_teacher_logits' arguments of that name.
FORMAT_OPTIONS = ("top_k", "num_samples", *SAMPLING_DEFAULTS, "expected_key")


def precompute_teacher_caches(
    teacher: nn.Module,
    dataset: Dataset,
    formats: Mapping[str, Mapping[str, Any]],
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    dtype: str = "float16",
    autocast_dtype: str | None = None,
    max_batch_tokens: int | None = None,
    max_batch_size: int = 512,
    sort_window: int = 4096,
    teacher_name: str | None = None,
) -> dict[str, Dataset]:
    """Several caches of ``dataset`` (one per format) from one teacher pass: name -> the dataset with its columns.

    ``formats``: a name of your choice -> that cache's format, given by the arguments of
    :func:`precompute_teacher_logits` named in ``FORMAT_OPTIONS`` (``top_k``, ``num_samples``,
    ``sample_temperature``, ``sample_seed``, ``sample_head``, ``sample_proposal_temperature``,
    ``sample_counts``, ``sample_scheme``, ``sample_head_quantized``, ``sample_allocation``, ``expected_key``), e.g. ``{"topk": {"top_k": 9}, "sampled": {"num_samples": 12}}``. The other
    arguments are shared, as in :func:`precompute_teacher_logits`.

    Each format is its own cache, with its own key, files and provenance, exactly as
    :func:`precompute_teacher_logits` writes it alone: the values are the same, and a cache asked for
    later alone is a hit. What is computed together are the rows that some format lacks: each batch's
    one forward gives every such format its columns (each sampling format draws from its own seeded
    generators, so the draws do not depend on what else is computed). With several formats to
    compute, a shard is first written with all their columns to one temporary file, then split into
    each format's file (so the disk holds the shard's columns twice until the split is done).
    """
    unknown = sorted({k for spec in formats.values() for k in spec} - set(FORMAT_OPTIONS))
    if unknown or not formats:
        raise InputError(
            f"Each teacher-cache format sets some of {list(FORMAT_OPTIONS)}, and at least one format is needed; "
            f"got {dict(formats)}."
        )
    task = task_of(teacher)
    if cache_dir is None and dataset.cache_files:
        cache_dir = Path(dataset.cache_files[0]["filename"]).parent
    requests: dict[str, dict[str, Any]] = {}  # key -> its components
    key_of: dict[str, str] = {}  # format name -> key
    for name, spec in formats.items():
        key, components = _request(
            teacher, dataset, task, spec, tokenizer, preprocessing, dtype, autocast_dtype
        )
        expected = spec.get("expected_key")
        if expected is not None and expected != key:
            detail = ""
            if cache_dir is not None and cache_paths(cache_dir, expected)[1].exists():
                old = read_provenance(cache_paths(cache_dir, expected)[1])
                detail = " Differences: " + "; ".join(_mismatch(old, components)) + "."
            raise InputError(
                f"The teacher cache requested has key {key} but expected_key={expected}: the teacher, dataset, "
                f"tokenizer or storage settings differ from those the expected cache was built with.{detail} "
                "Drop expected_key to compute a new cache."
            )
        requests[key], key_of[name] = components, key
    if max_batch_tokens is None:
        config = base_model(teacher).config
        max_batch_tokens = default_batch_tokens(
            config.vocab_size if task in VOCABULARY_TASKS else config.num_labels
        )
    if max_batch_tokens < 1 or max_batch_size < 1 or sort_window < 1:
        raise InputError(
            f"max_batch_tokens, max_batch_size and sort_window must be >= 1, got {max_batch_tokens}, "
            f"{max_batch_size}, {sort_window}."
        )
    columns = next(iter(requests.values()))["input_columns"]
    pad_token_id = (tokenizer.pad_token_id if tokenizer is not None else None) or 0
    teacher_columns = {
        key: stored_columns(format_columns(teacher, task, dtype, c["top_k"], c["sampling"]))
        for key, c in requests.items()
    }
    computers: dict[tuple[str, ...], _TeacherLogits] = {}  # kept, so each keeps its out-of-memory budget

    def compute_for(keys: tuple[str, ...]) -> tuple[_TeacherLogits, dict[str, str]]:
        """The map function computing ``keys``' formats together, and each key's column prefix."""
        prefixes = {key: "" if len(keys) == 1 else f"_format{i}_" for i, key in enumerate(keys)}
        if keys not in computers:
            specs = {
                prefixes[k]: {"top_k": requests[k]["top_k"], "sampling": requests[k]["sampling"]}
                for k in keys
            }
            computers[keys] = _TeacherLogits(
                teacher,
                task,
                columns,
                pad_token_id=pad_token_id,
                dtype=dtype,
                autocast_dtype=autocast_dtype,
                max_batch_tokens=max_batch_tokens,
                max_batch_size=max_batch_size,
                formats=specs,
            )
        return computers[keys], prefixes

    def map_kwargs(keys: tuple[str, ...], prefixes: Mapping[str, str]) -> dict[str, Any]:
        added = {prefixes[k] + name: spec for k in keys for name, spec in teacher_columns[k].items()}
        return dict(batched=True, batch_size=sort_window, features=_features(dataset, task, added),
                    desc="Teacher logits")  # fmt: skip

    def split(out: Dataset, key: str, prefix: str) -> Dataset:
        """The columns of ``key``'s format in ``out`` (computed with others), under their own names."""
        own = [prefix + name for name in teacher_columns[key]]
        return out.select_columns(dataset.column_names + own).rename_columns(
            {prefix + n: n for n in teacher_columns[key]}
        )

    keys = tuple(requests)
    teacher_was_training = teacher.training
    teacher.eval()
    try:
        if cache_dir is None:
            logger.warning(
                "The dataset is held in memory and no cache_dir was given: teacher logits are computed in memory "
                "and not cached. Pass cache_dir to compute them once and reuse them."
            )
            compute, prefixes = compute_for(keys)
            together = _together_key(keys)
            out = _map(dataset, compute, together, keep_in_memory=True, **map_kwargs(keys, prefixes))
            check_finite_logits(out, where="the teacher's outputs")
            done = {key: _formatted(split(out, key, prefixes[key]), dataset, key) if len(keys) > 1 else out
                    for key in keys}  # fmt: skip
            return {name: done[key_of[name]] for name in formats}
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)  # on every machine: each writes its own shards
        num_processes = PartialState().num_processes
        plans = on_main(
            lambda: {
                key: plan_shards(cache_dir, key, requests[key], num_processes, sort_window) for key in keys
            }
        )

        def compute_rows(start: int, num_rows: int, arrows: dict[str, Path]) -> None:
            part = dataset.select(range(start, start + num_rows))
            together = tuple(arrows)
            compute, prefixes = compute_for(together)
            if len(together) == 1:
                ((key, arrow),) = arrows.items()
                fingerprint = f"{key}-{start}-{num_rows}"
                _refuse_nonfinite(
                    _map_to_file(part, compute, fingerprint, arrow, False, map_kwargs(together, prefixes)),
                    arrow,
                )
                return
            # one pass for every format: all their columns to one temporary file, then one file each
            scratch = cache_dir / f"{_CACHE_PREFIX}together-{os.getpid()}-{start}-{num_rows}.arrow"
            fingerprint = f"{_together_key(together)}-{start}-{num_rows}"
            try:
                out = _map_to_file(part, compute, fingerprint, scratch, False, map_kwargs(together, prefixes))
                for key, arrow in arrows.items():
                    view = split(out, key, prefixes[key])
                    copied = _map_to_file(
                        view, _same, f"{key}-{start}-{num_rows}", arrow, False, map_kwargs((key,), {key: ""})
                    )
                    _refuse_nonfinite(copied, arrow)
            finally:
                scratch.unlink(missing_ok=True)

        reported = all_processes(lambda: compute_own_shards(cache_dir, plans, compute_rows))

        def finish() -> None:  # main process: every shard is there; the provenances, last
            for key in keys:
                records = sorted((r for own in reported for r in own[key]), key=lambda r: r["start"])
                _finish(
                    cache_dir,
                    key,
                    requests[key],
                    records,
                    plans[key][1],
                    dataset,
                    task,
                    teacher,
                    teacher_name,
                )

        on_main(finish)
        done = {}
        for key in keys:
            records = sorted((r for own in reported for r in own[key]), key=lambda r: r["start"])
            done[key] = _formatted(open_shards(cache_dir, records, dataset), dataset, key)
        return {name: done[key_of[name]] for name in formats}
    finally:
        teacher.train(teacher_was_training)


def _together_key(keys: tuple[str, ...]) -> str:
    """One key for several caches computed together (a fingerprint, at most 64 characters)."""
    return keys[0] if len(keys) == 1 else hashlib.sha256("-".join(keys).encode()).hexdigest()[:32]


def _same(table):
    """The identity map: copies a view (selected, renamed columns) into its own cache file."""
    return table


def _request(teacher, dataset, task, spec, tokenizer, preprocessing, dtype, autocast_dtype):
    """The key and components of one format of :func:`precompute_teacher_caches`."""
    top_k, num_samples = spec.get("top_k"), spec.get("num_samples")
    sampling = None
    if num_samples is not None:  # 0 too: refused by the key's range check, never taken as "no sampling"
        sampling = {"num_samples": num_samples} | {
            name.removeprefix("sample_"): spec.get(name, default) for name, default in SAMPLING_DEFAULTS.items()
        }
    elif any(spec.get(name, SAMPLING_DEFAULTS[name]) != SAMPLING_DEFAULTS[name] for name in SAMPLE_SHAPE_OPTIONS):
        *names, last = SAMPLE_SHAPE_OPTIONS
        raise InputError(f"{', '.join(names)} and {last} shape the RS-KD draws: they need num_samples, got {spec}.")
    return teacher_cache_key(
        teacher,
        dataset,
        tokenizer=tokenizer,
        preprocessing=preprocessing,
        dtype=dtype,
        top_k=None if num_samples and top_k is None else top_k,
        autocast_dtype=autocast_dtype,
        sampling=sampling,
    )


def _finish(cache_dir, key, components, records, listed, dataset, task, teacher, teacher_name) -> None:
    """Main process, once every shard of ``key`` is there: check them and write the provenance, last."""
    check_shards(cache_dir, records, key, components["num_rows"])
    if listed and not any(r.get("computed") for r in records):
        return  # a hit
    out = open_shards(cache_dir, records, dataset)
    provenance = {
        **components,
        "key": key,
        "teacher": teacher_name or base_model(teacher).config._name_or_path or None,
        "columns": [c for c in out.column_names if c not in dataset.column_names],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "datasets": version("datasets")},
        "shards": [{k: r[k] for k in _SHARD_ENTRY} for r in records],
        "arrow_bytes": sum(r["arrow_bytes"] for r in records),
        **_storage_size(out, task),
    }
    write_json_atomic(cache_paths(cache_dir, key)[1], provenance)
    remove_records(cache_dir, records)
    logger.info(
        "Teacher cache written to %s in %d shard(s) (%s).",
        cache_dir,
        len(records),
        _describe_size(provenance),
    )


def _map(dataset: Dataset, compute: _TeacherLogits, key: str, **map_kwargs) -> Dataset:
    """``dataset.map(compute)`` on Arrow batches (no conversion to Python lists either way), returned
    in ``dataset``'s format with the new columns added and the fingerprint ``key``."""
    out = dataset.with_format("arrow").map(compute, new_fingerprint=key, **map_kwargs)
    return _formatted(out, dataset, key)


def _formatted(out: Dataset, dataset: Dataset, key: str) -> Dataset:
    """``out`` (``dataset`` with the teacher's columns) in ``dataset``'s format, with the fingerprint ``key``."""
    fmt = dataset.format
    columns = fmt["columns"]
    if columns is not None:
        columns = columns + [c for c in out.column_names if c not in dataset.column_names]
    out = out.with_format(
        fmt["type"], columns=columns, output_all_columns=fmt["output_all_columns"], **fmt["format_kwargs"]
    )
    out._fingerprint = key  # as map(new_fingerprint=key) leaves it: the format is not part of the key
    return out


def _map_to_file(
    dataset: Dataset, compute, key: str, arrow: Path, hit: bool, map_kwargs: dict[str, Any]
) -> Dataset:
    """:func:`_map` into ``arrow``; a full disk raises ``OSError(ENOSPC)`` saying that nothing was kept.

    ``datasets`` writes to a temporary file and renames it when complete, and removes it on error.
    """
    try:
        return _map(dataset, compute, key, cache_file_name=str(arrow), load_from_cache_file=hit, **map_kwargs)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise OSError(
            errno.ENOSPC,
            f"No space left on device while writing the teacher cache {arrow}: nothing was kept (no partial "
            f"cache is ever taken as complete). Free space on {arrow.parent} or pass a cache_dir on a bigger "
            "disk, then run again; dtype='float16' or a smaller top_k make the cache smaller.",
        ) from err


def _refuse_nonfinite(out: Dataset, arrow: Path) -> None:
    """Before a new cache is marked complete: NaN or inf from the teacher removes it and raises, naming rows."""
    try:
        check_finite_logits(out, where="the teacher's outputs")
    except ValueError as err:
        arrow.unlink(missing_ok=True)
        raise InputError(f"{err} No cache was written (to {arrow}).") from None


def load_teacher_cache(
    path: str | os.PathLike,
    *,
    teacher: nn.Module | None = None,
    expected: Mapping[str, Any] | None = None,
    verify: bool = True,
) -> Dataset:
    """A cache built by :func:`precompute_teacher_logits` (e.g. on another machine), checked before use.

    ``path``: the cache directory (holding one cache), or its ``.arrow`` / ``.json`` file.
    ``teacher``: when given, its weights hash, class and config must match the cache's.
    ``expected``: provenance entries that must match exactly (e.g. ``{"dtype": "float16",
    "preprocessing": {"max_length": 128}}``); see :func:`read_provenance` for the keys.

    ``verify``: compare the data file's sha256 with the provenance's (reads the whole file once);
    its size and row count are always checked, and its teacher columns scanned for NaN and inf.

    Raises ``ValueError`` naming each mismatch, a provenance that does not describe the file it is
    filed beside, or a truncated, garbled or non-finite data file (with its path);
    ``FileNotFoundError`` for an incomplete cache.
    """
    provenance = read_provenance(path)
    if provenance.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise InputError(
            f"Teacher cache format {provenance.get('format_version')} but this hf-distill reads formats "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}: rebuild the cache with "
            "scripts/precompute_teacher_logits.py."
        )
    want = dict(expected or {})
    if teacher is not None:
        want.update(
            weights_hash=weights_hash(teacher),
            teacher_class=type(base_model(teacher)).__name__,
            config_hash=_config_hash(teacher),
        )
    problems = _mismatch(provenance, want)
    if problems:
        raise InputError(
            f"The teacher cache at {path} does not match what was asked for: {'; '.join(problems)}. "
            "Rebuild it with the intended teacher and settings (scripts/precompute_teacher_logits.py)."
        )
    meta = _provenance_path(path)
    filed_under = meta.stem.removeprefix(_CACHE_PREFIX)
    components = {k: provenance.get(k) for k in _KEY_COMPONENTS}
    if provenance.get("key") != filed_under or _key_of(provenance, components) != filed_under:
        raise InputError(
            f"The teacher-cache provenance {meta} is filed under key {filed_under} but says key "
            f"{provenance.get('key')!r} and its components hash to {_key_of(provenance, components)}: it was "
            "edited, or copied from another cache, so what it describes cannot be trusted. Rebuild the cache "
            "(scripts/precompute_teacher_logits.py) or put the right provenance back."
        )
    parts = []
    for shard in provenance_shards(provenance):
        arrow = meta.parent / shard["file"]
        if not arrow.exists():
            raise FileNotFoundError(
                f"The teacher cache's provenance is there but its data file {arrow} is missing."
            )
        parts.append(_open_arrow(arrow, shard, verify_hash=verify))
    dataset = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    check_finite_logits(dataset, where=f"the teacher cache {meta.parent / provenance['key']}")
    return dataset
