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
from .losses import ensemble_logits
from .optional import require
from .tasks import base_model, task_of
from .teacher_outputs import TeacherOutput

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
                "same vocabulary (same tokens with the same ids); cross-tokenizer KD is not supported yet."
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


def load_teachers(
    student: nn.Module,
    teacher_model,
    args,
    init_kwargs: dict | None = None,
    *,
    student_tokenizer: PreTrainedTokenizerBase | None = None,
    teacher_tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[list[nn.Module], list[float]]:
    """The teachers (one, a list, or none), loaded by name in ``args.teacher_torch_dtype`` or cast to it, checked
    against the student, and their normalised ensemble weights (``args.teacher_weights``, default equal)."""
    listed = teacher_model if isinstance(teacher_model, list | tuple) else [teacher_model]
    dtype = args.teacher_torch_dtype
    init_kwargs = dict(init_kwargs or {})
    if dtype is not None and "dtype" not in init_kwargs and "torch_dtype" not in init_kwargs:
        init_kwargs["dtype"] = dtype  # teachers loaded by name: in that dtype from the start
    teachers = [load_teacher(t, task_of(student), **init_kwargs) for t in listed if t is not None]
    teachers = [cast_teacher(t, dtype) for t in teachers] if dtype is not None else teachers
    for teacher in teachers:
        check_compatible(
            student, teacher, student_tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer
        )
    weights = args.teacher_weights or [1.0] * len(teachers)
    if teachers and len(weights) != len(teachers):
        raise InputError(f"teacher_weights has {len(weights)} entries for {len(teachers)} teachers.")
    if len(teachers) > 1 and (args.hidden_loss_weight > 0 or args.attention_loss_weight > 0):
        raise InputError("Hidden-state and attention losses take one teacher; an ensemble gives logits only.")
    return teachers, [w / sum(weights) for w in weights]


class FiniteCheck:
    """Whether every live teacher output of the current optimizer step is finite, as a device flag.

    :meth:`note` folds tensors in without a host sync; :meth:`raise_if_not_finite` reads the flag once per
    optimizer step (a gather of one flag per process, so that every rank stops together).
    """

    def __init__(self):
        self.flag = None

    def note(self, tensors) -> None:
        finite = torch.stack([t.isfinite().all() for t in tensors if t is not None]).all()
        self.flag = finite if self.flag is None else self.flag & finite

    def raise_if_not_finite(self, accelerator, step: int, epoch: float, output_dir) -> None:
        flag, self.flag = self.flag, None
        if flag is None:
            return
        finite = accelerator.gather(flag.reshape(1).int()).tolist()
        if all(finite):
            return
        ranks = [rank for rank, ok in enumerate(finite) if not ok]
        raise FloatingPointError(
            f"Step {step} (epoch {epoch:.2f}): the live teacher's outputs hold NaN or inf "
            f"(process {', '.join(map(str, ranks))}). Training stopped before this step's optimizer update: the "
            f"student is as after step {step - 1}, and checkpoints already in {output_dir} are "
            "untouched. Check the teacher's weights and its dtype (float16 overflows: load it in bfloat16 or "
            "float32) and these inputs; check_finite=False turns this check off."
        )


def run_teachers(
    teachers: list[nn.Module],
    inputs: dict,
    logits_of,
    weights: list[float],
    temperature: float,
    kd_loss: str,
    *,
    hidden_states: bool = False,
    attentions: bool = False,
):
    """One no-grad forward of each teacher, as a :class:`hf_distill.teacher_outputs.TeacherOutput` (hidden states
    and attention maps of the last teacher where asked). An ensemble's logits are those of the weighted mixture
    of its teachers' soft labels (:func:`hf_distill.losses.ensemble_logits`)."""
    switches = {"output_hidden_states": hidden_states, "output_attentions": attentions}
    all_logits, outputs = [], None
    with torch.no_grad():
        for teacher in teachers:
            outputs = teacher(**inputs, **{k: True for k, on in switches.items() if on})
            all_logits.append(logits_of(outputs))
    logits = (
        all_logits[0] if len(all_logits) == 1 else ensemble_logits(all_logits, weights, temperature, kd_loss)
    )
    return TeacherOutput(
        logits=logits,
        hidden_states=outputs.hidden_states if hidden_states else None,
        attentions=outputs.attentions if attentions else None,
    )
