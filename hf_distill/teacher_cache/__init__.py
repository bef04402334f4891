"""Precomputed teacher logits: computed once into a ``datasets`` cache file, reused only when they match.

:func:`precompute_teacher_logits` runs the teacher once over a tokenized dataset and returns it with
the teacher's outputs as columns (the contract of :class:`hf_distill.DistillationTrainer`);
:func:`precompute_teacher_caches` writes several formats' caches from one teacher pass:

- ``teacher_logits``: sequence classification ``[C]``; token classification ``[L, C]``; question
  answering ``[L, 2]`` (start, end stacked on the last dim); masked/causal LM with ``top_k=None``
  (dense) ``[L, V]``.
- ``teacher_topk_values`` + ``teacher_topk_indices`` ``[L, k]``: masked and causal LM (the default,
  ``k = DEFAULT_TOP_K``): the ``k`` largest raw logits (``T = 1``) and their vocabulary ids.
  **Mass outside the top k**: :func:`hf_distill.losses.topk_kl_div_loss` renormalises the teacher
  over its top ``k`` (the mass outside is set to zero), while the student keeps its full softmax,
  so the KD term pulls the student's mass onto the teacher's top ``k`` tokens. With ``k`` at 20 to
  100 the dropped mass of a trained LM is small at ``T = 1``; higher temperatures flatten the
  teacher and make it larger, so raise ``k`` with ``T``.
- ``teacher_sample_ids`` + ``teacher_sample_counts`` ``[L, n]``: masked and causal LM with
  ``num_samples=n``: RS-KD, ``n`` tokens drawn from the teacher (:func:`hf_distill.vocab_losses.sample_teacher_tokens`);
  with ``sample_head=h`` also ``teacher_head_ids`` + ``teacher_head_probs`` ``[L, h]``, the ``h`` most
  likely tokens kept exactly, the draws coming from the rest
  (:func:`hf_distill.vocab_losses.sample_head_and_tail`); with ``sample_allocation="adaptive"`` the row's
  ``n L`` draws are shared among its tokens by need and stored pooled, one code a row in
  ``teacher_sample_code`` (about 8.8 bits a draw, with the head's ids in it: no ``teacher_head_ids`` column;
  :mod:`hf_distill.draw_code`), with each token's count in ``teacher_sample_lengths`` ``[L, 1]``
  (:func:`hf_distill.vocab_losses.allocate_draws`).

``L`` is each example's own length (``len(input_ids)``): nothing is stored for padding. The
teacher sees the inputs as stored, so inputs that a collator changes at random each epoch (masked
LM's dynamic masking) do not go with cached logits: mask once before caching (static masking), or
run the teacher live.

The cache is one or more ``datasets`` cache files (one per process that computed it, :mod:`.shards`)
written by ``Dataset.map(cache_file_name=...)``, which writes to a temporary file and renames it
when complete, so an interrupted run leaves no file under the cache name. Beside them a JSON provenance file
(:func:`read_provenance`) records the teacher, its weights hash, the dtype, ``top_k``, every key
component, the shard files and the storage size; it is written after the arrow files, and a cache is
used only when all exist and agree. The key (:func:`teacher_cache_key`) hashes everything that changes the
stored values: the dataset's fingerprint, the teacher's weights (:func:`weights_hash`, not its
name), class and config, the tokenizer (:func:`tokenizer_hash`), the preprocessing settings, the
stored dtype, ``top_k`` and the autocast dtype. A different request has a different key, hence a
different file: it is recomputed, never answered from a stale cache. :func:`load_teacher_cache`
opens a cache made elsewhere and refuses it when its provenance differs from what is expected.

One module per concept: :mod:`.key` (the key, the provenance file), :mod:`.storage` (the data
file: columns, checks, size), :mod:`.inference` (the teacher's forward in length-sorted batches),
:mod:`.shards` (a cache in one shard per process), :mod:`.precompute` (the two entry points).
"""

from .inference import length_sorted_batches
from .key import (
    AUTOCAST_DTYPES,
    CACHE_FORMAT_VERSION,
    DEFAULT_TOP_K,
    STORAGE_DTYPES,
    cache_paths,
    read_provenance,
    teacher_cache_key,
    tokenizer_hash,
    weights_hash,
    write_json_atomic,
)
from .precompute import (
    FORMAT_OPTIONS,
    SAMPLE_SHAPE_OPTIONS,
    SAMPLING_DEFAULTS,
    load_teacher_cache,
    precompute_teacher_caches,
    precompute_teacher_logits,
)
from .storage import TEACHER_COLUMNS, check_finite_logits, nonfinite_rows

__all__ = [
    "AUTOCAST_DTYPES",
    "CACHE_FORMAT_VERSION",
    "DEFAULT_TOP_K",
    "FORMAT_OPTIONS",
    "SAMPLE_SHAPE_OPTIONS",
    "SAMPLING_DEFAULTS",
    "STORAGE_DTYPES",
    "TEACHER_COLUMNS",
    "cache_paths",
    "check_finite_logits",
    "length_sorted_batches",
    "load_teacher_cache",
    "nonfinite_rows",
    "precompute_teacher_caches",
    "precompute_teacher_logits",
    "read_provenance",
    "teacher_cache_key",
    "tokenizer_hash",
    "weights_hash",
    "write_json_atomic",
]
