"""The language-model recipes parse against the LM application's dataclasses, every value arriving typed."""

from __future__ import annotations

import pytest
import yaml
from test_recipes import LM_RECIPES

from hf_distill import DistillationConfig
from hf_distill.errors import InputError
from hf_distill.language_modeling import DistillLMArguments, LMRecipeParser


@pytest.mark.parametrize("path", LM_RECIPES, ids=lambda p: p.name)
def test_lm_recipe_parses_with_every_value(path):
    recipe = yaml.safe_load(path.read_text())
    script, args = LMRecipeParser().parse_recipe_and_args(["--config", str(path)])
    assert isinstance(script, DistillLMArguments) and isinstance(args, DistillationConfig)
    for key, value in recipe.items():
        if key == "report_to":
            continue  # TrainingArguments turns "none" into []
        got = getattr(script, key) if hasattr(script, key) else getattr(args, key)
        if isinstance(got, float) and not isinstance(value, bool):
            value = float(value)
        assert got == value, key
    assert set(script.teacher_modes) == {"live", "topk", "sampled"} and script.train_baseline


def test_a_classifier_key_is_refused_by_the_lm_parser(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dataset_name: offline:speeches\nlabel_column: label\n")
    with pytest.raises(InputError, match=r"unknown recipe keys \['label_column'\]"):
        LMRecipeParser().parse_recipe_and_args(["--config", str(recipe)])


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--block_size", "1", "block_size must be >= 2, got 1"),
        ("--num_samples", "300", "num_samples must be between 1 and 255, got 300"),
        ("--sample_head", "-1", "sample_head must be >= 0, got -1"),
        ("--sample_proposal_temperature", "0", "sample_proposal_temperature must be > 0 and finite"),
        ("--top_k", "0", "top_k must be >= 1, got 0"),
        ("--validation_size", "0", "validation_size must be a fraction"),
    ],
)
def test_out_of_range_settings_are_refused_at_parse_time_naming_the_key(flag, value, message):
    with pytest.raises(InputError, match=message):
        LMRecipeParser().parse_recipe_and_args([flag, value, "--output_dir", "unused"])


def test_an_unknown_teacher_mode_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        LMRecipeParser().parse_recipe_and_args(["--teacher_modes", "dense", "--output_dir", "unused"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'dense'" in capsys.readouterr().err
