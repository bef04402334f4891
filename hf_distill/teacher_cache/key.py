"""The teacher cache's key and its provenance: what a cache is, and the JSON file that says so.

The key (:func:`teacher_cache_key`) hashes everything that changes the stored values: the dataset's
fingerprint, the teacher's weights (:func:`weights_hash`, not its name), class and config, the
tokenizer (:func:`tokenizer_hash`), the preprocessing settings, the stored dtype, ``top_k`` and the
autocast dtype. A different request has a different key, hence a different file. Beside the data
file a JSON provenance (:func:`read_provenance`) records the teacher, every key component and the
storage size; it is written last (:func:`write_json_atomic`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase

from .. import tasks
from ..collator import teacher_sources
from ..errors import InputError
from ..tasks import base_model, forward_params, task_of
from ..vocab_losses import DRAW_ALLOCATIONS, SAMPLE_SCHEMES

# 2: vocabulary ids stored as uint16 when the vocabulary fits (<= 65,536), and the sampled (RS-KD) format.
# 3: an RS-KD cache with an exact head (teacher_head_ids / teacher_head_probs) or importance weights
#    (teacher_sample_weights). A format-2 reader would train on its draws alone, without a word; format 3 makes
#    it refuse. Every other cache stays format 2, so its key (and every cache already written) is unchanged.
# 4: an RS-KD head stored in 8 bits (teacher_head_quanta): a format-3 reader would train without its head.
# 5: RS-KD draws allocated among a row's tokens (teacher_sample_lengths): an older reader would give each token
#    the pooled draws of its slots, its neighbours' among them.
# 6: those pooled draws stored as one Rice code a row (teacher_sample_code, hf_distill.draw_code): about 12 bits a
#    draw instead of 16. Format 5 caches are still read.
# 7: those pooled draws in a binary interpolative code (the code's header says which): about 10.3 bits a draw. A
#    format-6 reader would take it for a Rice code. Formats 5 and 6 are still read; adaptive caches are written in
#    format 7.
# 8: with an exact head, the head's ids coded with the draws (teacher_head_ids no longer stored): the row's distinct
#    head ids are the draws' dictionary, about 4.5 B a token less at 24 draws. A format-7 reader would find no head
#    ids and train without its head. Adaptive caches without a head stay format 7.
HEAD_QUANTIZED_FORMAT_VERSION = 4
POOLED_FORMAT_VERSION = 7
CACHE_FORMAT_VERSION = 8
READABLE_FORMAT_VERSIONS = (2, 3, 4, 5, 6, 7, 8)
# Stored k for masked and causal LMs when ``top_k`` is not given.
DEFAULT_TOP_K = 64
STORAGE_DTYPES = ("float16", "float32")
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# Inputs the teacher may read, in the order they are looked up; ``teacher_`` columns (the teacher's
# own tokenization, sequence classification only) take precedence over the student's.
_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
# Config entries that name or place a model without changing what it computes.
_CONFIG_NOT_HASHED = {
    "_name_or_path",
    "transformers_version",
    "architectures",
    "dtype",
    "torch_dtype",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "_commit_hash",
}
_PROVENANCE_SUFFIX = ".json"
_CACHE_PREFIX = "teacher-logits-"
_PROVENANCE = re.compile(re.escape(_CACHE_PREFIX) + r"[0-9a-f]{32}" + re.escape(_PROVENANCE_SUFFIX))
_SHARD = re.compile(r"(" + re.escape(_CACHE_PREFIX) + r"[0-9a-f]{32})-\d{5}-of-\d{5}\.arrow")


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def weights_hash(model: nn.Module) -> str:
    """sha256 over the model's state dict: for each entry in sorted key order, its name, dtype, shape and bytes.

    The same weights give the same hash whatever the model is called or where it was loaded from;
    any changed value, dtype or shape changes it. Raises ``ValueError`` for weights that are not
    materialised (meta tensors, e.g. a DeepSpeed ZeRO-3 shard): hash the full model instead.
    """
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name]
        if tensor.is_meta:
            raise InputError(
                f"Cannot hash the teacher's weights: {name!r} is on the meta device. Load the full teacher "
                "(not a sharded or offloaded copy) to precompute its logits."
            )
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase | None) -> str | None:
    """sha256 of what in a tokenizer changes the ids the teacher sees, or None without a tokenizer.

    Covers its class, vocabulary (token -> id, added tokens included), special tokens,
    ``model_max_length``, ``padding_side`` and ``truncation_side``; not its name or path.
    """
    if tokenizer is None:
        return None
    return _sha256_json(
        {
            "class": type(tokenizer).__name__,
            "vocab": sorted(tokenizer.get_vocab().items()),
            "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
            "model_max_length": tokenizer.model_max_length,
            "padding_side": tokenizer.padding_side,
            "truncation_side": tokenizer.truncation_side,
        }
    )


def _config_hash(model: nn.Module) -> str:
    config = base_model(model).config.to_dict()
    return _sha256_json({k: v for k, v in config.items() if k not in _CONFIG_NOT_HASHED})


def _teacher_columns(dataset: Dataset, teacher: nn.Module, task: str) -> dict[str, str]:
    """Teacher argument name -> dataset column it is read from."""
    columns = set(dataset.column_names)
    own = "teacher_input_ids" in columns
    if own and task != tasks.SEQUENCE_CLASSIFICATION:
        raise InputError(
            f"The dataset has teacher_input_ids (a separate teacher tokenization) but the task is {task}: per-token "
            "teacher logits must line up with the student's tokens, so token-level tasks need one shared tokenizer. "
            "Drop the teacher_* columns and tokenize once with the teacher's tokenizer."
        )
    mapping = teacher_sources(columns, forward_params(teacher) & set(_INPUT_NAMES))
    if "input_ids" not in mapping:
        raise InputError(
            f"precompute_teacher_logits needs a tokenized dataset with an input_ids column, got columns "
            f"{dataset.column_names}. Tokenize it first (dataset.map(tokenize, batched=True))."
        )
    return mapping


def _resolve_top_k(task: str, top_k: int | None) -> int | None:
    if task not in tasks.VOCABULARY_TASKS:
        if top_k is not None:
            raise InputError(
                f"top_k={top_k} applies to masked and causal LMs (large vocabularies); a {task} teacher stores "
                "dense teacher_logits. Pass top_k=None."
            )
        return None
    if top_k is None:
        return DEFAULT_TOP_K
    if top_k < 0:  # -1: dense [L, V]
        return None
    if top_k == 0:
        raise InputError("top_k must be >= 1 (or -1 for dense [L, V] logits), got 0.")
    return top_k


def _resolve_sampling(
    task: str, sampling: Mapping[str, Any] | None, top_k: int | None, vocab_size: int | None = None
) -> dict[str, Any] | None:
    """The RS-KD sampling settings as stored in the key: ``num_samples``, ``temperature``, ``seed``;
    ``head`` when the cache keeps an exact head, ``proposal_temperature`` when the draws come from a
    tempered proposal, ``counts: False`` when the draws are stored themselves and ``scheme`` when they are
    not iid, ``head_quantized`` when the head's probabilities are stored in 8 bits, and ``allocation`` when the
    draws are shared among a row's tokens by need (each left out at its default, so plain RS-KD keys stay as
    they were)."""
    if not sampling:
        return None
    if task not in tasks.VOCABULARY_TASKS:
        raise InputError(
            f"num_samples (sampled teacher tokens) applies to masked and causal LMs, not to {task}."
        )
    if top_k is not None:
        raise InputError(
            f"Give top_k={top_k} or num_samples={sampling.get('num_samples')}, not both: they are two formats."
        )
    n, temperature = int(sampling["num_samples"]), float(sampling.get("temperature", 1.0))
    if not 1 <= n <= 255:
        raise InputError(f"num_samples must be between 1 and 255 (the counts are stored in 8 bits), got {n}.")
    if not 0 < temperature < float("inf"):
        raise InputError(f"The sampling temperature must be > 0, got {temperature}.")
    head = sampling.get("head") or 0
    if head != int(head) or head < 0 or (vocab_size is not None and head >= vocab_size):
        bound = f" and below the vocabulary size {vocab_size}" if vocab_size is not None else ""
        raise InputError(
            f"sample_head (tokens kept exactly before the sampled tail) must be a whole number >= 0{bound}, "
            f"got {head}."
        )
    proposal = float(sampling.get("proposal_temperature", 1.0))
    if not 0 < proposal < float("inf"):
        raise InputError(
            f"sample_proposal_temperature must be > 0 (1 draws from the teacher itself), got {proposal}."
        )
    counts = sampling.get("counts", True)
    if not isinstance(counts, bool):
        raise InputError(f"sample_counts must be true or false, got {counts!r}.")
    if not counts and proposal != 1.0:
        raise InputError(
            f"sample_counts=False stores the draws themselves (1/n each), but a tempered proposal's draws "
            f"(sample_proposal_temperature={proposal:g}) need their importance weights: keep sample_counts "
            "or a proposal temperature of 1."
        )
    scheme = sampling.get("scheme", "iid")
    if scheme not in SAMPLE_SCHEMES:
        raise InputError(
            f"sample_scheme must be one of {', '.join(SAMPLE_SCHEMES)} (how the draws are made), got {scheme!r}."
        )
    resolved = {"num_samples": n, "temperature": temperature, "seed": int(sampling.get("seed", 0))}
    resolved |= {"head": int(head)} if head else {}
    resolved |= {"counts": False} if not counts else {}
    resolved |= {"scheme": scheme} if scheme != "iid" else {}
    quantized = sampling.get("head_quantized", False)
    if not isinstance(quantized, bool):
        raise InputError(f"sample_head_quantized must be true or false, got {quantized!r}.")
    check_head_quantized(head, quantized)
    resolved |= {"head_quantized": True} if quantized else {}
    allocation = sampling.get("allocation", "even")
    check_allocation(allocation, counts)
    resolved |= {"allocation": allocation} if allocation != "even" else {}
    return resolved | ({"proposal_temperature": proposal} if proposal != 1.0 else {})


def check_head_quantized(head: int, quantized: bool) -> None:
    """Refuse a head in 8 bits without a head (``sample_head_quantized`` with ``sample_head = 0``), in one line."""
    if quantized and not head:
        raise InputError(
            "sample_head_quantized stores the exact head's probabilities in 8 bits, but sample_head is 0: give "
            "sample_head >= 1 or drop sample_head_quantized."
        )


def check_allocation(allocation: str, counts: bool) -> None:
    """Refuse an unknown ``sample_allocation``, or an adaptive one with counts, in one line."""
    if allocation not in DRAW_ALLOCATIONS:
        raise InputError(
            f"sample_allocation must be one of {', '.join(DRAW_ALLOCATIONS)} (how a block's draws are shared among "
            f"its tokens), got {allocation!r}."
        )
    if allocation == "adaptive" and counts:
        raise InputError(
            "sample_allocation: adaptive stores each token's draws themselves (1/n_t each), pooled: set "
            "sample_counts to false."
        )


def format_version(sampling: Mapping[str, Any] | None) -> int:
    """The cache format of these (resolved) RS-KD settings: with draws allocated by need (in a code), 8 with an
    exact head (coded with them) and 7 without; 4 with a head in 8 bits; 3 with an exact head, a tempered proposal
    or the draws stored without counts (columns a format-2 reader cannot read); else 2."""
    if sampling and sampling.get("allocation", "even") != "even":
        return CACHE_FORMAT_VERSION if sampling.get("head") else POOLED_FORMAT_VERSION
    if sampling and sampling.get("head_quantized"):
        return HEAD_QUANTIZED_FORMAT_VERSION
    shaped = ("head", "proposal_temperature", "counts")
    return 3 if sampling and any(name in sampling for name in shaped) else 2


def index_dtype(vocab_size: int) -> str:
    """The storage dtype of vocabulary ids: ``uint16`` when every id fits (V <= 65,536), else ``int32``."""
    return "uint16" if vocab_size <= 2**16 else "int32"


def teacher_cache_key(
    teacher: nn.Module,
    dataset: Dataset,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    dtype: str = "float16",
    top_k: int | None = None,
    autocast_dtype: str | None = None,
    sampling: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """The cache key (32 hex digits) and the components it hashes (stored in the provenance).

    Arguments as in :func:`precompute_teacher_logits`.
    """
    if dtype not in STORAGE_DTYPES:
        raise InputError(f"dtype must be one of {STORAGE_DTYPES} (the stored precision), got {dtype!r}.")
    if autocast_dtype is not None and autocast_dtype not in AUTOCAST_DTYPES:
        raise InputError(
            f"autocast_dtype must be None or one of {list(AUTOCAST_DTYPES)}, got {autocast_dtype!r}."
        )
    try:
        preprocessing = json.loads(json.dumps(dict(preprocessing or {}), sort_keys=True))
    except TypeError as err:
        raise TypeError(
            f"preprocessing must be JSON-serialisable settings (numbers, strings, lists): {err}"
        ) from None
    task = task_of(teacher)
    vocab_size = base_model(teacher).config.vocab_size if task in tasks.VOCABULARY_TASKS else None
    sampling = _resolve_sampling(task, sampling, top_k, vocab_size)
    components = {
        "format_version": format_version(sampling),
        "dataset_fingerprint": dataset._fingerprint,
        "num_rows": len(dataset),
        "teacher_class": type(base_model(teacher)).__name__,
        "task": task,
        "weights_hash": weights_hash(teacher),
        "config_hash": _config_hash(teacher),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "preprocessing": preprocessing,
        "input_columns": _teacher_columns(dataset, teacher, task),
        "dtype": dtype,
        "top_k": None if sampling else _resolve_top_k(task, top_k),
        "autocast_dtype": autocast_dtype,
        "sampling": sampling,
    }
    return _sha256_json(components)[:32], components


# The names of the components above, in order: load_teacher_cache rehashes them from a provenance.
_KEY_COMPONENTS = (
    "format_version",
    "dataset_fingerprint",
    "num_rows",
    "teacher_class",
    "task",
    "weights_hash",
    "config_hash",
    "tokenizer_hash",
    "preprocessing",
    "input_columns",
    "dtype",
    "top_k",
    "autocast_dtype",
    "sampling",
)


def _key_of(provenance: Mapping[str, Any], components: Mapping[str, Any]) -> str:
    """The key a provenance's own components hash to (the components named in ``components``)."""
    return _sha256_json({k: provenance.get(k) for k in components})[:32]


