"""choose_loss_path, a pure function: every reason for the dense path, the teacher's source, and the refusals."""

from __future__ import annotations

import logging
import re

import pytest
from conftest import config
from instruct_fixtures import tiny_llama
from torch import nn

from hf_distill.errors import InputError
from hf_distill.loss_path import DENSE, FUSED, choose_loss_path, choose_teacher_source
from hf_distill.tasks import CAUSAL_LM, MASKED_LM, SEQUENCE_CLASSIFICATION, TASK_SPECS
from hf_distill.teacher_outputs import LIVE

CAUSAL = TASK_SPECS[CAUSAL_LM]
TEXT = ["input_ids", "attention_mask", "labels"]
TOPK = [*TEXT, "teacher_topk_values", "teacher_topk_indices"]
SAMPLED = [*TEXT, "teacher_sample_ids", "teacher_sample_counts"]
FORMED = ": the (positions x vocabulary) logits are formed"
CHUNKED = "chunked causal-LM loss, 1024 positions a chunk"


def path(tmp_path, *, spec=CAUSAL, teachers=1, columns=TEXT, models=(), **settings):
    return choose_loss_path(
        config(tmp_path, **settings), spec, num_teachers=teachers, columns=columns, models=models
    )


def test_a_causal_lm_with_a_live_teacher_takes_the_fused_path(tmp_path):
    chosen = path(tmp_path, models=[tiny_llama(0), tiny_llama(1)])
    assert (chosen.name, chosen.teacher, chosen.reason) == (FUSED, LIVE, CHUNKED)
    assert path(tmp_path, lm_chunk_size=7).reason == "chunked causal-LM loss, 7 positions a chunk"


@pytest.mark.parametrize(
    ("settings", "teachers", "columns", "reason"),
    [
        (
            {"hidden_loss": "mse", "hidden_loss_weight": 0.5},
            1,
            TEXT,
            "hidden_loss_weight > 0 needs the full forward" + FORMED,
        ),
        (
            {"attention_loss_weight": 0.5},
            1,
            TEXT,
            "attention_loss_weight > 0 needs the full forward" + FORMED,
        ),
        ({}, 2, TEXT, "an ensemble of teachers mixes full distributions" + FORMED),
        ({}, 0, [*TEXT, "teacher_logits"], "the cached teacher logits are dense" + FORMED),
        # an ensemble whose mixture is cached: one dense teacher
        ({}, 2, [*TEXT, "teacher_logits"], "the cached teacher logits are dense" + FORMED),
        ({"kd_loss": "mse"}, 1, TEXT, "kd_loss='mse' compares the full logits" + FORMED),
        ({"lm_chunk_size": None}, 1, TEXT, "lm_chunk_size=None"),
    ],
)
def test_each_reason_for_the_dense_path_is_named(tmp_path, settings, teachers, columns, reason):
    chosen = path(tmp_path, teachers=teachers, columns=columns, **settings)
    assert (chosen.name, chosen.reason) == (DENSE, reason)
    assert path(tmp_path).name == FUSED  # the same call without that setting


def test_an_output_embedding_with_a_bias_takes_the_dense_path(tmp_path):
    student, teacher = tiny_llama(0), tiny_llama(1)
    assert path(tmp_path, models=[student, teacher]).name == FUSED
    teacher.lm_head = nn.Linear(32, teacher.config.vocab_size, bias=True)
    chosen = path(tmp_path, models=[student, teacher])
    assert (chosen.name, chosen.reason) == (DENSE, "an output embedding has a bias" + FORMED)


def test_several_reasons_are_all_named(tmp_path):
    chosen = path(tmp_path, teachers=2, kd_loss="mse")
    reasons = "an ensemble of teachers mixes full distributions; kd_loss='mse' compares the full logits"
    assert chosen.reason == reasons + FORMED


