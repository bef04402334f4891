"""The teacher's outputs a loss reads: live, or precomputed in a batch's columns, and the one reader of them.

A precomputed teacher reaches the trainer as columns of the training dataset (``hf_distill.teacher_cache``),
padded by :class:`hf_distill.DistillationDataCollator`. Each kind of cache is one *source* with its own
columns (:data:`TEACHER_SOURCES`); the trainer chooses the source once, from the dataset's columns
(:func:`teacher_source_of`), and :func:`read_teacher_outputs` reads that source from every batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch

from .errors import InputError

TEACHER_LOGITS = "teacher_logits"
TEACHER_TOPK_VALUES = "teacher_topk_values"
TEACHER_TOPK_INDICES = "teacher_topk_indices"
TEACHER_SAMPLE_IDS = "teacher_sample_ids"
TEACHER_SAMPLE_COUNTS = "teacher_sample_counts"
TEACHER_SAMPLE_WEIGHTS = "teacher_sample_weights"  # a tempered proposal's importance weights, for the counts
TEACHER_HEAD_IDS = "teacher_head_ids"  # an RS-KD cache with an exact head: its ids and probabilities
TEACHER_HEAD_PROBS = "teacher_head_probs"
TEACHER_HEAD_QUANTA = "teacher_head_quanta"  # the head's probabilities in 8 bits (k / 255), for the probs
# Each token's count of a row's pooled draws (sample_allocation: adaptive); the collator regroups them per token
# (hf_distill.vocab_losses.regroup_draws), so no batch carries it.
TEACHER_SAMPLE_LENGTHS = "teacher_sample_lengths"
# Those pooled draws as stored: one code a row (hf_distill.draw_code), decoded by the collator into
# TEACHER_SAMPLE_IDS; a dataset holding it is read as the "sampled" source.
TEACHER_SAMPLE_CODE = "teacher_sample_code"

# Where the teacher's outputs come from -> the batch columns that hold them (none: the teacher runs).
# In order of precedence: a dataset holding several caches is read as the first one listed.
LIVE = "live"
TEACHER_SOURCES: dict[str, tuple[str, ...]] = {
    "logits": (TEACHER_LOGITS,),
    "topk": (TEACHER_TOPK_VALUES, TEACHER_TOPK_INDICES),
    "sampled": (TEACHER_SAMPLE_IDS,),  # with TEACHER_SAMPLE_COUNTS or _WEIGHTS, and optionally an exact head
}
_SAMPLED_EXTRAS = (
    TEACHER_SAMPLE_COUNTS,
    TEACHER_SAMPLE_WEIGHTS,
    TEACHER_HEAD_IDS,
    TEACHER_HEAD_PROBS,
    TEACHER_HEAD_QUANTA,
    TEACHER_SAMPLE_LENGTHS,
    TEACHER_SAMPLE_CODE,
)
# Every precomputed column; and of those, the columns of integers (vocabulary ids and counts).
TEACHER_LOGIT_COLUMNS = (
    *(column for columns in TEACHER_SOURCES.values() for column in columns),
    *_SAMPLED_EXTRAS,
)
INTEGER_COLUMNS = (
    TEACHER_TOPK_INDICES,
    TEACHER_SAMPLE_IDS,
    TEACHER_SAMPLE_COUNTS,
    TEACHER_HEAD_IDS,
    TEACHER_HEAD_QUANTA,
    TEACHER_SAMPLE_LENGTHS,
)


@dataclass
class TeacherOutput:
    """What the loss needs from the teacher(s), live or precomputed.

    ``logits``: ``(B, C)``, ``(B, L, C)``, or ``(B, L, 2)`` for question answering (start, end);
    ``topk_values`` / ``topk_indices``: ``(B, L, k)`` sparse teacher logits; ``sample_ids`` /
    ``sample_counts``: ``(B, L, n)`` tokens drawn from the teacher (RS-KD); ``hidden_states`` /
    ``attentions``: the teacher model's, when a hidden-state or attention loss asks for them.
    """

    logits: torch.Tensor | None = None
    topk_values: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None
    sample_ids: torch.Tensor | None = None
    sample_counts: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None

    def map_positions(self, fn) -> TeacherOutput:
        """The same outputs with ``fn`` applied to each per-position tensor (logits and sparse columns)."""
        per_position = ("logits", "topk_values", "topk_indices", "sample_ids", "sample_counts")
        return replace(
            self, **{f: fn(getattr(self, f)) for f in per_position if getattr(self, f) is not None}
        )

    def sparse_target(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, values)`` of a sparse cache: top-k indices and logits, or RS-KD token ids and counts."""
        if self.form == "topk":
            return self.topk_indices, self.topk_values
        return self.sample_ids, self.sample_counts

    @property
    def form(self) -> str:
        """``"topk"``, ``"sampled"`` or ``"logits"``: how the teacher's distribution is given."""
        if self.topk_values is not None:
            return "topk"
        if self.sample_ids is not None:
            return "sampled"
        return "logits"


