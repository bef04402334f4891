"""``DistillationTrainer``: a ``transformers.Trainer`` whose loss is ``alpha * KD + beta * CE``."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer
from transformers.modeling_outputs import CausalLMOutput
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .collator import TEACHER_INPUT_PREFIX, DistillationDataCollator, teacher_sources
from .config import DistillationConfig
from .errors import InputError
from .hub import push_trainer_student
from .instruction_data import InstructionDataCollator
from .intermediate_losses import (  # noqa: F401 (default_layer_map: re-exported)
    choose_layer_map,
    default_layer_map,
    mapped_attention_loss,
    mapped_hidden_loss,
)
from .loss_log import LossMeans
from .loss_path import FUSED, check_sample_temperature, check_train_columns, choose_loss_path
from .projection import HIDDEN_PROJECTION_NAME, HiddenProjection  # noqa: F401 (the checkpoint file's name)
from .rollouts import INSTRUCTION_COLUMNS, choose_rollouts, completion_tokens
from .sharding import (
    check_sharded_settings,
    check_vocab_slices,
    deepspeed_config,
    gathered_weight,
    head_slices,
    models_by_name,
)
from .tasks import (
    base_model,
    forward_params,
    labels_for_student,
    last_hidden_state,
    output_embedding,
    task_of,
    task_spec,
)
from .teacher_cache import check_finite_logits
from .teacher_outputs import (
    LIVE,
    TEACHER_LOGIT_COLUMNS,
    TEACHER_SAMPLE_CODE,
    TEACHER_SAMPLE_LENGTHS,
    TeacherOutput,
    read_teacher_outputs,
)
from .teachers import FiniteCheck, load_teachers, prepare_teacher, run_teachers
from .vocab_losses import chunked_lm_losses
from .vocab_slices import sliced_lm_losses

logger = logging.get_logger(__name__)

# Arguments never passed to the teacher: its loss and output switches are ours to set.
_NOT_FOR_TEACHER = {"labels", "start_positions", "end_positions", "return_dict", "use_cache"}


def _columns(dataset) -> list[str] | None:
    """The training dataset's column names, where it has them (``datasets``), else None."""
    columns = getattr(dataset, "column_names", None)
    return list(columns) if columns is not None else None


def _no_teacher() -> InputError:
    return InputError(
        "This batch has no precomputed teacher outputs and no teacher_model was given: pass teacher_model, "
        "or precompute the teacher's outputs for every example (hf_distill.precompute_teacher_logits)."
    )


def _check_model_and_args(model, args) -> None:
    if not isinstance(args, DistillationConfig):
        raise TypeError(
            f"args must be a DistillationConfig, got {type(args).__name__}: "
            "use hf_distill.DistillationConfig(output_dir=..., temperature=..., alpha=..., beta=...)."
        )
    if model is None:
        raise InputError("DistillationTrainer needs the student as `model`.")


def _head_losses(hidden, student_embedding, teacher_side: dict[str, Any], labels, args):
    """The fused loss on the selected hidden states, with the heads read as the engine holds them: whole
    (:func:`chunked_lm_losses`, a ZeRO-3 or FSDP2 head gathered for this loss only), or one vocabulary slice at a
    time (:func:`sliced_lm_losses`, ``args.lm_vocab_slices > 1``: one process, FSDP2 or ZeRO-3)."""
    settings = {"temperature": args.temperature, "labels": labels, "chunk_size": args.lm_chunk_size,
                "kd_weight": args.alpha, "ce_weight": args.beta, "jsd_mixture": args.jsd_mixture}  # fmt: skip
    if args.lm_vocab_slices > 1:
        if "teacher_head" in teacher_side:
            teacher_side["teacher_head"] = head_slices(teacher_side["teacher_head"])
        student_head = head_slices(student_embedding)
        return sliced_lm_losses(hidden, student_head, num_slices=args.lm_vocab_slices, **settings, **teacher_side)
    with ExitStack() as gathered:
        if "teacher_head" in teacher_side:
            teacher_side["teacher_head"] = gathered.enter_context(gathered_weight(teacher_side["teacher_head"]))
        student_head = gathered.enter_context(gathered_weight(student_embedding))
        return chunked_lm_losses(hidden, student_head, **settings, **teacher_side)


