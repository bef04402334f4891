"""The trainer's loss path, chosen once at construction from the settings, the models and the data's columns.

:func:`choose_loss_path` is a pure function: the trainer calls it in ``__init__``, logs the result once
(:meth:`LossPath.describe`), and each ``compute_loss`` then has one ``if``. A combination that cannot work
raises there, naming the setting to change; one that works on the slower dense path says why it was taken.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .config import DistillationConfig
from .errors import InputError
from .tasks import CausalLMSpec, TaskSpec
from .teacher_outputs import LIVE, TEACHER_SOURCES, teacher_source_of

FUSED = "fused"  # causal LMs: hf_distill.vocab_losses.chunked_lm_losses, never the (positions x vocabulary) logits
DENSE = "dense"  # the models' logits and hf_distill.losses


@dataclass(frozen=True)
class LossPath:
    """Which loss runs and where the teacher's outputs come from.

    ``name``: :data:`FUSED` or :data:`DENSE`. ``teacher``: ``"live"`` (the teacher model runs), a key of
    :data:`hf_distill.teacher_outputs.TEACHER_SOURCES` (a cache in the batch's columns), or None (no teacher
    and no cached columns known yet: a batch is then refused). ``reason``: why this path.
    """

    name: str
    teacher: str | None
    reason: str

    def describe(self) -> str:
        where = {LIVE: "the live teacher", None: "no teacher"}.get(self.teacher, f"the {self.teacher} cache")
        return f"loss path: {self.name} ({self.reason}); teacher outputs from {where}"


def choose_teacher_source(
    args: DistillationConfig, num_teachers: int, columns: Iterable[str] | None
) -> str | None:
    """``"live"``, a cache source, or None. Cached columns come first, except that hidden-state and attention
    losses need the live teacher's activations (its logits then come from the same forward)."""
    if args.hidden_loss_weight > 0 or args.attention_loss_weight > 0:
        return LIVE
    cached = teacher_source_of(columns) if columns is not None else None
    if cached is not None:
        return cached
    return LIVE if num_teachers else None


def choose_loss_path(
    args: DistillationConfig,
    spec: TaskSpec,
    *,
    num_teachers: int,
    columns: Iterable[str] | None,
    head_has_bias: bool = False,
) -> LossPath:
    """The path for this trainer. ``columns``: the training dataset's columns (None when unknown);
    ``head_has_bias``: whether the student's or a live teacher's output embedding has a bias."""
    teacher = choose_teacher_source(args, num_teachers, columns)
    if teacher in ("topk", "sampled") and args.alpha > 0 and args.kd_loss != "kl":
        form = "its top-k logits" if teacher == "topk" else "tokens drawn from it"
        raise InputError(
            f"kd_loss={args.kd_loss!r} needs the teacher's whole distribution, but the training dataset holds "
            f"{form} ({', '.join(TEACHER_SOURCES[teacher])}), which give the forward KL only: set kd_loss='kl', "
            "or distil from a live teacher or dense cached logits."
        )
    if not isinstance(spec, CausalLMSpec):
        return LossPath(DENSE, teacher, f"{spec.name} logits")
    if args.lm_chunk_size is None:
        return LossPath(DENSE, teacher, "lm_chunk_size=None")
    dense_because = [
        (args.hidden_loss_weight > 0, "hidden_loss_weight > 0 needs the full forward"),
        (args.attention_loss_weight > 0, "attention_loss_weight > 0 needs the full forward"),
        (num_teachers > 1 and teacher == LIVE, "an ensemble of teachers mixes full distributions"),
        (teacher == "logits", "the cached teacher logits are dense"),
        (args.kd_loss == "mse", "kd_loss='mse' compares the full logits"),
        (head_has_bias, "an output embedding has a bias"),
    ]
    reasons = [why for hit, why in dense_because if hit]
    if reasons:
        return LossPath(
            DENSE, teacher, "; ".join(reasons) + ": the (positions x vocabulary) logits are formed"
        )
    return LossPath(FUSED, teacher, f"chunked causal-LM loss, {args.lm_chunk_size} positions a chunk")
