"""Building a student from its teacher: the same family with fewer layers, initialised from chosen layers."""

from __future__ import annotations

import copy
import re

from torch import nn
from transformers import PreTrainedModel

from .errors import InputError
from .sharding import full_state_dict
from .tasks import base_model

# model_type -> (config field holding the number of layers, pattern of a layer's parameter names)
LAYER_LAYOUT: dict[str, tuple[str, str]] = {
    "bert": ("num_hidden_layers", r"encoder\.layer\.(\d+)\."),
    "roberta": ("num_hidden_layers", r"encoder\.layer\.(\d+)\."),
    "xlm-roberta": ("num_hidden_layers", r"encoder\.layer\.(\d+)\."),
    "electra": ("num_hidden_layers", r"encoder\.layer\.(\d+)\."),
    "distilbert": ("n_layers", r"transformer\.layer\.(\d+)\."),
    "gpt2": ("n_layer", r"transformer\.h\.(\d+)\."),
    "llama": ("num_hidden_layers", r"model\.layers\.(\d+)\."),
    "mistral": ("num_hidden_layers", r"model\.layers\.(\d+)\."),
    "qwen2": ("num_hidden_layers", r"model\.layers\.(\d+)\."),
}
# Per-layer lists in some configs (e.g. Llama-family "layer_types") that must shrink with the layers.
_PER_LAYER_CONFIG_FIELDS = ("layer_types",)


def select_teacher_layers(num_teacher_layers: int, num_layers: int | None = None) -> list[int]:
    """Default teacher layers to copy: every other layer (``0, 2, 4, ...``), as DistilBERT did.

    With ``num_layers``, that many layers evenly spread from the first to the last.
    """
    if num_layers is None:
        return list(range(0, num_teacher_layers, 2))
    if not 1 <= num_layers <= num_teacher_layers:
        raise InputError(
            f"num_layers must be between 1 and the teacher's {num_teacher_layers} layers, got {num_layers}."
        )
    if num_layers == 1:
        return [0]
    step = (num_teacher_layers - 1) / (num_layers - 1)
    return [round(i * step) for i in range(num_layers)]


def build_student(
    teacher: PreTrainedModel,
    num_layers: int | None = None,
    layers: list[int] | None = None,
    teacher_name_or_path: str | None = None,
) -> PreTrainedModel:
    """A student of ``teacher``'s class with fewer layers, initialised from ``teacher``'s weights.

    Student layer ``i`` is a copy of teacher layer ``layers[i]`` (0-based); embeddings, the final
    norm and the task head are copied as they are. Default ``layers``: every other teacher layer, or
    ``num_layers`` evenly spread layers. The mapping is written into ``student.config.distillation``.
    """
    teacher = base_model(teacher)
    model_type = teacher.config.model_type
    if model_type not in LAYER_LAYOUT:
        raise InputError(
            f"build_student does not know the layer layout of model_type={model_type!r}; supported: "
            f"{sorted(LAYER_LAYOUT)}. Build the student yourself and pass it as `model`."
        )
    count_field, pattern = LAYER_LAYOUT[model_type]
    num_teacher_layers = getattr(teacher.config, count_field)
    if layers is None:
        layers = select_teacher_layers(num_teacher_layers, num_layers)
    elif num_layers is not None and num_layers != len(layers):
        raise InputError(f"num_layers={num_layers} but layers={layers} has {len(layers)} entries.")
    if not layers or any(not 0 <= i < num_teacher_layers for i in layers):
        raise InputError(
            f"layers={layers} must be a non-empty list of teacher layers in [0, {num_teacher_layers})."
        )

    config = copy.deepcopy(teacher.config)
    setattr(config, count_field, len(layers))
    for name in _PER_LAYER_CONFIG_FIELDS:
        values = getattr(config, name, None)
        if isinstance(values, list) and len(values) == num_teacher_layers:
            setattr(config, name, [values[i] for i in layers])
    config.distillation = {
        "teacher": teacher_name_or_path or getattr(teacher.config, "_name_or_path", None) or None,
        "teacher_num_layers": num_teacher_layers,
        "teacher_layers": list(layers),
    }
    student = type(teacher)(config)

    layer_re = re.compile(pattern)
    source_of = {s: t for s, t in enumerate(layers)}
    teacher_state = full_state_dict(teacher)  # gathered when loaded under ZeRO-3
    state = {}
    for key in student.state_dict():
        match = layer_re.search(key)
        if match is None:
            source = key
        else:
            start, end = match.span(1)
            source = key[:start] + str(source_of[int(match.group(1))]) + key[end:]
        state[key] = teacher_state[source].clone()
    student.load_state_dict(state, strict=True)
    return student.to(teacher.dtype)


def teacher_layers_of(model: nn.Module) -> list[int] | None:
    """The teacher layers :func:`build_student` copied into ``model`` (PEFT-unwrapped), as it wrote them into
    ``config.distillation``; None for a model it did not build."""
    return (base_model(model).config.to_dict().get("distillation") or {}).get("teacher_layers")
