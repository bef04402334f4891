"""``DistillationTrainer``: a ``transformers.Trainer`` whose loss is ``alpha * KD + beta * CE``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer
from transformers.modeling_outputs import CausalLMOutput
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import losses, tasks, vocab_losses
from .collator import TEACHER_INPUT_PREFIX, TEACHER_LOGIT_COLUMNS, DistillationDataCollator, teacher_sources
from .config import DistillationConfig
from .errors import InputError, MissingFileError
from .hub import push_student
from .model_card import card_data_from_trainer
from .tasks import base_model, forward_params, last_hidden_state, output_embedding, output_logits, task_of
from .teacher_cache import check_finite_logits
from .teachers import cast_teacher, check_compatible, load_teacher, prepare_teacher

# Arguments never passed to the teacher: its loss and output switches are ours to set.
_NOT_FOR_TEACHER = {"labels", "start_positions", "end_positions", "return_dict", "use_cache"}
# The hidden-state projection's weights in a checkpoint folder (its optimizer state is in optimizer.pt).
HIDDEN_PROJECTION_NAME = "hidden_projection.safetensors"


@dataclass
class TeacherOutput:
    """What the loss needs from the teacher(s), live or precomputed.

    ``logits``: ``(B, C)``, ``(B, L, C)``, or ``(B, L, 2)`` for question answering (start, end);
    ``topk_values`` / ``topk_indices``: ``(B, L, k)`` sparse teacher logits; ``sample_ids`` /
    ``sample_counts``: ``(B, L, n)`` tokens drawn from the teacher (RS-KD) and how often each was drawn,
    or, from a cache with an exact head, ``(B, L, h + n)`` head and tail ids with their weights
    (:func:`sampled_target`); ``hidden_states`` /
    ``attentions``: the teacher model's, when a hidden-state or attention loss asks for them (for the
    fused causal-LM loss, ``hidden_states`` holds the teacher's last hidden state alone and ``logits``
    is None).
    """

    logits: torch.Tensor | None = None
    topk_values: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None
    sample_ids: torch.Tensor | None = None
    sample_counts: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def sampled_target(inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The RS-KD cache's sparse target in a batch: ``(ids, values)`` for ``kd="sampled"``.

    Plain RS-KD: ``teacher_sample_ids`` and their ``teacher_sample_counts`` (or, from a tempered
    proposal, their importance weights ``teacher_sample_weights``). With an exact head
    (``teacher_head_ids`` and ``teacher_head_probs``): the head ids then the tail's, weighted by
    :func:`hf_distill.vocab_losses.head_tail_weights` (``p_i`` on each head id, ``m * c_j / n`` on the
    tail's). Either way the values are the target's weights, summing to 1 (counts: to ``n``, read as ``c / n``).
    """
    ids = inputs["teacher_sample_ids"]
    if "teacher_sample_counts" in inputs:
        counts = inputs["teacher_sample_counts"]
    else:  # importance weights, stored rounded: summing to 1 again (the loss leaves sums below 1 as they are)
        counts = vocab_losses.normalised(inputs["teacher_sample_weights"])
    if "teacher_head_ids" not in inputs:
        return ids, counts
    weights = vocab_losses.head_tail_weights(inputs["teacher_head_probs"], counts)
    return torch.cat([inputs["teacher_head_ids"], ids], dim=-1), weights


def default_layer_map(num_student_layers: int, num_teacher_layers: int) -> list[int]:
    """Evenly spaced teacher layers (1-based) for student layers ``1..M``; the last maps to the last."""
    return [round((i + 1) * num_teacher_layers / num_student_layers) for i in range(num_student_layers)]