@pytest.mark.parametrize(
    ("teachers", "columns", "described"),
    [
        (1, TEXT, f"loss path: fused ({CHUNKED}); teacher outputs from the live teacher"),
        (0, TOPK, f"loss path: fused ({CHUNKED}); teacher outputs from the topk cache"),
        (0, TEXT, f"loss path: fused ({CHUNKED}); teacher outputs from no teacher"),
    ],
)
def test_the_path_describes_where_the_teachers_outputs_come_from(tmp_path, teachers, columns, described):
    assert path(tmp_path, teachers=teachers, columns=columns).describe() == described


def test_the_path_is_logged_a_warning_when_a_vocabulary_task_forms_the_full_logits(tmp_path, caplog):
    logger = logging.getLogger("hf_distill.trainer")
    caplog.set_level(logging.INFO, logger=logger.name)
    masked = TASK_SPECS[MASKED_LM]
    for spec, teachers in ((CAUSAL, 2), (CAUSAL, 1), (masked, 1)):
        path(tmp_path, spec=spec, teachers=teachers).log(logger, spec)
    live = "teacher outputs from the live teacher"
    assert [(record.levelno, record.getMessage()) for record in caplog.records] == [
        (
            logging.WARNING,
            f"hf_distill: loss path: dense (an ensemble of teachers mixes full distributions{FORMED}); {live}",
        ),
        (logging.INFO, f"hf_distill: loss path: fused ({CHUNKED}); {live}"),
        (logging.WARNING, f"hf_distill: loss path: dense (masked_lm logits); {live}"),
    ]


def test_other_tasks_use_their_logits(tmp_path):
    chosen = path(tmp_path, spec=TASK_SPECS[SEQUENCE_CLASSIFICATION])
    assert chosen.name == DENSE and chosen.reason == "sequence_classification logits"


@pytest.mark.parametrize(("columns", "source"), [(TOPK, "topk"), (SAMPLED, "sampled"), (TEXT, LIVE)])
def test_cached_columns_come_before_the_live_teacher(tmp_path, columns, source):
    assert choose_teacher_source(config(tmp_path), 1, columns) == source
    assert path(tmp_path, columns=columns).teacher == source


@pytest.mark.parametrize(
    "settings",
    [{"hidden_loss": "mse", "hidden_loss_weight": 0.5}, {"attention_loss_weight": 0.5}],
    ids=["hidden", "attention"],
)
def test_hidden_state_or_attention_losses_need_the_live_teacher(tmp_path, settings):
    assert choose_teacher_source(config(tmp_path, **settings), 1, TOPK) == LIVE


def test_no_teacher_and_no_cache_is_none(tmp_path):
    assert choose_teacher_source(config(tmp_path), 0, TEXT) is None
    assert choose_teacher_source(config(tmp_path), 0, None) is None


SPARSE_FORMS = {
    "topk": "its top-k logits (teacher_topk_values, teacher_topk_indices)",
    "sampled": "tokens drawn from it (teacher_sample_ids)",
}


@pytest.mark.parametrize(
    ("columns", "source"), [(TOPK, "topk"), (SAMPLED, "sampled")], ids=["topk", "sampled"]
)
@pytest.mark.parametrize("kd_loss", ["reverse_kl", "jsd"])
def test_a_sparse_cache_with_a_loss_it_cannot_give_is_refused_unless_alpha_is_zero(
    tmp_path, columns, source, kd_loss
):
    message = (
        f"kd_loss='{kd_loss}' needs the teacher's whole distribution, but the training dataset holds "
        f"{SPARSE_FORMS[source]}, which give the forward KL only: set kd_loss='kl', or distil from a live "
        "teacher or dense cached logits."
    )
    with pytest.raises(InputError, match="^" + re.escape(message) + "$"):
        path(tmp_path, columns=columns, kd_loss=kd_loss)
    assert path(tmp_path, columns=columns, kd_loss=kd_loss, alpha=0.0, beta=1.0).teacher == source
    assert path(tmp_path, columns=columns, kd_loss="kl").name == FUSED
