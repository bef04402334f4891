"""The trainer's loss path, chosen once at construction from the settings, the models and the data's columns.

:func:`choose_loss_path` is a pure function: the trainer calls it in ``__init__``, logs the result once
(:meth:`LossPath.describe`), and each ``compute_loss`` then has one ``if``. A combination that cannot work
raises there, naming the setting to change; one that works on the slower dense path says why it was taken.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from datasets import Dataset
from transformers.utils import logging

from .config import DistillationConfig
from .errors import InputError
from .rollouts import COMPLETION_COLUMN
from .tasks import CausalLMSpec, TaskSpec, output_embedding
from .teacher_cache import read_provenance
from .teacher_outputs import LIVE, TEACHER_SOURCES, teacher_source_of

logger = logging.get_logger(__name__)

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

    def log(self, logger, spec: TaskSpec) -> None:
        """Once, at construction: a warning when a vocabulary task forms the full logits, else info."""
        (logger.warning if spec.vocabulary and self.name != FUSED else logger.info)(
            f"hf_distill: {self.describe()}"
        )

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
    models=(),
) -> LossPath:
    """The path for this trainer. ``columns``: the training dataset's columns (None when unknown);
    ``models``: the student and live teachers (an output embedding with a bias keeps the dense path)."""
    teacher = choose_teacher_source(args, num_teachers, columns)
    head_has_bias = spec.vocabulary and any(output_embedding(m).bias is not None for m in models)
    if teacher in ("topk", "sampled") and args.alpha > 0 and args.kd_loss != "kl":
        form = "its top-k logits" if teacher == "topk" else "tokens drawn from it"
        raise InputError(
            f"kd_loss={args.kd_loss!r} needs the teacher's whole distribution, but the training dataset holds "
            f"{form} ({', '.join(TEACHER_SOURCES[teacher])}), which give the forward KL only: set kd_loss='kl', "
            "or distil from a live teacher or dense cached logits."
        )
    if not isinstance(spec, CausalLMSpec):
        _refuse_vocab_slices(args, f"{spec.name} logits")
        return LossPath(DENSE, teacher, f"{spec.name} logits")
    if args.lm_chunk_size is None:
        _refuse_vocab_slices(args, "lm_chunk_size=None")
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
        _refuse_vocab_slices(args, "; ".join(reasons))
        return LossPath(
            DENSE, teacher, "; ".join(reasons) + ": the (positions x vocabulary) logits are formed"
        )
    slices = f", the heads in {args.lm_vocab_slices} vocabulary slices" if args.lm_vocab_slices > 1 else ""
    return LossPath(FUSED, teacher, f"chunked causal-LM loss, {args.lm_chunk_size} positions a chunk{slices}")


def _refuse_vocab_slices(args: DistillationConfig, why: str) -> None:
    """``lm_vocab_slices > 1`` slices the fused loss's heads: refused where the dense path is taken."""
    if args.lm_vocab_slices > 1:
        raise InputError(
            f"lm_vocab_slices={args.lm_vocab_slices} reads the fused causal-LM loss's heads in slices, but this run "
            f"takes the dense path ({why}): set lm_vocab_slices=1."
        )


def check_sample_temperature(path: LossPath, dataset, args: DistillationConfig) -> None:
    """An RS-KD cache's tokens were drawn at its sampling temperature: training at another T is refused."""
    if path.teacher != "sampled" or args.alpha == 0 or not isinstance(dataset, Dataset):
        return
    try:
        drawn_at = read_provenance(dataset)["sampling"]["temperature"]
    except (InputError, FileNotFoundError, KeyError):
        logger.warning(
            "hf_distill: the RS-KD cache's sampling temperature cannot be read (the dataset is no longer "
            f"backed by its cache file); make sure it was drawn at temperature={args.temperature}."
        )
        return
    if drawn_at != args.temperature:
        raise InputError(
            f"The RS-KD cache's tokens were drawn from the teacher's softmax at T={drawn_at}, but this run "
            f"trains at temperature={args.temperature}: the loss would distil toward the wrong distribution. "
            f"Set temperature={drawn_at}, or precompute the cache with sample_temperature={args.temperature}."
        )


def check_train_columns(
    columns: list[str] | None, args: DistillationConfig, label_names: list[str], has_teacher: bool
) -> None:
    """Refuse a training dataset whose columns cannot feed the loss: labels for ``beta > 0``, a teacher."""
    if columns is None:
        return
    label_columns = set(label_names) | {"label", "label_ids", COMPLETION_COLUMN}
    if args.beta > 0 and not label_columns & set(columns):
        raise InputError(
            f"beta={args.beta} weights the hard-label loss but the training dataset has no label column "
            f"(columns: {columns}). Add labels, or set beta=0 to learn from the teacher's soft labels alone."
        )
    if not has_teacher and teacher_source_of(columns) is None:
        raise InputError(
            "No teacher: pass teacher_model, or a training dataset with precomputed teacher logits "
            "(hf_distill.precompute_teacher_logits)."
        )
    if not has_teacher and (args.hidden_loss_weight > 0 or args.attention_loss_weight > 0):
        raise InputError("Hidden-state and attention losses need a live teacher_model, not cached logits.")
