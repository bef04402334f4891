"""DistillationConfig rejects bad values with an error that names the field and the value."""

from __future__ import annotations

import pytest
import torch

from hf_distill import DistillationConfig


def make(tmp_path, **kwargs):
    return DistillationConfig(output_dir=str(tmp_path), report_to="none", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, "temperature must be > 0, got 0.0"),
        ({"temperature": -1.0}, "temperature must be > 0, got -1.0"),
        ({"alpha": -0.1}, "alpha must be >= 0, got -0.1"),
        ({"beta": -1.0}, "beta must be >= 0, got -1.0"),
        ({"hidden_loss": "cosine", "hidden_loss_weight": -1.0}, "hidden_loss_weight must be >= 0"),
        ({"attention_loss_weight": -2.0}, "attention_loss_weight must be >= 0"),
        ({"alpha": 0.0, "beta": 0.0}, "nothing to learn"),
        ({"kd_loss": "cosine"}, "kd_loss must be one of"),
        ({"hidden_loss": "l1"}, "hidden_loss must be one of"),
        ({"hidden_loss_weight": 1.0}, "hidden_loss is None"),
        ({"teacher_weights": [1.0, -1.0]}, "teacher_weights must be >= 0"),
        ({"layer_map": [2, -1]}, "layer_map entries"),
        ({"teacher_dtype": "bf16"}, "teacher_dtype must be one of .* got 'bf16'"),
    ],
)
def test_invalid_values_raise(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path, **kwargs)


def test_valid_config_keeps_values(tmp_path):
    config = make(
        tmp_path,
        temperature=4.0,
        alpha=0.9,
        beta=0.1,
        kd_loss="jsd",
        hidden_loss="mse",
        hidden_loss_weight=2.0,
    )
    assert (config.temperature, config.alpha, config.beta, config.kd_loss) == (4.0, 0.9, 0.1, "jsd")
    assert (config.hidden_loss, config.hidden_loss_weight) == ("mse", 2.0)


@pytest.mark.parametrize(
    ("kwargs", "dtype"),
    [
        ({}, None),
        ({"bf16": True}, torch.bfloat16),
        ({"bf16": True, "teacher_dtype": "float32"}, torch.float32),
        ({"teacher_dtype": "float16"}, torch.float16),
    ],
)
def test_teacher_dtype_follows_mixed_precision_unless_set(tmp_path, kwargs, dtype):
    assert make(tmp_path, use_cpu=True, **kwargs).teacher_torch_dtype == dtype