class DistillationTrainer(Trainer):
    """Distils one teacher, or a weighted ensemble, into ``model`` (the student).

    The loss (see :mod:`hf_distill.losses` for the formulas)::

        alpha * KD(student, teacher, T) + beta * CE(student, labels)
            + hidden_loss_weight * H + attention_loss_weight * A

    Teachers are frozen, in eval mode, outside the optimizer, and run under ``torch.no_grad()``.
    When a batch carries precomputed ``teacher_logits`` (or ``teacher_topk_values`` and
    ``teacher_topk_indices``), no teacher runs. Evaluation reports the student's own loss and
    metrics at ``T = 1``.

    To change the loss, override :meth:`compute_teacher_outputs`, :meth:`compute_kd_loss` or
    :meth:`combine_losses`.
    """

    # compute_loss returns the mean over its micro-batch; the Trainer divides it by the number of
    # accumulation steps (transformers 5.x skips that division for models whose forward takes
    # **kwargs, expecting a loss normalised by num_items_in_batch, which ours is not).
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | None = None,
        teacher_model: PreTrainedModel | str | list[PreTrainedModel | str] | None = None,
        args: DistillationConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class: PreTrainedTokenizerBase | None = None,
        teacher_processing_class: PreTrainedTokenizerBase | None = None,
        teacher_init_kwargs: dict[str, Any] | None = None,
        **kwargs,
    ):
        if not isinstance(args, DistillationConfig):
            raise TypeError(
                f"args must be a DistillationConfig, got {type(args).__name__}: "
                "use hf_distill.DistillationConfig(output_dir=..., temperature=..., alpha=..., beta=...)."
            )
        if model is None:
            raise InputError("DistillationTrainer needs the student as `model`.")
        self.task = task_of(model)
        listed = teacher_model if isinstance(teacher_model, list | tuple) else [teacher_model]
        dtype = args.teacher_torch_dtype
        init_kwargs = dict(teacher_init_kwargs or {})
        if dtype is not None and "dtype" not in init_kwargs and "torch_dtype" not in init_kwargs:
            init_kwargs["dtype"] = dtype  # teachers loaded by name: in that dtype from the start
        teachers = [load_teacher(t, self.task, **init_kwargs) for t in listed if t is not None]
        if dtype is not None:
            teachers = [cast_teacher(t, dtype) for t in teachers]
        for teacher in teachers:
            check_compatible(
                model, teacher, student_tokenizer=processing_class, teacher_tokenizer=teacher_processing_class
            )
        weights = args.teacher_weights or [1.0] * len(teachers)
        if teachers and len(weights) != len(teachers):
            raise InputError(f"teacher_weights has {len(weights)} entries for {len(teachers)} teachers.")
        if len(teachers) > 1 and (args.hidden_loss_weight > 0 or args.attention_loss_weight > 0):
            raise InputError(
                "Hidden-state and attention losses take one teacher; an ensemble gives logits only."
            )
        if isinstance(train_dataset, Dataset):  # before the Trainer creates output_dir
            check_finite_logits(train_dataset, where="the training dataset's precomputed teacher columns")
        if data_collator is None:
            data_collator = DistillationDataCollator(processing_class)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        # For transformers versions without `loss_is_scaled_for_ga`.
        self.model_accepts_loss_kwargs = False
        self.teacher_weights = [w / sum(weights) for w in weights]
        self._student_params = forward_params(self.model)
        self._teacher_params = set().union(*(forward_params(t) for t in teachers)) if teachers else set()
        self.teachers = [prepare_teacher(t, self.accelerator) for t in teachers]
        self._check_train_dataset(train_dataset)
        self.hidden_projection = self._make_hidden_projection()
        # Loss component -> (sum on the device, count) since the last log: no host sync per step.
        self._metrics: dict[str, tuple[torch.Tensor, int]] = {}
        # True while every live teacher output of the current optimizer step is finite (a device tensor).
        self._teacher_finite: torch.Tensor | None = None
        self._projection_stepped = True  # the optimizer stepped since the last training_step

    @property
    def teacher(self) -> nn.Module | None:
        """The (first) teacher, placed for inference."""
        return self.teachers[0] if self.teachers else None

    # ---- setup checks -----------------------------------------------------------------------

    def _check_train_dataset(self, dataset) -> None:
        columns = getattr(dataset, "column_names", None)
        if columns is None:
            return
        label_columns = set(self.label_names) | {"label", "label_ids"}
        if self.args.beta > 0 and not label_columns & set(columns):
            raise InputError(
                f"beta={self.args.beta} weights the hard-label loss but the training dataset has no label column "
                f"(columns: {columns}). Add labels, or set beta=0 to learn from the teacher's soft labels alone."
            )
        cached = any(c in columns for c in ("teacher_logits", "teacher_topk_values", "teacher_sample_ids"))
        if not self.teachers and not cached:
            raise InputError(
                "No teacher: pass teacher_model, or a training dataset with precomputed teacher logits "
                "(hf_distill.precompute_teacher_logits)."
            )
        if not self.teachers and (self.args.hidden_loss_weight > 0 or self.args.attention_loss_weight > 0):
            raise InputError(
                "Hidden-state and attention losses need a live teacher_model, not cached logits."
            )

    def _make_hidden_projection(self) -> nn.Module | None:
        """A learned linear map from the student's width to the teacher's, when they differ (TinyBERT)."""
        if self.args.hidden_loss_weight == 0 or self.teacher is None:
            return None
        d_s = base_model(self.model).config.hidden_size
        d_t = base_model(self.teacher).config.hidden_size
        if d_s == d_t:
            return None
        return nn.Linear(d_s, d_t).to(self.args.device)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.hidden_projection is not None:
            optimizer.add_param_group(
                {"params": list(self.hidden_projection.parameters()), "weight_decay": 0.0}
            )
        return optimizer

    def _set_signature_columns_if_needed(self) -> None:
        # Keep what the teacher needs (e.g. token_type_ids for a BERT teacher of a DistilBERT
        # student) and the precomputed teacher columns: `remove_unused_columns` must not drop them.
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            extra = [*self._teacher_params, *TEACHER_LOGIT_COLUMNS]
            extra += [TEACHER_INPUT_PREFIX + p for p in self._teacher_params]
            self._signature_columns += [c for c in extra if c not in self._signature_columns]

    # ---- inputs -----------------------------------------------------------------------------

    def _student_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in inputs.items() if k in self._student_params}

    def _teacher_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The teacher's arguments: its own ``teacher_*`` tokenization if the batch has one, else the student's."""
        sources = teacher_sources(inputs, self._teacher_params - _NOT_FOR_TEACHER)
        return {name: inputs[key] for name, key in sources.items() if inputs[key] is not None}

    def _has_labels(self, inputs: dict[str, Any]) -> bool:
        return all(inputs.get(name) is not None for name in self.label_names)

    # ---- the loss ---------------------------------------------------------------------------

    def compute_teacher_outputs(
        self, inputs: dict[str, Any], *, hidden_states: bool = False, attentions: bool = False
    ) -> TeacherOutput:
        """The teacher's logits for this batch: precomputed if the batch has them, else live.

        An ensemble gives the logits of the weighted mixture of its teachers' soft labels
        (:func:`hf_distill.losses.ensemble_logits`).
        """
        if "teacher_logits" in inputs and not (hidden_states or attentions):
            return TeacherOutput(logits=inputs["teacher_logits"])
        if "teacher_topk_values" in inputs and not (hidden_states or attentions):
            return TeacherOutput(
                topk_values=inputs["teacher_topk_values"], topk_indices=inputs["teacher_topk_indices"]
            )
        if "teacher_sample_ids" in inputs and not (hidden_states or attentions):
            ids, values = sampled_target(inputs)
            return TeacherOutput(sample_ids=ids, sample_counts=values)
        if not self.teachers:
            raise InputError(
                "This batch has no precomputed teacher logits and no teacher_model was given: pass teacher_model, "
                "or precompute teacher_logits for every example."
            )
        teacher_inputs = self._teacher_inputs(inputs)
        extra = {}
        if hidden_states:
            extra["output_hidden_states"] = True
        if attentions:
            extra["output_attentions"] = True
        all_logits, outputs = [], None
        with torch.no_grad():
            for teacher in self.teachers:
                outputs = teacher(**teacher_inputs, **extra)
                all_logits.append(output_logits(outputs, self.task))
        if len(all_logits) == 1:
            logits = all_logits[0]
        else:
            logits = losses.ensemble_logits(
                all_logits, self.teacher_weights, self.args.temperature, self.args.kd_loss
            )
        output = TeacherOutput(
            logits=logits,
            hidden_states=outputs.hidden_states if hidden_states else None,
            attentions=outputs.attentions if attentions else None,
        )
        self._note_finite(output)
        return output

    def _note_finite(self, teacher: TeacherOutput) -> None:
        """Fold whether the live teacher's outputs are finite into a device flag: no host sync here.

        :meth:`training_step` reads the flag once per optimizer step (``check_finite``).
        """
        if not (self.args.check_finite and self.model.training):
            return
        tensors = [teacher.logits, *(teacher.hidden_states or ())]
        finite = torch.stack([t.isfinite().all() for t in tensors if t is not None]).all()
        self._teacher_finite = finite if self._teacher_finite is None else self._teacher_finite & finite

    def _kd_mask(self, inputs: dict[str, Any], length: int) -> torch.Tensor | None:
        """Which positions the KD term counts, ``(B, L)``; None for sequence-level tasks.

        Token-level rows with labels count the labelled positions (for masked LM: the masked
        tokens, as in DistilBERT); rows without any label count every real token.
        """
        if self.task not in tasks.TOKEN_LEVEL:
            return None
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

    def compute_kd_loss(self, student_logits: torch.Tensor, teacher: TeacherOutput, inputs: dict[str, Any]):
        """The soft-label term at temperature ``T`` (``losses.kd_loss``), masked for the task.

        Regression heads (one output) use MSE on the teacher's score; causal LMs compare the
        positions that predict a next token; question answering averages the start and end terms.
        """
        T, name = self.args.temperature, self.args.kd_loss
        if self.task == tasks.SEQUENCE_CLASSIFICATION and student_logits.shape[-1] == 1:
            name = "mse"
        mask = self._kd_mask(inputs, student_logits.shape[1]) if student_logits.dim() > 2 else None
        t_logits = teacher.logits
        if self.task == tasks.CAUSAL_LM:
            student_logits = student_logits[:, :-1]
            mask = mask[:, 1:] if mask is not None else None
            real = inputs.get("attention_mask")
            if mask is not None and real is not None:  # left padding: the pad before a row's first token
                mask = mask & real[:, :-1].bool()
            t_logits = t_logits[:, :-1] if t_logits is not None else None
            sparse = ("topk_values", "topk_indices", "sample_ids", "sample_counts")
            teacher = TeacherOutput(
                **{k: getattr(teacher, k)[:, :-1] for k in sparse if getattr(teacher, k) is not None}
            )
        if teacher.topk_values is not None:
            return losses.topk_kl_div_loss(
                student_logits, teacher.topk_values, teacher.topk_indices, T, mask=mask
            )
        if teacher.sample_ids is not None:
            return losses.sampled_kd_loss(
                student_logits, teacher.sample_ids, teacher.sample_counts, T, mask=mask
            )
        if t_logits.shape[-1] != student_logits.shape[-1] and self.task != tasks.QUESTION_ANSWERING:
            raise InputError(
                f"Teacher logits have {t_logits.shape[-1]} classes but the student has {student_logits.shape[-1]}: "
                "were the cached teacher_logits computed for another task or label set?"
            )
        if self.task == tasks.QUESTION_ANSWERING:
            # Distributions over positions; padding positions are excluded from both softmaxes.
            real = inputs.get("attention_mask")
            terms = []
            for i in range(2):
                s, t = student_logits[..., i].float(), t_logits[..., i].float()
                if real is not None:
                    s = s.masked_fill(~real.bool(), -1e4)
                    t = t.masked_fill(~real.bool(), -1e4)
                if name == "mse":  # no softmax here: one squared difference per real position
                    mask = real.bool() if real is not None else None
                    terms.append(losses.mse_logits_loss(s[..., None], t[..., None], mask=mask))
                else:
                    terms.append(losses.kd_loss(name, s, t, T))
            return (terms[0] + terms[1]) / 2
        return losses.kd_loss(name, student_logits, t_logits.to(student_logits.device), T, mask=mask)

    def layer_map(self, num_student_layers: int, num_teacher_layers: int) -> list[int]:
        """The teacher layer (1-based) each student layer is matched with by the hidden and attention losses.

        ``args.layer_map`` if set; else, for a student made by :func:`hf_distill.build_student`, the layers
        it was copied from (``config.distillation["teacher_layers"]``, 0-based, so ``+1``); else evenly
        spaced (:func:`default_layer_map`).
        """
        if self.args.layer_map:
            return self.args.layer_map
        copied = (getattr(base_model(self.model).config, "distillation", None) or {}).get("teacher_layers")
        if copied and len(copied) == num_student_layers and max(copied) < num_teacher_layers:
            return [t + 1 for t in copied]
        return default_layer_map(num_student_layers, num_teacher_layers)

    def compute_hidden_loss(
        self, student_outputs, teacher: TeacherOutput, inputs: dict[str, Any]
    ) -> torch.Tensor:
        """Mean over mapped layers of ``losses.hidden_state_loss`` (student projected to the teacher's width)."""
        s_hidden, t_hidden = student_outputs.hidden_states, teacher.hidden_states
        layer_map = self.layer_map(len(s_hidden) - 1, len(t_hidden) - 1)
        if len(layer_map) != len(s_hidden) - 1 or max(layer_map) > len(t_hidden) - 1:
            raise InputError(
                f"layer_map={layer_map} must have one entry per student layer ({len(s_hidden) - 1}) with teacher "
                f"layers between 0 and {len(t_hidden) - 1}."
            )
        mask = inputs.get("attention_mask")
        terms = []
        for s_layer, t_layer in enumerate(layer_map, start=1):
            h = s_hidden[s_layer]
            if self.hidden_projection is not None:
                h = self.hidden_projection(h)
            terms.append(losses.hidden_state_loss(self.args.hidden_loss, h, t_hidden[t_layer], mask=mask))
        return torch.stack(terms).mean()

    def compute_attention_loss(self, student_outputs, teacher: TeacherOutput, inputs: dict[str, Any]):
        """Mean over mapped layers of ``losses.attention_loss`` (needs eager attention, same head count)."""
        s_att, t_att = student_outputs.attentions, teacher.attentions
        # sdpa/flash attention give None, or (transformers 5) an empty tuple
        if not s_att or not t_att or any(a is None for a in (*s_att, *t_att)):
            raise InputError(
                "attention_loss_weight > 0 needs attention maps: load student and teacher with "
                "attn_implementation='eager'."
            )
        layer_map = self.layer_map(len(s_att), len(t_att))
        if s_att[0].shape[1] != t_att[0].shape[1]:
            raise InputError(
                f"The attention loss needs as many heads in the student ({s_att[0].shape[1]}) as in the teacher "
                f"({t_att[0].shape[1]})."
            )
        mask = inputs.get("attention_mask")
        terms = [
            losses.attention_loss(s_att[i], t_att[max(t - 1, 0)], mask=mask) for i, t in enumerate(layer_map)
        ]
        return torch.stack(terms).mean()

    def combine_losses(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        """``alpha * kd + beta * ce + hidden_loss_weight * hidden + attention_loss_weight * attention``."""
        weights = {
            "kd": self.args.alpha,
            "ce": self.args.beta,
            "hidden": self.args.hidden_loss_weight,
            "attention": self.args.attention_loss_weight,
        }
        return sum(weights[name] * value for name, value in components.items())

    # ---- causal LMs: the fused loss that never holds the vocabulary logits -------------------

    def _fused_causal_lm(self, inputs: dict[str, Any]) -> bool:
        """Whether this batch's loss goes through :meth:`compute_causal_lm_loss` (``lm_chunk_size`` set).

        Not for hidden-state or attention losses, ensembles, dense cached ``teacher_logits``, the ``mse``
        loss or output embeddings with a bias: those take the dense path.
        """
        args = self.args
        return (
            self.task == tasks.CAUSAL_LM
            and args.lm_chunk_size is not None
            and args.hidden_loss_weight == 0
            and args.attention_loss_weight == 0
            and len(self.teachers) <= 1
            and args.kd_loss != "mse"
            and "teacher_logits" not in inputs
            and output_embedding(self.model).bias is None
            and (not self.teachers or output_embedding(self.teacher).bias is None)
        )

    def compute_causal_lm_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False):
        """``alpha * KD + beta * CE`` of a causal LM by :func:`hf_distill.vocab_losses.chunked_lm_losses`.

        The student (and a live teacher) run with ``logits_to_keep=1`` where the model takes it; their last
        hidden states at the positions that predict a counted token go to the chunked loss with their
        output embeddings, which forms the logits ``chunk_size`` positions at a time. The KD term is
        ``args.kd_loss`` against a live teacher, ``"topk"`` against cached top-k logits and ``"sampled"``
        against cached RS-KD draws; the positions are those of :meth:`_kd_mask`.
        """
        args = self.args
        has_labels = self._has_labels(inputs)
        if args.beta > 0 and not has_labels:
            raise InputError(
                f"beta={args.beta} weights the hard-label loss but the batch has no {self.label_names}. Add labels "
                "(label -100 marks an unlabelled token), or set beta=0 to learn from the teacher alone."
            )
        student_inputs = {k: v for k, v in self._student_inputs(inputs).items() if k not in self.label_names}
        hidden = last_hidden_state(model, student_inputs)
        width = hidden.shape[-1]
        mask = self._kd_mask(inputs, hidden.shape[1])
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        mask = mask[:, 1:]  # position i predicts token i + 1
        real = inputs.get("attention_mask")
        if real is not None:  # left padding: the pad before a row's first token predicts nothing
            mask = mask & real[:, :-1].bool()
        positions = mask.reshape(-1).nonzero().squeeze(1)

        def select(t: torch.Tensor) -> torch.Tensor:
            return t[:, :-1].reshape(-1, *t.shape[2:]).index_select(0, positions)

        labels = None
        if args.beta > 0:  # the token each selected position predicts
            labels = inputs["labels"][:, 1:].reshape(-1).index_select(0, positions)
        kd, sparse, teacher = None, {}, {}
        if args.alpha > 0:
            if "teacher_topk_values" in inputs:
                kd = "topk"
                sparse = {
                    "teacher_ids": inputs["teacher_topk_indices"],
                    "teacher_values": inputs["teacher_topk_values"],
                }
            elif "teacher_sample_ids" in inputs:
                kd = "sampled"
                ids, values = sampled_target(inputs)
                sparse = {"teacher_ids": ids, "teacher_values": values}
            elif self.teacher is None:
                raise InputError(
                    "This batch has no precomputed teacher outputs and no teacher_model was given: pass "
                    "teacher_model, or precompute the teacher's outputs for every example."
                )
            else:
                kd = args.kd_loss
                with torch.no_grad():
                    t_hidden = last_hidden_state(self.teacher, self._teacher_inputs(inputs))
                self._note_finite(TeacherOutput(hidden_states=(t_hidden,)))
                teacher = {
                    "teacher_hidden": select(t_hidden),
                    "teacher_head": output_embedding(self.teacher).weight,
                }
            sparse = {name: select(value) for name, value in sparse.items()}
        kd_value, ce_value = vocab_losses.chunked_lm_losses(
            select(hidden).reshape(-1, width),
            output_embedding(model).weight,
            kd=kd,
            temperature=args.temperature,
            labels=labels,
            chunk_size=args.lm_chunk_size,
            grad_weights=(args.alpha, args.beta),
            **teacher,
            **sparse,
        )
        components = {}
        if args.alpha > 0:
            components["kd"] = kd_value
        if args.beta > 0:
            components["ce"] = ce_value
        loss = self.combine_losses(components)
        self._record(components)
        # as the dense path: the outputs carry the student's own (hard-label) loss, when it was computed
        return (loss, CausalLMOutput(loss=ce_value)) if return_outputs else loss

    def _record(self, components: dict[str, torch.Tensor]) -> None:
        for name, value in components.items():
            total, count = self._metrics.get(f"{name}_loss", (0.0, 0))
            self._metrics[f"{name}_loss"] = (total + value.detach().float(), count + 1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: the student's own loss at T = 1
            outputs = model(**self._student_inputs(inputs))
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        if self._fused_causal_lm(inputs):
            return self.compute_causal_lm_loss(model, inputs, return_outputs)

        args = self.args
        has_labels = self._has_labels(inputs)
        if args.beta > 0 and not has_labels:
            raise InputError(
                f"beta={args.beta} weights the hard-label loss but the batch has no {self.label_names}. Add labels "
                "(label -100 marks an unlabelled example), or set beta=0 to learn from the teacher alone."
            )
        student_inputs = self._student_inputs(inputs)
        labelled = None
        if has_labels and args.beta > 0:
            # Whether any row has a label (-100: unlabelled), kept on the device so that no Python `if`
            # waits for it: a batch without any label gets placeholder labels (0) for the student's loss,
            # and its hard-label term is then zeroed below.
            labelled = torch.stack([(inputs[n] != -100).any() for n in self.label_names]).any()
            for name in self.label_names:
                student_inputs[name] = torch.where(labelled, inputs[name], torch.zeros_like(inputs[name]))
        else:
            for name in self.label_names:
                student_inputs.pop(name, None)
        want_hidden, want_attention = args.hidden_loss_weight > 0, args.attention_loss_weight > 0
        if want_hidden:
            student_inputs["output_hidden_states"] = True
        if want_attention:
            student_inputs["output_attentions"] = True
        outputs = model(**student_inputs)

        components: dict[str, torch.Tensor] = {}
        if args.alpha > 0 or want_hidden or want_attention:
            teacher = self.compute_teacher_outputs(
                inputs, hidden_states=want_hidden, attentions=want_attention
            )
            if args.alpha > 0:
                components["kd"] = self.compute_kd_loss(output_logits(outputs, self.task), teacher, inputs)
            if want_hidden:
                components["hidden"] = self.compute_hidden_loss(outputs, teacher, inputs)
            if want_attention:
                components["attention"] = self.compute_attention_loss(outputs, teacher, inputs)
        if args.beta > 0:
            # A batch of unlabelled examples only (label -100) has no hard-label term (and no gradient from it).
            components["ce"] = torch.where(labelled, outputs.loss, outputs.loss.new_zeros(()))
        loss = self.combine_losses(components)
        self._record(components)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.hidden_projection is not None and self._projection_stepped:
            # The Trainer zeroes the student's gradients after each optimizer step, not the projection's.
            self.hidden_projection.zero_grad(set_to_none=True)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._projection_stepped = self.accelerator.sync_gradients
        if self.hidden_projection is not None and self.accelerator.num_processes > 1:
            # The projection lives outside the DDP-wrapped student: average its gradients by hand.
            for param in self.hidden_projection.parameters():
                if param.grad is not None:
                    param.grad = self.accelerator.reduce(param.grad, reduction="mean")
        if self.accelerator.sync_gradients:  # the last micro-batch: the optimizer steps next
            self._check_teacher_finite()
        return loss

    def _check_teacher_finite(self) -> None:
        """Raise ``FloatingPointError`` before the optimizer step when a live teacher gave NaN or inf.

        One host sync per optimizer step (a gather of one flag per process, so that every rank stops).
        """
        flag, self._teacher_finite = self._teacher_finite, None
        if flag is None:
            return
        finite = self.accelerator.gather(flag.reshape(1).int()).tolist()
        if all(finite):
            return
        ranks = [rank for rank, ok in enumerate(finite) if not ok]
        step = self.state.global_step + 1
        raise FloatingPointError(
            f"Step {step} (epoch {self.state.epoch or 0:.2f}): the live teacher's outputs hold NaN or inf "
            f"(process {', '.join(map(str, ranks))}). Training stopped before this step's optimizer update: the "
            f"student is as after step {step - 1}, and checkpoints already in {self.args.output_dir} are "
            "untouched. Check the teacher's weights and its dtype (float16 overflows: load it in bfloat16 or "
            "float32) and these inputs; check_finite=False turns this check off."
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Evaluation sees the student's inputs only: its own metrics at T = 1.
        keep = self._student_params | set(self.label_names)
        inputs = {k: v for k, v in inputs.items() if k in keep}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs carry the mean of each loss component since the last log, over all processes.
        if "loss" in logs and self._metrics:
            for name, (total, count) in self._metrics.items():
                mean = total / count
                logs[name] = self.accelerator.reduce(mean.to(self.args.device), reduction="mean").item()
            self._metrics.clear()
        super().log(logs, start_time)

    # ---- saving and publishing ----------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # As Trainer._save, but training_args.bin is pickled without the Hub token.
        token, self.args.hub_token = self.args.hub_token, None
        try:
            super()._save(output_dir, state_dict)
        finally:
            self.args.hub_token = token

    def _save_checkpoint(self, model, trial) -> None:
        # The projection is written first, so a checkpoint with a trainer_state.json always has it.
        if self.hidden_projection is not None and self.args.should_save:
            folder = (
                Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            folder.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu().contiguous() for k, v in self.hidden_projection.state_dict().items()}
            save_file(state, str(folder / HIDDEN_PROJECTION_NAME))
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # The projection's weights; its optimizer state returns with optimizer.pt (its own param group).
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.hidden_projection is None:
            return
        path = os.path.join(resume_from_checkpoint, HIDDEN_PROJECTION_NAME)
        if not os.path.isfile(path):
            raise MissingFileError(
                f"{resume_from_checkpoint} has no {HIDDEN_PROJECTION_NAME}: the hidden-state projection this run "
                "trains (student width != teacher width) was not saved with it (a checkpoint from an older "
                "hf-distill or another trainer). Resume from a checkpoint this trainer wrote, or start afresh."
            )
        state = load_file(path, device=str(next(self.hidden_projection.parameters()).device))
        try:
            self.hidden_projection.load_state_dict(state)
        except RuntimeError as err:
            raise InputError(
                f"{path} does not fit this run's hidden-state projection "
                f"({self.hidden_projection.in_features} -> {self.hidden_projection.out_features}): {err}. "
                "Resume with the student and teacher that wrote the checkpoint."
            ) from None

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Checkpoints are never pushed: the student is published once, by :meth:`push_to_hub`."""

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        card=None,
        **kwargs,
    ):
        """Upload the student alone (PEFT adapters merged), its tokenizer, config and card.

        ``card``: a ``StudentCardData``, a ``ModelCard`` or a README path; default
        ``<output_dir>/README.md`` when there is one, else a card written from what the trainer knows
        (:func:`hf_distill.model_card.card_data_from_trainer`: teacher, settings, sizes, the student's
        last evaluation; "not measured" for the rest). Never uploads the teacher, checkpoints or the
        token; see :func:`hf_distill.hub.push_student`.
        """
        if not self.is_world_process_zero():
            return None
        repo_id = self.hub_model_id or self.args.hub_model_id or Path(self.args.output_dir).name
        if card is None:
            written = Path(self.args.output_dir) / "README.md"
            card = written if written.is_file() else card_data_from_trainer(self, repo_id)
        return push_student(
            self.model,
            self.processing_class,
            repo_id,
            card=card,
            token=token if token is not None else self.args.hub_token,
            private=private if private is not None else self.args.hub_private_repo,
            commit_message=commit_message,
            revision=revision if revision is not None else self.args.hub_revision,
        )
