"""The settings of a distillation run: one ``TrainingArguments`` subclass."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from .losses import KD_LOSSES

HIDDEN_LOSSES = ("cosine", "mse")
TEACHER_DTYPES = ("float32", "bfloat16", "float16")
SEED_MAX = 2**32 - 1  # NumPy's seeds are 32-bit


@dataclass(frozen=True)
class Range:
    """The values a numeric setting takes: a finite number from ``low`` to ``high`` (``open`` ends excluded)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high == math.inf:
            text = f"{'>' if self.low_open else '>='} {low}"
        else:
            text = f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        return text + (f" ({self.note})" if self.note else "")


def _number(x: float) -> str:
    return str(int(x)) if math.isfinite(x) and x == int(x) else f"{x:g}"


AT_LEAST_1 = Range(1)
AT_LEAST_0 = Range(0)
POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1, high_open=True)
SEED = Range(0, SEED_MAX)


def check_ranges(settings: Any, ranges: dict[str, Range]) -> None:
    """Raise ``ValueError`` naming the first field of ``settings`` outside its range (None is left alone)."""
    for name, allowed in ranges.items():
        value = getattr(settings, name)
        if value is None:
            continue
        values = value if isinstance(value, list | tuple) else [value]
        for item in values:
            if isinstance(item, bool) or not isinstance(item, numbers.Real) or item not in allowed:
                raise ValueError(f"{name} must be {allowed}, got {value!r}.")


# The numeric settings of TrainingArguments that have a valid range; checked on the values as given,
# before TrainingArguments converts some of them or fails on them with an error that names no key.
TRAINING_RANGES = {
    "lm_chunk_size": AT_LEAST_1,
    "lm_vocab_slices": AT_LEAST_1,
    "jsd_mixture": Range(0, 1),
    "lmbda": Range(0, 1),
    "rollout_max_new_tokens": AT_LEAST_1,
    "rollout_temperature": POSITIVE,
    "rollout_top_p": Range(0, 1, low_open=True),
    "rollout_samples": AT_LEAST_0,
    "per_device_train_batch_size": AT_LEAST_1,
    "per_device_eval_batch_size": AT_LEAST_1,
    "gradient_accumulation_steps": AT_LEAST_1,
    "eval_accumulation_steps": AT_LEAST_1,
    "num_train_epochs": AT_LEAST_0,
    "max_steps": Range(-1, note="-1: num_train_epochs decides"),
    "learning_rate": AT_LEAST_0,
    "warmup_steps": Range(0, note="a fraction of the steps if < 1"),
    "weight_decay": AT_LEAST_0,
    "adam_beta1": FRACTION,
    "adam_beta2": FRACTION,
    "adam_epsilon": POSITIVE,
    "max_grad_norm": AT_LEAST_0,
    "label_smoothing_factor": FRACTION,
    "neftune_noise_alpha": AT_LEAST_0,
    "torch_empty_cache_steps": AT_LEAST_1,
    "logging_steps": Range(0, low_open=True, note="a fraction of the steps if < 1"),
    "eval_steps": Range(0, low_open=True, note="a fraction of the steps if < 1"),
    "save_steps": Range(0, low_open=True, note="a fraction of the steps if < 1"),
    "eval_delay": AT_LEAST_0,
    "save_total_limit": Range(0, note="0: no limit"),
    "seed": SEED,
    "data_seed": SEED,
    "dataloader_num_workers": AT_LEAST_0,
    "dataloader_prefetch_factor": AT_LEAST_1,
    "ddp_bucket_cap_mb": AT_LEAST_1,
    "ddp_timeout": POSITIVE,
    "local_rank": Range(-1),
}