class DistillationTrainer(Trainer):
    """Distils one teacher, or a weighted ensemble, into ``model`` (the student).

    The loss (see :mod:`hf_distill.losses` for the formulas)::

        alpha * KD(student, teacher, T) + beta * CE(student, labels)
            + hidden_loss_weight * H + attention_loss_weight * A

    Teachers are frozen, in eval mode, outside the optimizer, and run under ``torch.no_grad()``.
    Evaluation reports the student's own loss and metrics at ``T = 1``.

    The path is chosen once, here (:func:`hf_distill.loss_path.choose_loss_path`, kept as
    ``self.loss_path`` and logged): the fused chunked loss of causal LMs or the dense logits, and where the
    teacher's outputs come from: the training dataset's precomputed columns when it has them (a teacher
    cache; no teacher runs), else the live teacher. What differs between tasks is the student's
    :class:`hf_distill.tasks.TaskSpec` (``self.spec``). Instruction data (``prompt_input_ids`` /
    ``completion_input_ids``) train on completion tokens only, written by the dataset, the student (on-policy,
    ``lmbda``) or the teacher (``seq_kd``): :mod:`hf_distill.rollouts` (``self.rollouts``).

    Args:
        model: the student, a transformers model with a head hf-distill distils (sequence or token
            classification, question answering, masked or causal LM), optionally PEFT-wrapped.
        teacher_model: the teacher: a model, a Hub id or local path (loaded with the student's head class),
            or a list of them for an ensemble (weighted by ``args.teacher_weights``). None when the
            training dataset holds the teacher's precomputed outputs (``hf_distill.precompute_teacher_logits``).
        args: a :class:`hf_distill.DistillationConfig` (the weights ``alpha``, ``beta``, the temperature, the
            KD loss and ``jsd_mixture``, the extra losses, ``lm_chunk_size``, the rollout settings).
        data_collator: default :class:`hf_distill.InstructionDataCollator` for instruction data, else
            :class:`hf_distill.DistillationDataCollator` around ``processing_class``.
        train_dataset, eval_dataset: as for ``Trainer``; teacher columns travel with the training rows.
        processing_class: the student's tokenizer.
        teacher_processing_class: the teacher's tokenizer, when it differs from the student's (checked
            for a shared vocabulary where the task needs one).
        teacher_init_kwargs: keyword arguments of ``from_pretrained`` for teachers given by name (default
            dtype: ``args.teacher_torch_dtype``).
        **kwargs: passed to ``Trainer``.

    To change the loss, override :meth:`compute_teacher_outputs`, :meth:`compute_kd_loss` or
    :meth:`combine_losses` (the dense path).
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
        _check_model_and_args(model, args)
        self.task, self.spec = task_of(model), task_spec(model)
        teachers, self.teacher_weights = load_teachers(
            model,
            teacher_model,
            args,
            teacher_init_kwargs,
            student_tokenizer=processing_class,
            teacher_tokenizer=teacher_processing_class,
        )
        data_collator = self._choose_paths(
            model, teachers, args, train_dataset, processing_class, data_collator
        )
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
        # Instruction data: each micro-batch's completion-token sum over the step's count (no division by GA).
        self.loss_is_scaled_for_ga = self.rollouts is not None
        self._student_params = forward_params(self.model)
        self._teacher_params = set().union(*(forward_params(t) for t in teachers)) if teachers else set()
        self.teachers = [prepare_teacher(t, self.accelerator) for t in teachers]
        check_train_columns(_columns(train_dataset), args, self.label_names, has_teacher=bool(teachers))
        self.hidden_projection = HiddenProjection.for_models(self.model, self.teacher, args)
        self._metrics = LossMeans()  # the loss components since the last log
        self._teacher_finite = FiniteCheck()  # every live teacher output of this optimizer step finite?
        self._projection_stepped = True  # the optimizer stepped since the last training_step
        self.loss_path.log(logger, self.spec)

    @property
    def teacher(self) -> nn.Module | None:
        """The (first) teacher, placed for inference."""
        return self.teachers[0] if self.teachers else None

    # ---- setup --------------------------------------------------------------------------------

    def _choose_paths(self, model, teachers, args, train_dataset, processing_class, data_collator):
        """Once, before the Trainer creates output_dir: the loss path, the rollouts of instruction data, and the
        collator they need (unless one was given); every refusal of the settings happens here."""
        columns = _columns(train_dataset)
        if isinstance(train_dataset, Dataset):
            check_finite_logits(train_dataset, where="the training dataset's precomputed teacher columns")
        self.loss_path = choose_loss_path(
            args, self.spec, num_teachers=len(teachers), columns=columns, models=[model, *teachers]
        )
        check_sample_temperature(self.loss_path, train_dataset, args)
        check_sharded_settings(deepspeed_config(args), models_by_name(model, teachers))
        check_vocab_slices(deepspeed_config(args), args.lm_vocab_slices)
        self.rollouts = choose_rollouts(args, self.spec, self.loss_path.teacher, columns, processing_class)
        if data_collator is not None:
            pooled = {TEACHER_SAMPLE_CODE, TEACHER_SAMPLE_LENGTHS} & set(columns or ())
            if pooled and not isinstance(data_collator, DistillationDataCollator):
                raise InputError(
                    f"The training dataset holds an adaptive RS-KD cache ({', '.join(sorted(pooled))}: each block's "
                    f"draws pooled), which only DistillationDataCollator gives back token by token, but data_collator "
                    f"is {getattr(data_collator, '__name__', type(data_collator).__name__)}: pass "
                    "DistillationDataCollator(tokenizer), or none."
                )
            return data_collator
        if self.rollouts is not None:
            return InstructionDataCollator(self.rollouts.pad_token_id)
        return DistillationDataCollator(processing_class)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.hidden_projection is not None:
            optimizer.add_param_group(self.hidden_projection.param_group())
        return optimizer

    def _set_signature_columns_if_needed(self) -> None:
        # Keep what the teacher needs (e.g. token_type_ids for a BERT teacher of a DistilBERT
        # student) and the precomputed teacher columns: `remove_unused_columns` must not drop them.
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            extra = [*self._teacher_params, *TEACHER_LOGIT_COLUMNS, *INSTRUCTION_COLUMNS]
            extra += [TEACHER_INPUT_PREFIX + p for p in self._teacher_params]
            self._signature_columns += [c for c in extra if c not in self._signature_columns]

    # ---- inputs -----------------------------------------------------------------------------

    def _student_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in inputs.items() if k in self._student_params}

    def _teacher_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The teacher's arguments: its own ``teacher_*`` tokenization if the batch has one, else the student's."""
        sources = teacher_sources(inputs, self._teacher_params - _NOT_FOR_TEACHER)
        return {name: inputs[key] for name, key in sources.items() if inputs[key] is not None}

    # ---- the loss ---------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: the student's own loss at T = 1
            outputs = model(**self._student_inputs(inputs))
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        self.spec.check_labels(inputs, self.label_names, self.args.beta)
        if self.loss_path.name == FUSED:
            loss, outputs, components = self.compute_fused_lm_loss(model, inputs)
        else:
            loss, outputs, components = self.compute_dense_loss(model, inputs)
        self._metrics.add(components)
        if self.rollouts is not None and num_items_in_batch is not None:  # this micro-batch's token mean ->
            loss = loss * completion_tokens(inputs) / num_items_in_batch * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def compute_teacher_outputs(
        self, inputs: dict[str, Any], *, hidden_states: bool = False, attentions: bool = False
    ) -> TeacherOutput:
        """The teacher's outputs for this batch: from the cache the trainer reads (``loss_path.teacher``), else
        from the live teacher(s) (:func:`hf_distill.teachers.run_teachers`: an ensemble mixes soft labels)."""
        if self.loss_path.teacher not in (LIVE, None) and not (hidden_states or attentions):
            return read_teacher_outputs(inputs, self.loss_path.teacher)
        if not self.teachers:
            raise _no_teacher()
        args = self.args
        ensemble = (self.teacher_weights, args.temperature, args.kd_loss)
        output = run_teachers(
            self.teachers,
            self._teacher_inputs(inputs),
            self.spec.logits,
            *ensemble,
            hidden_states=hidden_states,
            attentions=attentions,
        )
        self._note_finite(output)
        return output

    def _note_finite(self, teacher: TeacherOutput) -> None:
        """Fold whether the live teacher's outputs are finite into a device flag (read once per optimizer step)."""
        if self.args.check_finite and self.model.training:
            self._teacher_finite.note([teacher.logits, *(teacher.hidden_states or ())])

    def compute_kd_loss(self, student_logits: torch.Tensor, teacher: TeacherOutput, inputs: dict[str, Any]):
        """The soft-label term at temperature ``T``: the task spec's positions, alignment and loss
        (:meth:`hf_distill.tasks.TaskSpec.kd_loss`)."""
        spec = self.spec
        mask = spec.kd_mask(inputs, student_logits.shape[1])
        return spec.kd_loss(
            self.args.kd_loss,
            spec.align(student_logits),
            teacher.map_positions(spec.align),
            self.args.temperature,
            mask,
            inputs,
            jsd_mixture=self.args.jsd_mixture,
        )

    def compute_dense_loss(self, model, inputs: dict[str, Any]):
        """``combine_losses`` of the terms the weights ask for, from the student's full outputs.

        Returns ``(loss, outputs, components)``.
        """
        args = self.args
        want_hidden, want_attention = args.hidden_loss_weight > 0, args.attention_loss_weight > 0
        student_inputs, labelled = labels_for_student(
            self._student_inputs(inputs), self.label_names, args.beta
        )
        switches = {"output_hidden_states": want_hidden, "output_attentions": want_attention}
        outputs = model(**student_inputs, **{k: True for k, on in switches.items() if on})

        components: dict[str, torch.Tensor] = {}
        if args.alpha > 0 or want_hidden or want_attention:
            teacher = self.compute_teacher_outputs(
                inputs, hidden_states=want_hidden, attentions=want_attention
            )
            if args.alpha > 0:
                components["kd"] = self.compute_kd_loss(self.spec.logits(outputs), teacher, inputs)
            if want_hidden:
                components["hidden"] = self.compute_hidden_loss(outputs, teacher, inputs)
            if want_attention:
                components["attention"] = self.compute_attention_loss(outputs, teacher, inputs)
        if args.beta > 0:
            # A batch of unlabelled examples only (label -100) has no hard-label term (and no gradient from it).
            components["ce"] = torch.where(labelled, outputs.loss, outputs.loss.new_zeros(()))
        return self.combine_losses(components), outputs, components

    def layer_map(self, num_student_layers: int, num_teacher_layers: int) -> list[int]:
        """The teacher layer (1-based) matched with each student layer (:func:`choose_layer_map`)."""
        config = base_model(self.model).config
        return choose_layer_map(self.args.layer_map, config, num_student_layers, num_teacher_layers)

    def compute_hidden_loss(self, student_outputs, teacher: TeacherOutput, inputs: dict[str, Any]):
        """:func:`hf_distill.intermediate_losses.mapped_hidden_loss`, the student projected to the teacher's width."""
        s_hidden, t_hidden = student_outputs.hidden_states, teacher.hidden_states
        layers = self.layer_map(len(s_hidden) - 1, len(t_hidden) - 1)
        mask = inputs.get("attention_mask")
        return mapped_hidden_loss(
            self.args.hidden_loss, s_hidden, t_hidden, layers, self.hidden_projection, mask
        )

    def compute_attention_loss(self, student_outputs, teacher: TeacherOutput, inputs: dict[str, Any]):
        """:func:`hf_distill.intermediate_losses.mapped_attention_loss` (eager attention, same head count)."""
        s_att, t_att = student_outputs.attentions, teacher.attentions
        layers = self.layer_map(len(s_att or ()), len(t_att or ()))  # maps checked by mapped_attention_loss
        return mapped_attention_loss(s_att, t_att, layers, inputs.get("attention_mask"))

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

    def compute_fused_lm_loss(self, model, inputs: dict[str, Any]):
        """``alpha * KD + beta * CE`` of a causal LM by :func:`hf_distill.vocab_losses.chunked_lm_losses`: the last
        hidden states (``logits_to_keep=1``) at the positions that count go to the chunked loss with the output
        embeddings, which forms the logits a chunk at a time. KD: ``args.kd_loss`` against a live teacher, ``"topk"``
        or ``"sampled"`` against a cache. Returns ``(loss, outputs, components)``."""
        args, spec = self.args, self.spec
        student_inputs = {k: v for k, v in self._student_inputs(inputs).items() if k not in self.label_names}
        hidden = last_hidden_state(model, student_inputs)
        select = spec.position_selector(inputs, hidden)
        teacher_side = self._fused_teacher_inputs(inputs, select) if args.alpha > 0 else {"kd": None}
        labels = select(spec.targets(inputs["labels"]), aligned=True) if args.beta > 0 else None
        out = _head_losses(select(hidden), output_embedding(model), teacher_side, labels, args)
        components = {"kd": out.kd} if args.alpha > 0 else {}
        if args.beta > 0:
            components["ce"] = out.ce
        return out.loss, CausalLMOutput(loss=out.ce), components

    def _fused_teacher_inputs(self, inputs: dict[str, Any], select) -> dict[str, Any]:
        """The teacher's side of :func:`chunked_lm_losses` at the selected positions: a cache's ids and values,
        or the live teacher's last hidden states and output embedding."""
        source = self.loss_path.teacher
        if source in ("topk", "sampled"):
            ids, values = read_teacher_outputs(inputs, source).sparse_target()
            return {"kd": source, "teacher_ids": select(ids), "teacher_values": select(values)}
        if self.teacher is None:
            raise _no_teacher()
        with torch.no_grad():
            t_hidden = last_hidden_state(self.teacher, self._teacher_inputs(inputs))
        self._note_finite(TeacherOutput(hidden_states=(t_hidden,)))
        return {
            "kd": self.args.kd_loss,
            "teacher_hidden": select(t_hidden),
            "teacher_head": output_embedding(self.teacher),  # its weight is gathered for the loss
        }

    # ---- the training step ---------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step; with instruction data, their completions written by whoever
        :mod:`hf_distill.rollouts` draws, and the number of completion tokens over the step and all processes."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.rollouts is None or not batches:
            return batches, num_items
        student = self.accelerator.unwrap_model(self.model)
        write = self.is_world_process_zero()
        batches, tokens = self.rollouts.prepare(batches, student, self.teacher, self.state.global_step, write)
        tokens = torch.tensor(float(tokens), device=device)
        if self.accelerator.num_processes > 1:
            tokens = self.accelerator.reduce(tokens, reduction="sum")
        return batches, tokens.clamp_min(1.0)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.hidden_projection is not None and self._projection_stepped:
            # The Trainer zeroes the student's gradients after each optimizer step, not the projection's.
            self.hidden_projection.zero_grad(set_to_none=True)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._projection_stepped = self.accelerator.sync_gradients
        if self.hidden_projection is not None:
            self.hidden_projection.average_gradients(self.accelerator)
        if self.accelerator.sync_gradients:  # the last micro-batch: the optimizer steps next
            self._teacher_finite.raise_if_not_finite(
                self.accelerator, self.state.global_step + 1, self.state.epoch or 0, self.args.output_dir
            )
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Evaluation sees the student's inputs only: its own metrics at T = 1.
        keep = self._student_params | set(self.label_names)
        inputs = {k: v for k, v in inputs.items() if k in keep}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # training logs: the mean of each loss component since the last log, all processes
            logs.update(self._metrics.pop_means(self.accelerator, self.args.device))
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
            run_dir = Path(self._get_output_dir(trial=trial))
            self.hidden_projection.save_to(run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # The projection's weights; its optimizer state returns with optimizer.pt (its own param group).
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.hidden_projection is not None:
            self.hidden_projection.load_from(resume_from_checkpoint)

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
        """Upload the student alone (PEFT adapters merged), its tokenizer, config and card (default: the
        output folder's README.md, else one written from the trainer); never the teacher, checkpoints or the
        token. See :func:`hf_distill.hub.push_trainer_student`."""
        return push_trainer_student(
            self, card, token=token, private=private, commit_message=commit_message, revision=revision
        )
