"""Which kind of head a model has, read off its class (no probing of attributes)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers.models.auto import modeling_auto

from .errors import InputError

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
# Tasks whose logits have one row per token, compared over the vocabulary or the tag set.
TOKEN_LEVEL = (TOKEN_CLASSIFICATION, MASKED_LM, CAUSAL_LM)
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
    if task == QUESTION_ANSWERING:
        return torch.stack([outputs.start_logits, outputs.end_logits], dim=-1)
    return outputs.logits


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
