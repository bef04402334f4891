"""Loading teachers, checking they fit the student, and placing them frozen on the student's device."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from . import tasks
from .errors import InputError
from .optional import require
from .tasks import base_model, task_of

_AUTO_CLASSES = {
    tasks.SEQUENCE_CLASSIFICATION: AutoModelForSequenceClassification,
    tasks.TOKEN_CLASSIFICATION: AutoModelForTokenClassification,
    tasks.QUESTION_ANSWERING: AutoModelForQuestionAnswering,
    tasks.MASKED_LM: AutoModelForMaskedLM,
    tasks.CAUSAL_LM: AutoModelForCausalLM,
}


def load_teacher(teacher: PreTrainedModel | str, task: str, **from_pretrained_kwargs) -> PreTrainedModel:
    """``teacher`` itself, or the model of ``task`` loaded from a local path or Hub id, frozen in eval mode.

    A local checkpoint that ships its own modelling code (``auto_map`` in its ``config.json``) is
    refused unless ``trust_remote_code=True`` is passed (``teacher_init_kwargs`` of the trainer):
    loading it runs that code. For a Hub id, ``transformers`` itself asks for it.
    """
    if isinstance(teacher, str):
        _refuse_remote_code(teacher, from_pretrained_kwargs.get("trust_remote_code"))
        teacher = _AUTO_CLASSES[task].from_pretrained(teacher, **from_pretrained_kwargs)
    if not isinstance(teacher, nn.Module):
        raise TypeError(
            f"teacher_model must be a model, a local path or a Hub id, got {type(teacher).__name__}."
        )
    teacher.requires_grad_(False)
    return teacher.eval()


def cast_teacher(teacher: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``teacher`` with its floating-point weights cast to ``dtype``, in place (a quantized teacher is left as is).

    A teacher held in the mixed-precision dtype runs under autocast without casting its weights at
    every forward, in half the memory of float32 weights.
    """
    if getattr(base_model(teacher).config, "quantization_config", None) is not None:
        return teacher
    return teacher.to(dtype)


def _refuse_remote_code(path: str, trust_remote_code: bool | None) -> None:
    config = Path(path) / "config.json"
    if trust_remote_code is True or not config.is_file():
        return
    try:
        auto_map = json.loads(config.read_text(encoding="utf-8")).get("auto_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return  # not ours to judge: from_pretrained reports a broken config
    if auto_map:
        raise InputError(
            f"The teacher at {path} ships its own modelling code (config.json auto_map: {auto_map}); loading it "
            "would run that code on this machine. Read the code, then allow it with "
            "teacher_init_kwargs={'trust_remote_code': True} (DistillationTrainer) or "
            "load_teacher(path, task, trust_remote_code=True); or load the model yourself and pass the model."
        )


def check_compatible(
    student: nn.Module,
    teacher: nn.Module,
    *,
    student_tokenizer: PreTrainedTokenizerBase | None = None,
    teacher_tokenizer: PreTrainedTokenizerBase | None = None,
) -> None:
    """Raise ``ValueError`` when ``teacher`` cannot be distilled into ``student``.

    Both must have the same kind of head; classifiers the same labels in the same order
    (``id2label``); token-level language models the same vocabulary.
    """
    student_task, teacher_task = task_of(student), task_of(teacher)
    if student_task != teacher_task:
        raise InputError(
            f"The teacher is a {teacher_task} model ({type(base_model(teacher)).__name__}) but the student is a "
            f"{student_task} model ({type(base_model(student)).__name__}): both need the same kind of head."
        )
    s_cfg, t_cfg = base_model(student).config, base_model(teacher).config
    if student_task in (tasks.SEQUENCE_CLASSIFICATION, tasks.TOKEN_CLASSIFICATION):
        s_labels = {int(k): v for k, v in s_cfg.id2label.items()}
        t_labels = {int(k): v for k, v in t_cfg.id2label.items()}
        if s_labels != t_labels:
            raise InputError(
                f"Teacher and student labels differ: teacher id2label={t_labels}, student id2label={s_labels}. "
                "Build the student with the teacher's id2label/label2id (same labels, same order)."
            )
    if student_task in tasks.VOCABULARY_TASKS:
        if s_cfg.vocab_size != t_cfg.vocab_size:
            raise InputError(
                f"Teacher vocab_size={t_cfg.vocab_size} but student vocab_size={s_cfg.vocab_size}: token-level "
                "distillation compares distributions over the same vocabulary; use a student with the teacher's "
                "tokenizer."
            )
        if (
            student_tokenizer is not None
            and teacher_tokenizer is not None
            and student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab()
        ):
            raise InputError(
                "Teacher and student tokenizers have different vocabularies: token-level distillation needs the "
                "same vocabulary (same tokens with the same ids)."
            )


def prepare_teacher(teacher: nn.Module, accelerator: Accelerator) -> nn.Module:
    """Place a frozen teacher for inference beside the student.

    DeepSpeed: an inference engine with the student's ZeRO config (stage 3 shards the teacher too,
    other stages become stage 0, no optimizer). Everything else (CPU, one GPU, DDP, FSDP): Accelerate's
    ``prepare_model(..., evaluation_mode=True)``, which moves it to the device and applies mixed
    precision without wrapping it for training (each rank holds a full copy).
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        deepspeed = require("deepspeed", "A DeepSpeed run (an accelerate config with deepspeed_config)")

        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        config.pop("optimizer", None)
        config.pop("scheduler", None)
        zero = config.setdefault("zero_optimization", {})
        if zero.get("stage") == 3:
            hidden = getattr(base_model(teacher).config, "hidden_size", None)
            if hidden is not None:
                zero["reduce_bucket_size"] = hidden * hidden
                zero["stage3_param_persistence_threshold"] = 10 * hidden
                zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden * hidden)
        else:
            zero["stage"] = 0
        engine, *_ = deepspeed.initialize(model=teacher, config=config)
        engine.eval()
        return engine
    return accelerator.prepare_model(teacher, evaluation_mode=True).eval()
