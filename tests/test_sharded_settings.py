"""Sharded-engine settings refused before training, each as one line (hf_distill.sharding.check_sharded_settings).

A model partitioned by ZeRO-3 is faked here: DeepSpeed marks each partitioned parameter with a ``ds_id``,
which is what :func:`hf_distill.sharding.is_zero3_partitioned` reads. No DeepSpeed engine is built.
"""

from __future__ import annotations

import pytest
from conftest import config
from test_lm_trainer import lm_rows, tiny_llama

from hf_distill import DistillationTrainer
from hf_distill.errors import InputError
from hf_distill.sharding import check_sharded_settings, check_vocab_slices


def partitioned(model):
    """``model`` as ZeRO-3 leaves it, as far as the check can tell: every parameter has a ``ds_id``."""
    for i, param in enumerate(model.parameters()):
        param.ds_id = i
    return model


ZERO2 = {"zero_optimization": {"stage": 2}}
ZERO3 = {"zero_optimization": {"stage": 3}}


@pytest.mark.parametrize(
    ("ds_config", "run"),
    [
        (ZERO2, "uses ZeRO stage 2 (zero_optimization.stage)"),
        (None, "does not use DeepSpeed"),
        ({}, "stage 0"),
    ],
    ids=["zero2", "no-deepspeed", "stage-unset"],
)
def test_a_zero3_teacher_in_a_run_that_is_not_zero3_is_refused(ds_config, run):
    teacher = partitioned(tiny_llama(1))
    with pytest.raises(InputError) as refused:
        check_sharded_settings(ds_config, {"student": tiny_llama(2), "teacher": teacher})
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("The teacher was partitioned by DeepSpeed ZeRO-3")
    assert run in message and "zero_stage: 3" in message


def test_a_zero3_student_in_a_zero2_run_is_refused():
    with pytest.raises(InputError, match="^The student was partitioned by DeepSpeed ZeRO-3.*ZeRO stage 2"):
        check_sharded_settings(ZERO2, {"student": partitioned(tiny_llama(2))})


def test_what_the_settings_can_serve_passes():
    check_sharded_settings(
        ZERO3, {"student": partitioned(tiny_llama(2)), "teacher": partitioned(tiny_llama(1))}
    )
    check_sharded_settings(ZERO2, {"student": tiny_llama(2), "teacher": tiny_llama(1)})  # whole models
    check_sharded_settings(None, {"student": tiny_llama(2), "teacher": tiny_llama(1)})


@pytest.mark.parametrize("zero2", [False, True], ids=["no-deepspeed", "zero2-args"])
def test_the_trainer_refuses_at_construction_before_output_dir(tmp_path, zero2):
    """``deepspeed=`` a ZeRO-2 config: ``TrainingArguments`` builds the DeepSpeed plugin the trainer reads (no engine)."""
    if zero2:
        pytest.importorskip("deepspeed")
    ds = {"deepspeed": {**ZERO2, "train_micro_batch_size_per_gpu": "auto"}} if zero2 else {}
    args = config(tmp_path, lm_chunk_size=5, per_device_train_batch_size=4, **ds)
    run = "uses ZeRO stage 2" if zero2 else "does not use DeepSpeed"
    with pytest.raises(InputError, match=f"^The teacher was partitioned.*{run}"):
        DistillationTrainer(
            model=tiny_llama(2), teacher_model=partitioned(tiny_llama(1)), args=args, train_dataset=lm_rows()
        )
    assert not (tmp_path / "out").exists()


def test_an_ensemble_names_the_partitioned_teacher(tmp_path):
    teachers = [tiny_llama(1), partitioned(tiny_llama(3))]
    with pytest.raises(InputError, match="^The teacher 2 was partitioned"):
        DistillationTrainer(
            model=tiny_llama(2), teacher_model=teachers, args=config(tmp_path), train_dataset=lm_rows()
        )


@pytest.mark.parametrize(
    "unreadable",
    [
        {"offload_param": {"device": "nvme", "nvme_path": "/nvme"}},
        {"zero_quantized_weights": True},
        {"zero_quantized_nontrainable_weights": True},
    ],
    ids=["nvme", "quantized", "quantized-frozen"],
)
def test_vocab_slices_are_refused_under_zero3_where_the_partitions_are_not_plain(unreadable):
    """ZeRO-3 heads are read from their partitions (Zero3HeadSlices), on the device or offloaded to the CPU; NVMe and
    quantized partitions only DeepSpeed reads: lm_vocab_slices > 1 is refused there, naming the setting and the fix."""
    (name,) = unreadable if "offload_param" not in unreadable else ["offload_param.device: nvme"]
    config = {"zero_optimization": {"stage": 3, **unreadable}}
    with pytest.raises(
        InputError,
        match=rf"^lm_vocab_slices=4 reads .* with {name}: set lm_vocab_slices=1, or turn it off\.$",
    ):
        check_vocab_slices(config, 4)
    check_vocab_slices(config, 1)
    check_vocab_slices({"zero_optimization": {"stage": 2, **unreadable}}, 4)


def test_vocab_slices_are_read_under_zero3_on_the_device_or_offloaded_to_the_cpu():
    check_vocab_slices({"zero_optimization": {"stage": 3}}, 4)
    check_vocab_slices({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, 4)
    check_vocab_slices({"zero_optimization": {"stage": 3, "offload_param": None}}, 4)
    check_vocab_slices({"zero_optimization": {"stage": 2}}, 4)
    check_vocab_slices(None, 4)