def cache_paths(cache_dir: str | os.PathLike, key: str) -> tuple[Path, Path]:
    """The arrow file and the provenance JSON of the cache with ``key`` in ``cache_dir``."""
    stem = Path(cache_dir) / f"{_CACHE_PREFIX}{key}"
    return stem.with_suffix(".arrow"), stem.with_suffix(_PROVENANCE_SUFFIX)


def _provenance_path(path: str | os.PathLike) -> Path:
    """The provenance JSON of a cache directory (holding exactly one cache) or of its .arrow/.json file."""
    path = Path(path)
    if path.is_dir():
        found = sorted(
            p for p in path.glob(f"{_CACHE_PREFIX}*{_PROVENANCE_SUFFIX}") if _PROVENANCE.fullmatch(p.name)
        )
        if not found:
            raise FileNotFoundError(
                f"No complete teacher cache in {path} (no provenance file): it was never completed or is "
                "elsewhere. Run precompute_teacher_logits (or scripts/precompute_teacher_logits.py) to build it."
            )
        if len(found) > 1:
            raise InputError(
                f"Expected exactly one teacher cache in {path}, found {len(found)} "
                f"({[p.name for p in found]}): pass the .json or .arrow file of the one you want."
            )
        return found[0]
    shard = _SHARD.fullmatch(path.name)  # one shard of several: the provenance of its cache
    return (
        path.with_name(shard.group(1) + _PROVENANCE_SUFFIX) if shard else path.with_suffix(_PROVENANCE_SUFFIX)
    )


def read_provenance(cache: str | os.PathLike | Dataset) -> dict[str, Any]:
    """The provenance of a teacher cache: a directory holding one cache, its ``.arrow`` or ``.json`` file,
    or a dataset returned by :func:`precompute_teacher_logits` / :func:`load_teacher_cache`."""
    if isinstance(cache, Dataset):
        files = [
            f["filename"] for f in cache.cache_files if Path(f["filename"]).name.startswith(_CACHE_PREFIX)
        ]
        if not files:
            raise InputError(
                "This dataset is not backed by a teacher cache file (it was computed in memory or transformed "
                "since): read the provenance from the cache directory instead."
            )
        cache = files[0]
    path = _provenance_path(cache)
    if not path.exists():
        raise FileNotFoundError(
            f"No teacher-cache provenance at {path}: the cache was never completed (or was made by something "
            "else). Run precompute_teacher_logits (or scripts/precompute_teacher_logits.py) to build it."
        )
    return json.loads(path.read_text())


def write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    """Write ``value`` to ``path`` through a temporary file and a rename: readers see all of it or nothing."""
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _mismatch(found: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    return [
        f"{k}: cache has {found.get(k)!r}, expected {v!r}" for k, v in expected.items() if found.get(k) != v
    ]