# The TeacherOutput field of each column.
_FIELD_OF = {
    TEACHER_LOGITS: "logits",
    TEACHER_TOPK_VALUES: "topk_values",
    TEACHER_TOPK_INDICES: "topk_indices",
    TEACHER_SAMPLE_IDS: "sample_ids",
    TEACHER_SAMPLE_COUNTS: "sample_counts",
}


def teacher_source_of(columns: Iterable[str]) -> str | None:
    """The precomputed source whose columns are all in ``columns`` (first in precedence), else None."""
    present = set(columns)
    present |= {TEACHER_SAMPLE_IDS} if TEACHER_SAMPLE_CODE in present else set()  # decoded by the collator
    for source, needed in TEACHER_SOURCES.items():
        if set(needed) <= present:
            return source
    return None


def read_teacher_outputs(inputs: dict[str, Any], source: str) -> TeacherOutput:
    """The precomputed teacher outputs of ``source`` from a batch; one clear error when they are missing."""
    missing = [column for column in TEACHER_SOURCES[source] if inputs.get(column) is None]
    if missing:
        raise InputError(
            f"This batch has no {', '.join(missing)}, but the trainer reads the teacher from its {source!r} cache "
            "(chosen from the training dataset's columns): precompute the teacher's outputs for every example "
            "(hf_distill.precompute_teacher_logits), or pass teacher_model and a dataset without teacher columns."
        )
    if source == "sampled":
        ids, values = sampled_target(inputs)
        return TeacherOutput(sample_ids=ids, sample_counts=values)
    return TeacherOutput(**{_FIELD_OF[column]: inputs[column] for column in TEACHER_SOURCES[source]})


def sampled_target(inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The RS-KD cache's sparse target in a batch: ``(ids, values)`` for ``kd="sampled"``.

    Plain RS-KD: ``teacher_sample_ids`` and their ``teacher_sample_counts`` (or, from a tempered proposal, their
    importance weights ``teacher_sample_weights``; or neither, when the ids are the draws themselves, each
    counted once). With an exact head (``teacher_head_ids`` and
    ``teacher_head_probs``, or ``teacher_head_quanta``, the same in 8 bits, read as ``k / 255``): the head ids
    then the tail's, weighted by :func:`hf_distill.vocab_losses.head_tail_weights` (``p_i`` on each head id,
    ``m * c_j / n`` on the tail's).
    Either way the values are the target's weights, summing to 1 (counts: to ``n``, read as ``c / n``).
    """
    from . import vocab_losses

    ids = inputs[TEACHER_SAMPLE_IDS]
    if inputs.get(TEACHER_SAMPLE_COUNTS) is not None:
        counts = inputs[TEACHER_SAMPLE_COUNTS]
    elif inputs.get(TEACHER_SAMPLE_WEIGHTS) is not None:  # stored rounded: summing to 1 again
        counts = vocab_losses.normalised(inputs[TEACHER_SAMPLE_WEIGHTS])
    else:  # the draws themselves (sample_counts=False): each counts once
        counts = torch.ones_like(ids, dtype=torch.float32)
    if inputs.get(TEACHER_HEAD_IDS) is None:
        return ids, counts
    head_probs = inputs.get(TEACHER_HEAD_PROBS)
    if head_probs is None:
        head_probs = vocab_losses.dequantize_probs(inputs[TEACHER_HEAD_QUANTA])
    weights = vocab_losses.head_tail_weights(head_probs, counts)
    return torch.cat([inputs[TEACHER_HEAD_IDS], ids], dim=-1), weights
