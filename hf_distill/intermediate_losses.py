"""The hidden-state and attention losses over mapped layers, from the models' outputs (:mod:`hf_distill.losses`
holds the per-layer formulas)."""

from __future__ import annotations

import torch

from .errors import InputError
from .losses import attention_loss, hidden_state_loss


def default_layer_map(num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """Evenly spaced teacher layers (1-based) for student layers ``1..M``; the last maps to the last."""
    return [round((i + 1) * num_teacher_layers / num_student_layers) for i in range(num_student_layers)]


def choose_layer_map(
    explicit: list[int] | None, student_config, num_student_layers: int, num_teacher_layers: int
) -> list[int]:
    """The teacher layer (1-based) each student layer is matched with.

    ``explicit`` if set; else, for a student made by :func:`hf_distill.build_student`, the layers it was
    copied from (``config.distillation["teacher_layers"]``, 0-based, so ``+1``); else evenly spaced
    (:func:`default_layer_map`).
    """
    if explicit:
        return explicit
    copied = (getattr(student_config, "distillation", None) or {}).get("teacher_layers")
    if copied and len(copied) == num_student_layers and max(copied) < num_teacher_layers:
        return [t + 1 for t in copied]
    return default_layer_map(num_student_layers, num_teacher_layers)


def mapped_hidden_loss(
    name: str, student_hidden, teacher_hidden, layer_map: list[int], projection=None, mask=None
) -> torch.Tensor:
    """``mean_l hidden_state_loss(name, P(h_s[l]), h_t[map[l]])`` over student layers ``l = 1..M``.

    ``student_hidden``/``teacher_hidden``: the models' ``hidden_states`` (index 0: the embeddings); ``P``:
    the projection to the teacher's width, or identity.
    """
    if len(layer_map) != len(student_hidden) - 1 or max(layer_map) > len(teacher_hidden) - 1:
        raise InputError(
            f"layer_map={layer_map} must have one entry per student layer ({len(student_hidden) - 1}) with "
            f"teacher layers between 0 and {len(teacher_hidden) - 1}."
        )
    terms = []
    for s_layer, t_layer in enumerate(layer_map, start=1):
        h = student_hidden[s_layer]
        if projection is not None:
            h = projection(h)
        terms.append(hidden_state_loss(name, h, teacher_hidden[t_layer], mask=mask))
    return torch.stack(terms).mean()


def check_attention_maps(student_attentions, teacher_attentions) -> None:
    """Refuse missing maps (sdpa/flash attention give None or an empty tuple) and differing head counts."""
    s_att, t_att = student_attentions, teacher_attentions
    if not s_att or not t_att or any(a is None for a in (*s_att, *t_att)):
        raise InputError(
            "attention_loss_weight > 0 needs attention maps: load student and teacher with "
            "attn_implementation='eager'."
        )
    if s_att[0].shape[1] != t_att[0].shape[1]:
        raise InputError(
            f"The attention loss needs as many heads in the student ({s_att[0].shape[1]}) as in the teacher "
            f"({t_att[0].shape[1]})."
        )


def mapped_attention_loss(
    student_attentions, teacher_attentions, layer_map: list[int], mask=None
) -> torch.Tensor:
    """``mean_l attention_loss(A_s[l], A_t[map[l]])`` over student layers (maps as the models return them)."""
    check_attention_maps(student_attentions, teacher_attentions)
    terms = [
        attention_loss(student_attentions[i], teacher_attentions[max(t - 1, 0)], mask=mask)
        for i, t in enumerate(layer_map)
    ]
    return torch.stack(terms).mean()
