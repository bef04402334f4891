"""The model card of a distilled student: what a user needs to choose and trust it.

``StudentCardData`` holds the facts of one distillation run (typed in from measured results, never guessed);
``render_card`` turns them into a ``huggingface_hub.ModelCard`` from the packaged template
``hf_distill/templates/student_card.md``. The YAML metadata is built by ``huggingface_hub`` itself
(``ModelCardData`` + ``EvalResult`` -> ``model-index``), so it follows the Hub's conventions.

Derived numbers are computed here, not typed: retention = student / teacher for every metric both report (but
an error whose ideal is zero, such as ECE: see ``NO_RETENTION``), size ratio = student parameters / teacher
parameters.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn

from .errors import InputError
from .student import teacher_layers_of
from .tasks import (
    CAUSAL_LM,
    MASKED_LM,
    QUESTION_ANSWERING,
    SEQUENCE_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
    base_model,
    task_of,
)
from .teacher_cache import read_provenance, weights_hash

TEMPLATE_PATH = resources.files("hf_distill") / "templates" / "student_card.md"

# hf-distill task -> (Hub pipeline_tag, pretty task name, transformers Auto class of the usage snippet).
TASK_INFO: dict[str, tuple[str, str, str]] = {
    SEQUENCE_CLASSIFICATION: (
        "text-classification",
        "Text Classification",
        "AutoModelForSequenceClassification",
    ),
    TOKEN_CLASSIFICATION: ("token-classification", "Token Classification", "AutoModelForTokenClassification"),
    QUESTION_ANSWERING: ("question-answering", "Question Answering", "AutoModelForQuestionAnswering"),
    MASKED_LM: ("fill-mask", "Fill-Mask", "AutoModelForMaskedLM"),
    CAUSAL_LM: ("text-generation", "Text Generation", "AutoModelForCausalLM"),
}
TEACHER_MODES = ("live", "cached")
# Metrics where lower is better: their retention is teacher / student.
LOWER_IS_BETTER = {"perplexity", "loss"}
# Metrics shown as plain values, without retention: an error whose ideal is 0, where a ratio to the teacher's
# means nothing (a student with ECE 0.02 against a teacher's 0.01 is not "50% of the teacher"; 0 divides by 0).
NO_RETENTION = {"ece", "reverse_kl", "forward_kl"}  # the KLs: 0 for the teacher itself
NO_RETENTION_CELL = "n/a (compare the values)"
BASE_TAGS = ["knowledge-distillation", "distillation", "hf-distill"]
# A Hub token on a recorded launch line: `--hub_token X` / `--hub_token=X`, or any `hf_...` token.
_TOKEN_PATTERNS = (re.compile(r"(--hub[_-]token[= ])\S+"), re.compile(r"()\bhf_[A-Za-z0-9]{20,}"))


def redact_tokens(text: str) -> str:
    """``text`` with Hub tokens replaced by ``<HUB_TOKEN>`` (as ``TrainingArguments.to_dict`` does)."""
    for pattern in _TOKEN_PATTERNS:
        text = pattern.sub(r"\1<HUB_TOKEN>", text)
    return text


@dataclass(kw_only=True)
class StudentCardData:
    """Everything a distilled student's card says. Numbers come from the run's own results files.

    Metric dicts map a metric id (``"accuracy"``, ``"f1"``, ``"matthews_correlation"``...) to its value, all
    measured on ``eval_split`` of the same dataset: the teacher, the distilled student, and the hard-label
    baseline (the same student architecture and initialisation trained on the labels alone, ``alpha=0``).
    What was not measured is None, and the card says "not measured" (never a number it does not have).
    """

    # ---- what and where
    repo_id: str
    task: str
    dataset_name: str | None
    eval_split: str | None
    dataset_config: str | None = None
    # ---- teacher
    teacher: str
    teacher_weights_hash: str
    # ---- student initialisation: the teacher layers build_student copied (0-based, as in
    # student.config.distillation["teacher_layers"]), or the checkpoint the student started from
    student_init_layers: list[int] | None = None
    student_init_checkpoint: str | None = None
    # ---- distillation settings (DistillationConfig fields)
    temperature: float = 2.0
    alpha: float = 0.5
    beta: float = 0.5
    kd_loss: str = "kl"
    hidden_loss: str | None = None
    hidden_loss_weight: float = 0.0
    attention_loss_weight: float = 0.0
    teacher_mode: str = "live"
    # ---- results on eval_split
    teacher_metrics: dict[str, float] | None
    student_metrics: dict[str, float] | None
    baseline_metrics: dict[str, float] | None = None
    # ---- size and speed
    teacher_parameters: int | None
    student_parameters: int
    speedup: float | None = None
    speedup_hardware: str | None = None
    speedup_setup: str | None = None
    # ---- reproduction
    # ---- language models: greedy continuations of fixed prompts ({"prompt", "continuation"} each)
    samples: list[dict[str, str]] | None = None
    # ---- reproduction
    recipe: str | None = None
    launch_command: str | None = None
    # a picture of the run's results (e.g. results.png): the card shows it by its file name, so it lives
    # beside the card; push_student uploads it with the card
    results_image: str | None = None
    # ---- Hub metadata
    license: str = "apache-2.0"
    language: str | list[str] | None = "en"
    pipeline_tag: str | None = None
    base_model: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.task not in TASK_INFO:
            raise InputError(f"task must be one of {list(TASK_INFO)}, got {self.task!r}.")
        validate_repo_id(self.repo_id)
        if not self.teacher:
            raise InputError("teacher is empty: give the teacher's Hub id or local path.")
        if not self.teacher_weights_hash:
            raise InputError(
                "teacher_weights_hash is empty: compute it with hf_distill.teacher_cache.weights_hash(teacher) so "
                "users can check which teacher weights were distilled."
            )
        if self.teacher_mode not in TEACHER_MODES:
            raise InputError(f"teacher_mode must be one of {TEACHER_MODES}, got {self.teacher_mode!r}.")
        if (self.student_metrics or self.teacher_metrics) and not (self.dataset_name and self.eval_split):
            raise InputError(
                "Metrics need the dataset_name and eval_split they were measured on "
                f"(got dataset_name={self.dataset_name!r}, eval_split={self.eval_split!r})."
            )
        self.teacher_metrics = self.teacher_metrics or None  # {} is "not measured" too
        self.student_metrics = self.student_metrics or None
        if (
            self.teacher_parameters is not None and self.teacher_parameters <= 0
        ) or self.student_parameters <= 0:
            raise InputError(
                f"teacher_parameters and student_parameters must be > 0, got {self.teacher_parameters} and "
                f"{self.student_parameters}: count them with hf_distill.model_card.count_parameters(model)."
            )
        if self.speedup is not None and not self.speedup_hardware:
            raise InputError(f"speedup={self.speedup} needs speedup_hardware (where it was measured).")
        if self.launch_command is not None:
            self.launch_command = redact_tokens(self.launch_command)
        if self.pipeline_tag is None:
            self.pipeline_tag = TASK_INFO[self.task][0]
        if self.base_model is None and _is_hub_id(self.teacher):
            self.base_model = self.teacher

    @property
    def model_name(self) -> str:
        return self.repo_id.split("/")[-1]

    @property
    def retention(self) -> dict[str, float]:
        """student / teacher for every metric both report (teacher value nonzero); teacher / student for a
        metric where lower is better (perplexity, loss), so that 100% is the teacher's quality either way. None
        for a metric in ``NO_RETENTION`` (ECE): the card shows its values alone."""
        student, teacher = self.student_metrics or {}, self.teacher_metrics or {}
        return {
            name: teacher[name] / student[name] if name in LOWER_IS_BETTER else student[name] / teacher[name]
            for name in student
            if name not in NO_RETENTION and teacher.get(name) and student[name]
        }

    @property
    def size_ratio(self) -> float | None:
        """student parameters / teacher parameters (None when the teacher's were not counted)."""
        return None if self.teacher_parameters is None else self.student_parameters / self.teacher_parameters


# The DistillationConfig fields a card reports, under the same names in StudentCardData.
SETTINGS = (
    "temperature",
    "alpha",
    "beta",
    "kd_loss",
    "hidden_loss",
    "hidden_loss_weight",
    "attention_loss_weight",
)


def settings_of(args) -> dict[str, Any]:
    """The distillation settings of a ``DistillationConfig`` as ``StudentCardData`` keyword arguments."""
    return {name: getattr(args, name) for name in SETTINGS}


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub model id (and is not a folder on this machine)."""
    if os.path.exists(name) or name.startswith((".", "/", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model`` (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


NOT_MEASURED = "not measured"


def _fmt(value: float | None) -> str:
    return NOT_MEASURED if value is None else f"{value:.4g}"


def _retention_cell(name: str, retention: dict[str, float]) -> str:
    if name in NO_RETENTION:
        return NO_RETENTION_CELL
    return NOT_MEASURED if name not in retention else f"{100 * retention[name]:.1f}%"


def _result_rows(data: StudentCardData) -> list[dict[str, str]]:
    retention = data.retention
    teacher, student, baseline = (
        data.teacher_metrics or {},
        data.student_metrics or {},
        data.baseline_metrics or {},
    )
    return [
        {
            "metric": name,
            "teacher": _fmt(teacher.get(name)),
            "student": _fmt(student.get(name)),
            "baseline": _fmt(baseline.get(name)),
            "retention": _retention_cell(name, retention),
        }
        for name in dict.fromkeys([*student, *teacher])
    ]


def card_metadata(data: StudentCardData) -> ModelCardData:
    """The card's YAML metadata: base_model, datasets, tags, pipeline_tag and a model-index of the student's
    results (one ``EvalResult`` per metric)."""
    pipeline_tag, task_name, _ = TASK_INFO[data.task]
    pretty_dataset = (data.dataset_name or "") + (f" ({data.dataset_config})" if data.dataset_config else "")
    eval_results = [
        EvalResult(
            task_type=pipeline_tag,
            task_name=task_name,
            dataset_type=data.dataset_name,
            dataset_name=pretty_dataset,
            dataset_config=data.dataset_config,
            dataset_split=data.eval_split,
            metric_type=name,
            metric_name=name,
            metric_value=float(value),
        )
        for name, value in (data.student_metrics or {}).items()
    ]
    return ModelCardData(
        model_name=data.model_name,
        base_model=data.base_model,
        datasets=[data.dataset_name] if data.dataset_name else None,
        language=data.language,
        license=data.license,
        library_name="transformers",
        pipeline_tag=data.pipeline_tag,
        tags=BASE_TAGS + [t for t in data.tags if t not in BASE_TAGS],
        metrics=list(data.student_metrics) if data.student_metrics else None,
        eval_results=eval_results or None,
    )


def render_card(data: StudentCardData) -> ModelCard:
    """The student's ``ModelCard`` from the packaged template (metadata by ``card_metadata``)."""
    _, task_name, auto_class = TASK_INFO[data.task]
    return ModelCard.from_template(
        card_metadata(data),
        template_str=TEMPLATE_PATH.read_text(encoding="utf-8"),
        data=data,
        task_name=task_name,
        auto_class=auto_class,
        rows=_result_rows(data),
        size_ratio=None if data.size_ratio is None else f"{data.size_ratio:.3f}",
        compression=None if data.size_ratio is None else f"{1 / data.size_ratio:.2f}",
        has_baseline=data.baseline_metrics is not None,
        results_image=None if data.results_image is None else Path(data.results_image).name,
    )


def write_card(data: StudentCardData, path: str | os.PathLike) -> ModelCard:
    """Render the card of ``data`` and save it at ``path`` (a README.md); returns the card."""
    card = render_card(data)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    card.save(path)
    return card


# What Trainer.evaluate logs besides the metrics.
EVAL_BOOKKEEPING = {
    "loss",
    "runtime",
    "samples_per_second",
    "steps_per_second",
    "model_preparation_time",
    "epoch",
}


def last_evaluation(log_history: list[dict[str, Any]], prefix: str = "eval") -> dict[str, float] | None:
    """The metrics of the last ``Trainer.evaluate`` in ``log_history`` (``eval_accuracy`` -> ``accuracy``), with
    the loss only when there is no other metric; None when the model was never evaluated."""
    start = prefix + "_"
    for entry in reversed(log_history):
        metrics = {k[len(start) :]: v for k, v in entry.items() if k.startswith(start)}
        if metrics:
            chosen = {k: v for k, v in metrics.items() if k not in EVAL_BOOKKEEPING}
            return chosen or ({"loss": metrics["loss"]} if "loss" in metrics else None)
    return None


def card_data_from_trainer(trainer, repo_id: str) -> StudentCardData:
    """The card of ``trainer``'s student from what the trainer knows, for ``push_to_hub`` without a card.

    The teacher's name, weights hash and size (a live teacher or ensemble), or its name and weights hash
    from the teacher cache's provenance (cached logits); the distillation settings (``settings_of``); the
    student's size and its last evaluation (``trainer.state.log_history``). The teacher's and a baseline's
    scores were not measured by the trainer: the card says so.
    """
    teachers = list(trainer.teachers)
    if teachers:
        models = [base_model(getattr(t, "module", t)) for t in teachers]
        names = [m.config._name_or_path or type(m).__name__ for m in models]
        teacher = names[0] if len(names) == 1 else "ensemble of " + ", ".join(names)
        teacher_hash = ", ".join(weights_hash(m) for m in models)
        teacher_parameters = sum(count_parameters(m) for m in models)
        mode = "live"
    else:
        provenance = read_provenance(trainer.train_dataset)
        teacher, teacher_hash, teacher_parameters, mode = (
            provenance.get("teacher") or provenance["teacher_class"],
            provenance["weights_hash"],
            None,
            "cached",
        )
    student = trainer.model
    metrics = last_evaluation(trainer.state.log_history)
    info = getattr(trainer.eval_dataset, "info", None) or getattr(trainer.train_dataset, "info", None)
    dataset = getattr(info, "dataset_name", None) or None
    return StudentCardData(
        repo_id=repo_id,
        task=task_of(student),
        dataset_name=dataset or ("not recorded" if metrics else None),
        eval_split="eval (the trainer's eval_dataset)" if metrics else None,
        teacher=teacher,
        teacher_weights_hash=teacher_hash,
        student_init_layers=teacher_layers_of(student),
        teacher_mode=mode,
        teacher_metrics=None,
        student_metrics=metrics,
        baseline_metrics=None,
        teacher_parameters=teacher_parameters,
        student_parameters=count_parameters(student),
        **settings_of(trainer.args),
    )
