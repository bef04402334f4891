"""choose_loss_path, a pure function: every reason for the dense path, the teacher's source, and the refusals."""

from __future__ import annotations

import pytest
from conftest import config
from instruct_fixtures import tiny_llama
from torch import nn

from hf_distill.errors import InputError
from hf_distill.loss_path import DENSE, FUSED, choose_loss_path, choose_teacher_source
from hf_distill.tasks import CAUSAL_LM, SEQUENCE_CLASSIFICATION, TASK_SPECS
from hf_distill.teacher_outputs import LIVE

CAUSAL = TASK_SPECS[CAUSAL_LM]
TEXT = ["input_ids", "attention_mask", "labels"]
TOPK = [*TEXT, "teacher_topk_values", "teacher_topk_indices"]
SAMPLED = [*TEXT, "teacher_sample_ids", "teacher_sample_counts"]


def path(tmp_path, *, spec=CAUSAL, teachers=1, columns=TEXT, models=(), **settings):
    return choose_loss_path(
        config(tmp_path, **settings), spec, num_teachers=teachers, columns=columns, models=models
    )


def test_a_causal_lm_with_a_live_teacher_takes_the_fused_path(tmp_path):
    chosen = path(tmp_path, models=[tiny_llama(0), tiny_llama(1)])
    assert (chosen.name, chosen.teacher) == (FUSED, LIVE)
    assert "1024 positions a chunk" in chosen.describe() and "the live teacher" in chosen.describe()


@pytest.mark.parametrize(
    ("settings", "teachers", "columns", "reason"),
    [
        ({"hidden_loss": "mse", "hidden_loss_weight": 0.5}, 1, TEXT, "hidden_loss_weight > 0"),
        ({"attention_loss_weight": 0.5}, 1, TEXT, "attention_loss_weight > 0"),
        ({}, 2, TEXT, "an ensemble of teachers"),
        ({}, 0, [*TEXT, "teacher_logits"], "the cached teacher logits are dense"),
        ({"kd_loss": "mse"}, 1, TEXT, "kd_loss='mse'"),
        ({"lm_chunk_size": None}, 1, TEXT, "lm_chunk_size=None"),
    ],
)
def test_each_reason_for_the_dense_path_is_named(tmp_path, settings, teachers, columns, reason):
    chosen = path(tmp_path, teachers=teachers, columns=columns, **settings)
    assert chosen.name == DENSE and reason in chosen.reason
    assert path(tmp_path).name == FUSED  # the same call without that setting


def test_an_output_embedding_with_a_bias_takes_the_dense_path(tmp_path):
    student, teacher = tiny_llama(0), tiny_llama(1)
    assert path(tmp_path, models=[student, teacher]).name == FUSED
    teacher.lm_head = nn.Linear(32, teacher.config.vocab_size, bias=True)
    chosen = path(tmp_path, models=[student, teacher])
    assert chosen.name == DENSE and "an output embedding has a bias" in chosen.reason


def test_several_reasons_are_all_named(tmp_path):
    chosen = path(tmp_path, teachers=2, kd_loss="mse")
    assert "ensemble" in chosen.reason and "kd_loss='mse'" in chosen.reason


def test_other_tasks_use_their_logits(tmp_path):
    chosen = path(tmp_path, spec=TASK_SPECS[SEQUENCE_CLASSIFICATION])
    assert chosen.name == DENSE and chosen.reason == "sequence_classification logits"


@pytest.mark.parametrize(("columns", "source"), [(TOPK, "topk"), (SAMPLED, "sampled"), (TEXT, LIVE)])
def test_cached_columns_come_before_the_live_teacher(tmp_path, columns, source):
    assert choose_teacher_source(config(tmp_path), 1, columns) == source
    assert path(tmp_path, columns=columns).teacher == source


def test_hidden_state_losses_need_the_live_teacher_and_no_teacher_is_none(tmp_path):
    hidden = config(tmp_path, hidden_loss="mse", hidden_loss_weight=1.0)
    assert choose_teacher_source(hidden, 1, TOPK) == LIVE
    assert choose_teacher_source(config(tmp_path), 0, TEXT) is None
    assert choose_teacher_source(config(tmp_path), 0, None) is None


@pytest.mark.parametrize("columns", [TOPK, SAMPLED])
@pytest.mark.parametrize("kd_loss", ["reverse_kl", "jsd"])
def test_a_sparse_cache_with_a_loss_it_cannot_give_is_refused_unless_alpha_is_zero(
    tmp_path, columns, kd_loss
):
    with pytest.raises(InputError, match=f"kd_loss='{kd_loss}' needs the teacher's whole distribution"):
        path(tmp_path, columns=columns, kd_loss=kd_loss)
    assert path(tmp_path, columns=columns, kd_loss=kd_loss, alpha=0.0, beta=1.0).teacher in (
        "topk",
        "sampled",
    )
    assert path(tmp_path, columns=columns, kd_loss="kl").name == FUSED
