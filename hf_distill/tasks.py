"""Which kind of head a model has, read off its class (no probing of attributes), and what differs between tasks.

:data:`TASK_SPECS` is the one table of what differs: how the KD logits are read off the outputs, which
positions count, how student and teacher positions align (the causal shift, once), and which KD loss
applies. The trainer reads a model's spec once (:func:`task_spec`) and calls it; it never tests the task.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers.models.auto import modeling_auto

from . import losses
from .errors import InputError
from .teacher_outputs import TeacherOutput

SEQUENCE_CLASSIFICATION = "sequence_classification"
TOKEN_CLASSIFICATION = "token_classification"
QUESTION_ANSWERING = "question_answering"
MASKED_LM = "masked_lm"
CAUSAL_LM = "causal_lm"

_MAPPINGS = {
    SEQUENCE_CLASSIFICATION: modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    TOKEN_CLASSIFICATION: modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
    QUESTION_ANSWERING: modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
    MASKED_LM: modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    CAUSAL_LM: modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
}
# Tasks whose classes are a vocabulary (teacher and student must share it).
VOCABULARY_TASKS = (MASKED_LM, CAUSAL_LM)


def _class_names(mapping) -> set[str]:
    names = set()
    for value in mapping.values():
        names.update([value] if isinstance(value, str) else value)
    return names


_CLASS_TO_TASK = {name: task for task, mapping in _MAPPINGS.items() for name in _class_names(mapping)}


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def forward_params(model: nn.Module) -> set[str]:
    """The named arguments of the (PEFT-unwrapped) model's ``forward``, without ``*args``/``**kwargs``."""
    params = inspect.signature(base_model(model).forward).parameters.values()
    return {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def task_of(model: nn.Module) -> str:
    """The task of ``model``'s head: one of the five constants of this module.

    Raises ``ValueError`` for a head hf-distill does not distil (e.g. a bare ``BertModel``).
    """
    name = type(base_model(model)).__name__
    if name not in _CLASS_TO_TASK:
        raise InputError(
            f"{name} has no head hf-distill can distil. Use a ...ForSequenceClassification, "
            "...ForTokenClassification, ...ForQuestionAnswering, ...ForMaskedLM or ...ForCausalLM model."
        )
    return _CLASS_TO_TASK[name]


def output_logits(outputs, task: str) -> torch.Tensor:
    """The logits the KD loss compares, from a model's ``outputs`` for ``task``.

    ``outputs.logits`` for every head but question answering, whose start and end logits are stacked on
    the last dimension: ``(B, L, 2)``. The one rule for the live teacher, the student (``trainer``) and
    the cached teacher (``teacher_cache``).
    """
    return TASK_SPECS[task].logits(outputs)


def output_embedding(model: nn.Module) -> nn.Module:
    """The output embedding (LM head) of a causal LM, inside any PEFT or DDP wrapper."""
    return base_model(getattr(model, "module", model)).get_output_embeddings()


def last_hidden_state(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """A causal LM's last hidden state ``(B, L, D)``, the input of its LM head, without its full logits.

    The model is called as a whole (so DDP, PEFT and hooks see a normal forward), with ``logits_to_keep=1``
    where its forward takes it; a hook on its decoder reads the decoder's output.
    """
    decoder = base_model(getattr(model, "module", model)).get_decoder()
    captured: list[torch.Tensor] = []
    handle = decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        unwrapped = getattr(model, "module", model)
        keep = {"logits_to_keep": 1} if "logits_to_keep" in forward_params(unwrapped) else {}
        model(**inputs, **keep)
    finally:
        handle.remove()
    return captured[-1]


# ---- what differs between tasks ----------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """A task's rules for the KD term. The base class is sequence classification; each other task
    overrides one or two methods (as Liger-Kernel's chunked losses override ``distillation_loss_fn``).

    - :meth:`logits`: the logits the KD loss compares, from a model's outputs;
    - :meth:`kd_mask`: which (aligned) positions count, ``(B, L')`` bool, or None for all;
    - :meth:`align`: a per-position tensor ``(B, L, ...)`` cut to the positions that are compared;
    - :meth:`kd_loss`: the KD term of aligned student logits against the aligned teacher.
    """

    name: str
    token_level: bool = False  # logits per token, over a tag set or a vocabulary
    vocabulary: bool = False  # the classes are a vocabulary, shared by teacher and student

    def logits(self, outputs) -> torch.Tensor:
        return outputs.logits

    def kd_mask(self, inputs: dict[str, Any], length: int) -> torch.Tensor | None:
        return None

    def check_labels(self, inputs: dict[str, Any], label_names: list[str], beta: float) -> None:
        """Refuse a training batch without labels when ``beta > 0`` weights the hard-label loss."""
        if beta > 0 and not all(inputs.get(name) is not None for name in label_names):
            unit = "token" if self.token_level else "example"
            raise InputError(
                f"beta={beta} weights the hard-label loss but the batch has no {label_names}. Add "
                f"labels (label -100 marks an unlabelled {unit}), or set beta=0 to learn from the teacher alone."
            )

    def align(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def kd_loss(
        self,
        name: str,
        student_logits: torch.Tensor,
        teacher: TeacherOutput,
        temperature: float,
        mask,
        inputs,
        jsd_mixture: float = 0.5,
    ) -> torch.Tensor:
        """The teacher's form chooses the formula: top-k and RS-KD caches have their own; dense logits take
        ``name`` (``args.kd_loss``, with ``args.jsd_mixture``) from :func:`hf_distill.losses.kd_loss`."""
        if teacher.form == "topk":
            return losses.topk_kl_div_loss(
                student_logits, teacher.topk_values, teacher.topk_indices, temperature, mask=mask
            )
        if teacher.form == "sampled":
            return losses.sampled_kd_loss(
                student_logits, teacher.sample_ids, teacher.sample_counts, temperature, mask=mask
            )
        t_logits = teacher.logits
        if t_logits.shape[-1] != student_logits.shape[-1]:
            raise InputError(
                f"Teacher logits have {t_logits.shape[-1]} classes but the student has {student_logits.shape[-1]}: "
                "were the cached teacher_logits computed for another task or label set?"
            )
        return losses.kd_loss(
            name,
            student_logits,
            t_logits.to(student_logits.device),
            temperature,
            mask=mask,
            jsd_mixture=jsd_mixture,
        )


@dataclass(frozen=True)
class RegressionSpec(TaskSpec):
    """A regression head (one output): the KD term is the MSE to the teacher's score, whatever ``kd_loss``."""

    def kd_loss(self, name, student_logits, teacher, temperature, mask, inputs, jsd_mixture=0.5):
        return super().kd_loss("mse", student_logits, teacher, temperature, mask, inputs, jsd_mixture)


@dataclass(frozen=True)
class TokenSpec(TaskSpec):
    """Token-level heads: rows with labels count their labelled positions (for masked LM the masked tokens,
    as in DistilBERT); rows without any label count every real token."""

    token_level: bool = True

    def kd_mask(self, inputs: dict[str, Any], length: int) -> torch.Tensor | None:
        attention = inputs.get("attention_mask")
        real = attention.bool() if attention is not None else None
        labels = inputs.get("labels")
        if labels is None:
            return real
        labelled = labels != -100
        if real is None:
            return labelled
        row_has_labels = labelled.any(dim=-1, keepdim=True)
        return torch.where(row_has_labels, labelled, real)[:, :length]


@dataclass(frozen=True)
class CausalLMSpec(TokenSpec):
    """Position ``i`` predicts token ``i + 1``: the last position is dropped, the mask shifted, and the pad
    before a left-padded row's first token predicts nothing."""

    vocabulary: bool = True

    def kd_mask(self, inputs: dict[str, Any], length: int) -> torch.Tensor | None:
        mask = super().kd_mask(inputs, length)
        if mask is None:
            return None
        mask = mask[:, 1:]
        real = inputs.get("attention_mask")
        return mask & real[:, :-1].bool() if real is not None else mask

    def align(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[:, :-1]

    def position_selector(self, inputs: dict[str, Any], hidden: torch.Tensor):
        """``select(t, aligned=False)``: the rows of ``t`` ``(B, L, ...)`` (aligned first unless ``aligned``) at the
        positions that count (:meth:`kd_mask`; every aligned position without a mask), flattened ``(N, ...)``."""
        mask = self.kd_mask(inputs, hidden.shape[1])
        if mask is None:
            mask = torch.ones(hidden.shape[0], hidden.shape[1] - 1, dtype=torch.bool, device=hidden.device)
        positions = mask.reshape(-1).nonzero().squeeze(1)

        def select(t: torch.Tensor, aligned: bool = False) -> torch.Tensor:
            t = t if aligned else self.align(t)
            return t.reshape(-1, *t.shape[2:]).index_select(0, positions)

        return select

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """The token each aligned position predicts, ``(B, L - 1)``."""
        return labels[:, 1:]


@dataclass(frozen=True)
class QuestionAnsweringSpec(TaskSpec):
    """Start and end logits stacked, ``(B, L, 2)``; the KD term is :func:`hf_distill.losses.span_kd_loss`."""

    def logits(self, outputs) -> torch.Tensor:
        return torch.stack([outputs.start_logits, outputs.end_logits], dim=-1)

    def kd_loss(self, name, student_logits, teacher, temperature, mask, inputs, jsd_mixture=0.5):
        return losses.span_kd_loss(
            name,
            student_logits,
            teacher.logits,
            temperature,
            attention_mask=inputs.get("attention_mask"),
            jsd_mixture=jsd_mixture,
        )


TASK_SPECS: dict[str, TaskSpec] = {
    SEQUENCE_CLASSIFICATION: TaskSpec(SEQUENCE_CLASSIFICATION),
    TOKEN_CLASSIFICATION: TokenSpec(TOKEN_CLASSIFICATION),
    QUESTION_ANSWERING: QuestionAnsweringSpec(QUESTION_ANSWERING),
    MASKED_LM: TokenSpec(MASKED_LM, vocabulary=True),
    CAUSAL_LM: CausalLMSpec(CAUSAL_LM),
}
REGRESSION = RegressionSpec("regression")


def task_spec(model: nn.Module) -> TaskSpec:
    """The spec of ``model``'s head: a one-output sequence-classification head is a regression."""
    task = task_of(model)
    if task == SEQUENCE_CLASSIFICATION and base_model(model).config.num_labels == 1:
        return REGRESSION
    return TASK_SPECS[task]


def labels_for_student(student_inputs: dict[str, Any], label_names: list[str], beta: float):
    """The student's inputs with its labels (``beta > 0``) or without (its own loss is then not computed), and
    whether any row has a label, as a device flag (None without labels).

    The flag stays on the device so that no Python ``if`` waits for it: a batch without any label (all -100)
    gets placeholder labels (0) for the student's loss, whose hard-label term the caller then zeroes.
    """
    if beta <= 0:
        return {k: v for k, v in student_inputs.items() if k not in label_names}, None
    labelled = torch.stack([(student_inputs[n] != -100).any() for n in label_names]).any()
    placed = {
        n: torch.where(labelled, student_inputs[n], torch.zeros_like(student_inputs[n])) for n in label_names
    }
    return {**student_inputs, **placed}, labelled
