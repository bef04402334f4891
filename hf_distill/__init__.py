"""hf-distill: knowledge distillation for Hugging Face Transformers."""

from .collator import DistillationDataCollator
from .config import DistillationConfig
from .errors import InputError
from .generation import Generation, Generator, TransformersGenerator
from .hub import HubPushError, push_student
from .instruction_data import (
    InstructionDataCollator,
    TruncationCounts,
    has_completion,
    render_example,
    render_prompt,
    tokenize_instruction_dataset,
)
from .losses import (
    LM_KD_LOSSES,
    attention_loss,
    chunked_lm_losses,
    ensemble_logits,
    generalized_jsd_loss,
    hidden_state_loss,
    jsd_loss,
    kd_loss,
    kl_div_loss,
    mse_logits_loss,
    reverse_kl_loss,
    sample_teacher_tokens,
    topk_kl_div_loss,
)
from .model_card import StudentCardData, render_card, write_card
from .student import build_student, select_teacher_layers
from .teacher_cache import (
    load_teacher_cache,
    precompute_teacher_caches,
    precompute_teacher_logits,
    read_provenance,
    weights_hash,
)
from .teacher_completions import TeacherCompletions, teacher_completions
from .trainer import DistillationTrainer, TeacherOutput
from .vocab_slices import sliced_lm_losses

__all__ = [
    "DistillationConfig",
    "DistillationDataCollator",
    "DistillationTrainer",
    "Generation",
    "Generator",
    "HubPushError",
    "InputError",
    "InstructionDataCollator",
    "LM_KD_LOSSES",
    "StudentCardData",
    "TeacherCompletions",
    "TeacherOutput",
    "TransformersGenerator",
    "TruncationCounts",
    "attention_loss",
    "build_student",
    "chunked_lm_losses",
    "ensemble_logits",
    "generalized_jsd_loss",
    "has_completion",
    "hidden_state_loss",
    "jsd_loss",
    "kd_loss",
    "kl_div_loss",
    "load_teacher_cache",
    "mse_logits_loss",
    "precompute_teacher_caches",
    "precompute_teacher_logits",
    "push_student",
    "read_provenance",
    "render_card",
    "render_example",
    "render_prompt",
    "reverse_kl_loss",
    "sample_teacher_tokens",
    "select_teacher_layers",
    "sliced_lm_losses",
    "teacher_completions",
    "tokenize_instruction_dataset",
    "topk_kl_div_loss",
    "weights_hash",
    "write_card",
]
