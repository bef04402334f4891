"""Batching for distillation: the student's inputs as usual, plus the teacher's columns."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import (
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    default_data_collator,
)

from .draw_code import decode_row
from .errors import InputError
from .teacher_outputs import (
    INTEGER_COLUMNS,
    TEACHER_HEAD_IDS,
    TEACHER_LOGIT_COLUMNS,
    TEACHER_SAMPLE_CODE,
    TEACHER_SAMPLE_COUNTS,
    TEACHER_SAMPLE_IDS,
    TEACHER_SAMPLE_LENGTHS,
)
from .vocab_losses import regroup_draws

# The teacher's own tokenization, used when teacher and student tokenizers differ.
TEACHER_INPUT_PREFIX = "teacher_"


def teacher_sources(available: Iterable[str], accepted: Iterable[str]) -> dict[str, str]:
    """Teacher argument -> the column (or batch key) it is read from.

    When the teacher has its own tokenization (a ``teacher_input_ids`` column), every argument comes
    from its ``teacher_*`` column and none from the student's; otherwise from the student's columns.
    The one rule for the live teacher (the trainer) and the cached one (``teacher_cache``).
    """
    available = set(available)
    prefix = TEACHER_INPUT_PREFIX if TEACHER_INPUT_PREFIX + "input_ids" in available else ""
    return {name: prefix + name for name in sorted(accepted) if prefix + name in available}


@dataclass
class DistillationDataCollator:
    """Pads the student's features with ``base_collator`` and the ``teacher_*`` columns alongside.

    - ``teacher_input_ids`` / ``teacher_attention_mask`` / ``teacher_token_type_ids`` (the teacher's
      own tokenization) are padded to their longest row with ``teacher_pad_token_id`` / 0.
    - ``teacher_logits`` is stacked: ``(B, C)`` for sequence-level tasks, ``(B, L, C)`` for token-level
      ones, padded with zeros on the side the tokenizer pads to the student's padded length ``L``
      (padded positions are masked out of the loss). Likewise ``teacher_topk_values`` /
      ``teacher_topk_indices`` ``(B, L, k)`` and ``teacher_sample_ids`` / ``teacher_sample_counts``
      ``(B, L, n)`` (ids and counts as int64; ``teacher_sample_weights`` in the counts' place from a
      tempered proposal), with ``teacher_head_ids`` / ``teacher_head_probs`` ``(B, L, h)`` for an RS-KD
      cache with an exact head. An RS-KD cache whose draws are allocated among a row's tokens (pooled, with
      ``teacher_sample_lengths``, and stored as one code a row, ``teacher_sample_code``) is decoded and
      regrouped first: each token's draws ``(B, L, n_max)`` with counts of 1, and 0 in the padding slots.

    Without a ``base_collator``: ``DataCollatorForTokenClassification`` when the labels are lists,
    ``DataCollatorWithPadding`` for scalar labels, ``default_data_collator`` with no tokenizer.
    """

    tokenizer: PreTrainedTokenizerBase | None = None
    base_collator: Any = None
    teacher_pad_token_id: int = 0

    def _base(self, features: list[dict[str, Any]]):
        if self.base_collator is not None:
            return self.base_collator
        if self.tokenizer is None:
            return default_data_collator
        label = features[0].get("labels", features[0].get("label"))
        if isinstance(label, list | tuple) or (torch.is_tensor(label) and label.dim() > 0):
            return DataCollatorForTokenClassification(self.tokenizer)
        return DataCollatorWithPadding(self.tokenizer)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        teacher_features = [
            {k: f.pop(k) for k in list(f) if k.startswith(TEACHER_INPUT_PREFIX)} for f in features
        ]
        batch = dict(self._base(features)(features))
        if not teacher_features[0]:
            return batch
        if TEACHER_SAMPLE_LENGTHS in teacher_features[0]:
            _regroup_pooled_draws(teacher_features)
        left = self.tokenizer is not None and self.tokenizer.padding_side == "left"
        length = batch["input_ids"].shape[1] if "input_ids" in batch else None
        for key in teacher_features[0]:
            rows = [torch.as_tensor(f[key]) for f in teacher_features]
            if key in TEACHER_LOGIT_COLUMNS:
                rows = [r.long() if key in INTEGER_COLUMNS else r.float() for r in rows]
                if rows[0].dim() == 1:  # one vector per example: sequence-level logits
                    batch[key] = torch.stack(rows)
                    continue
                batch[key] = _pad(rows, length or max(len(r) for r in rows), 0, left)
            else:
                pad = self.teacher_pad_token_id if key == "teacher_input_ids" else 0
                batch[key] = _pad(rows, max(len(r) for r in rows), pad, left)
        return batch


def _regroup_pooled_draws(features: list[dict[str, Any]]) -> None:
    """Each example's pooled RS-KD draws and per-token counts (``sample_allocation: adaptive``) in place, as
    ``teacher_sample_ids`` and ``teacher_sample_counts`` ``(L, n_max)`` per token (:func:`regroup_draws`), one
    width for the batch; draws stored as a code (``teacher_sample_code``) are decoded first, with the head's ids
    ``teacher_head_ids`` where the code holds them (:func:`~hf_distill.draw_code.decode_row`)."""
    lengths = [torch.as_tensor(f.pop(TEACHER_SAMPLE_LENGTHS)).reshape(-1).long() for f in features]
    width = max([int(own.max()) for own in lengths if own.numel()], default=1)
    for feature, own in zip(features, lengths, strict=True):
        try:
            if TEACHER_SAMPLE_CODE in feature:  # the draws as stored: one code a row (format 8: with the head ids)
                head, draws = decode_row(np.asarray(feature.pop(TEACHER_SAMPLE_CODE)), own.numpy())
                feature[TEACHER_SAMPLE_IDS] = draws.reshape(own.numel(), -1) if own.numel() else draws
                if head is not None:
                    feature[TEACHER_HEAD_IDS] = head
            ids, counts = regroup_draws(torch.as_tensor(feature[TEACHER_SAMPLE_IDS]).long(), own, width)
        except ValueError as err:
            raise InputError(str(err)) from None
        feature[TEACHER_SAMPLE_IDS], feature[TEACHER_SAMPLE_COUNTS] = ids, counts


def _pad(rows: list[torch.Tensor], length: int, value: float, left: bool) -> torch.Tensor:
    """Stack ``rows`` (each ``(L_i, ...)``) into ``(B, length, ...)``, padding with ``value``."""
    out = rows[0].new_full((len(rows), length, *rows[0].shape[1:]), value)
    for i, row in enumerate(rows):
        row = row[:length]
        if left:
            out[i, length - len(row) :] = row
        else:
            out[i, : len(row)] = row
    return out