@dataclass
class DistillationConfig(TrainingArguments):
    """``TrainingArguments`` plus the distillation settings.

    The loss is ``alpha * KD + beta * CE + hidden_loss_weight * H + attention_loss_weight * A`` where
    ``KD`` is the soft-label loss at ``temperature`` (scaled by ``T**2``), ``CE`` the student's own
    hard-label loss at ``T = 1``, ``H`` the hidden-state loss and ``A`` the attention-map loss.
    """

    temperature: float = field(
        default=2.0,
        metadata={"help": "Softmax temperature T > 0 of the soft labels. Evaluation always uses T = 1."},
    )
    alpha: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the soft-label KD term (teacher). >= 0; alpha=1, beta=0 is pure distillation."
        },
    )
    beta: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the hard-label CE term (true labels). >= 0; needs a 'labels' column if > 0."
        },
    )
    kd_loss: str = field(
        default="kl",
        metadata={
            "help": "Soft-label loss: 'kl' (forward KL, Hinton), 'reverse_kl', 'jsd' or 'mse' (on logits). "
            "Regression heads (num_labels=1) always use MSE on the teacher's score.",
            "choices": list(KD_LOSSES),
        },
    )
    jsd_mixture: float = field(
        default=0.5,
        metadata={
            "help": "kd_loss='jsd': the generalized JSD's mixture coefficient b in [0, 1], m = b p_t + (1 - b) p_s "
            "(GKD's beta; 0 is the forward KL, 1 the reverse KL). Named apart from alpha and beta, the KD and CE "
            "weights."
        },
    )
    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "On-policy share (GKD's lambda, in [0, 1]): the fraction of optimizer steps on which the student "
            "samples completions to the batch's prompts and the live teacher scores them. Needs instruction data "
            "(hf_distill.tokenize_instruction_dataset)."
        },
    )
    seq_kd: bool = field(
        default=False,
        metadata={
            "help": "Sequence-level KD: on the steps where the student does not generate, the teacher samples the "
            "completions (instead of the dataset's)."
        },
    )
    rollout_max_new_tokens: int = field(
        default=128, metadata={"help": "Longest completion a rollout generates (>= 1); cut ones are counted."}
    )
    rollout_temperature: float = field(
        default=0.9, metadata={"help": "Sampling temperature of rollouts (> 0; TRL GKD's default 0.9)."}
    )
    rollout_top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of rollouts, in (0, 1]."})
    rollout_samples: int = field(
        default=32,
        metadata={
            "help": "Rollouts written to <output_dir>/rollouts.jsonl (prompt, completion, who wrote it, the step), "
            "so that a result can be traced; 0 writes none."
        },
    )
    hidden_loss: str | None = field(
        default=None,
        metadata={
            "help": "Hidden-state loss: 'cosine' (DistilBERT) or 'mse' (TinyBERT); None for no hidden-state loss.",
            "choices": [*HIDDEN_LOSSES, None],
        },
    )
    hidden_loss_weight: float = field(
        default=0.0, metadata={"help": "Weight of the hidden-state loss (>= 0; > 0 needs hidden_loss)."}
    )
    attention_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the attention-map MSE (TinyBERT) over mapped layers (>= 0)."},
    )
    layer_map: list[int] | None = field(
        default=None,
        metadata={
            "help": "Teacher layer matched by each student layer, for the hidden-state and attention losses: "
            "entry i is the teacher layer (1-based; 0 is the embeddings) for student layer i + 1. "
            "Default: evenly spaced, the last student layer matched to the last teacher layer."
        },
    )
    teacher_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "Weights of an ensemble of teachers (one per teacher, >= 0); default equal weights."
        },
    )
    teacher_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Dtype of the frozen teacher's weights: 'float32', 'bfloat16' or 'float16'. Default (None): "
            "'bfloat16' with bf16, 'float16' with fp16, else the teacher's own dtype. Holding the teacher in the "
            "mixed-precision dtype saves the weight casts of autocast at every forward and half its memory.",
            "choices": [*TEACHER_DTYPES, None],
        },
    )

    @property
    def teacher_torch_dtype(self) -> torch.dtype | None:
        """The dtype the teacher is cast to (``teacher_dtype``, else the mixed precision's); None: keep its own."""
        if self.teacher_dtype is not None:
            return getattr(torch, self.teacher_dtype)
        if self.bf16:
            return torch.bfloat16
        if self.fp16:
            return torch.float16
        return None

    lm_chunk_size: int | None = field(
        default=1024,
        metadata={
            "help": "Causal LMs: positions per chunk of the fused KD + CE loss, which forms the (positions x "
            "vocabulary) logits of student and teacher a chunk at a time and never whole "
            "(hf_distill.vocab_losses.chunked_lm_losses). None: the models' full logits and the dense losses. "
            "Hidden-state and attention losses use the dense path."
        },
    )
    lm_vocab_slices: int = field(
        default=1,
        metadata={
            "help": "Causal LMs, fused loss: read the student's and a live teacher's output embeddings in this many "
            "vocabulary slices (hf_distill.vocab_slices.sliced_lm_losses), so FSDP2 or DeepSpeed ZeRO-3 gathers V / "
            "lm_vocab_slices rows of a head at a time instead of the whole head (ZeRO-3 still holds the student "
            "head's whole gradient in backward); each head is then read 2 times a step (3 for kd_loss='jsd'). 1 "
            "(default): the whole head, gathered once. Not with ZeRO-3 parameters offloaded to NVMe or quantized."
        },
    )
    check_finite: bool = field(
        default=True,
        metadata={
            "help": "Stop training, naming the step, when a live teacher's outputs hold NaN or inf: checked once "
            "per optimizer step, before the step, so the student is never updated from them (one device sync "
            "per step; set False on GPUs to skip it). Cached teacher logits are always checked when the "
            "trainer receives them."
        },
    )

    def __post_init__(self):
        check_ranges(self, TRAINING_RANGES)  # first: see TRAINING_RANGES
        super().__post_init__()
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be > 0, got {self.temperature}. Typical values are 1 to 10.")
        for name in ("alpha", "beta", "hidden_loss_weight", "attention_loss_weight"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:  # also refuses NaN
                raise ValueError(f"{name} must be >= 0, got {value} (a finite number is expected).")
        if (
            self.alpha == 0
            and self.beta == 0
            and self.hidden_loss_weight == 0
            and self.attention_loss_weight == 0
        ):
            raise ValueError(
                "alpha, beta, hidden_loss_weight and attention_loss_weight are all 0: nothing to learn."
            )
        if self.kd_loss not in KD_LOSSES:
            raise ValueError(f"kd_loss must be one of {KD_LOSSES}, got {self.kd_loss!r}.")
        if self.hidden_loss is not None and self.hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"hidden_loss must be one of {HIDDEN_LOSSES} or None, got {self.hidden_loss!r}.")
        if self.hidden_loss_weight > 0 and self.hidden_loss is None:
            raise ValueError(
                f"hidden_loss_weight={self.hidden_loss_weight} but hidden_loss is None: set hidden_loss to "
                f"one of {HIDDEN_LOSSES} or hidden_loss_weight to 0."
            )
        if self.layer_map is not None and any(i < 0 for i in self.layer_map):
            raise ValueError(f"layer_map entries are teacher layer numbers >= 0, got {self.layer_map}.")
        if self.teacher_dtype is not None and self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(
                f"teacher_dtype must be one of {TEACHER_DTYPES} or None (follow bf16/fp16), got {self.teacher_dtype!r}."
            )
        if self.teacher_weights is not None:
            if not all(0 <= w < math.inf for w in self.teacher_weights) or sum(self.teacher_weights) <= 0:
                raise ValueError(
                    f"teacher_weights must be >= 0 with a positive sum, got {self.teacher_weights}."
                )
