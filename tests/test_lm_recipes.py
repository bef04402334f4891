"""The language-model recipes parse against the LM application's dataclasses, every value arriving typed."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from test_recipes import LM_RECIPES

from hf_distill import DistillationConfig
from hf_distill.errors import InputError
from hf_distill.language_modeling import DATACLASSES, DistillLMArguments, LMRecipeParser

# The on-policy settings the trainer adds to DistillationConfig (#22), which the instruct recipe sets; until they
# are there, the recipe's other keys are still checked (test_the_instruct_recipe_stages_and_prompts).
ON_POLICY_KEYS = {
    "lmbda",
    "seq_kd",
    "jsd_mixture",
    "rollout_max_new_tokens",
    "rollout_temperature",
    "rollout_top_p",
    "rollout_samples",
}
INSTRUCT_RECIPE = next(p for p in LM_RECIPES if p.name == "smollm2_instruct.yaml")


def _not_fields(recipe: dict) -> list[str]:
    return sorted(set(recipe) - {f.name for d in DATACLASSES for f in dataclasses.fields(d)})


@pytest.mark.parametrize("path", LM_RECIPES, ids=lambda p: p.name)
def test_lm_recipe_parses_with_every_value(path):
    recipe = yaml.safe_load(path.read_text())
    missing = _not_fields(recipe)
    assert set(missing) <= ON_POLICY_KEYS, missing  # any other key is a typo or a drifted field
    if missing:
        pytest.skip(
            f"DistillationConfig has no {missing} yet: the trainer's on-policy settings are not merged"
        )
    script, args = LMRecipeParser().parse_recipe_and_args(["--config", str(path)])
    assert isinstance(script, DistillLMArguments) and isinstance(args, DistillationConfig)
    for key, value in recipe.items():
        if key == "report_to":
            continue  # TrainingArguments turns "none" into []
        got = getattr(script, key) if hasattr(script, key) else getattr(args, key)
        if isinstance(got, float) and not isinstance(value, bool):
            value = float(value)
        assert got == value, key
    if path.name == "smollm2.yaml":
        assert set(script.teacher_modes) == {"live", "topk", "sampled"} and script.train_baseline


def test_the_instruct_recipe_stages_and_prompts():
    recipe = yaml.safe_load(INSTRUCT_RECIPE.read_text())
    own = {f.name for f in dataclasses.fields(DistillLMArguments)}
    script = DistillLMArguments(**{k: v for k, v in recipe.items() if k in own})  # its checks run
    assert script.instruct and script.dataset_name == "offline:instruct_prompts"
    assert (
        script.teacher_modes == ["live"] and script.train_baseline
    )  # the on-policy run and the CE (SFT) run
    assert (script.off_policy_steps, script.on_policy_steps) == (40, 30)
    assert (script.num_train_prompts, script.num_eval_prompts) == (128, 32)
    # the two-stage settings of the issue: all of stage 2 on-policy, TRL GKD's mixture and sampling temperature, and
    # its loss at T = 1 (TRL 1.16's GKDTrainer never passes its temperature to the loss)
    assert recipe["lmbda"] == 1.0 and recipe["jsd_mixture"] == 0.5 and recipe["kd_loss"] == "jsd"
    assert (recipe["temperature"], recipe["rollout_temperature"]) == (1.0, 0.9)
    assert recipe["rollout_max_new_tokens"] == 64 and (recipe["alpha"], recipe["beta"]) == (1.0, 0.0)
    assert "max_steps" not in recipe  # each stage sets its own: off_policy_steps, then on_policy_steps


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
        (
            "--sample_counts false --sample_proposal_temperature 2",
            None,
            "sample_counts=false stores the draws themselves .* drop sample_proposal_temperature=2",
        ),
    ],
)
def test_out_of_range_settings_are_refused_at_parse_time_naming_the_key(flag, value, message):
    with pytest.raises(InputError, match=message):
        flags = [flag, value] if value is not None else flag.split()
        LMRecipeParser().parse_recipe_and_args([*flags, "--output_dir", "unused"])


def test_an_unknown_teacher_mode_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        LMRecipeParser().parse_recipe_and_args(["--teacher_modes", "dense", "--output_dir", "unused"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'dense'" in capsys.readouterr().err


def test_the_sample_scheme_reaches_the_rs_kd_cache_format_and_a_bad_one_is_refused(tmp_path):
    from hf_distill.language_modeling.run import cache_formats

    script, args = LMRecipeParser().parse_recipe_and_args(
        ["--sample_scheme", "systematic", "--teacher_modes", "sampled", "--output_dir", "unused"]
    )[:2]
    assert cache_formats(script, args)["sampled"]["sample_scheme"] == "systematic"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("dataset_name: offline:speeches\nsample_scheme: sobol\n")
    with pytest.raises(InputError, match=r"recipe key 'sample_scheme' has 'sobol'.*one of \['iid', 'systematic'\]"):
        LMRecipeParser().parse_recipe_and_args(["--config", str(recipe), "--output_dir", "unused"])


def test_a_quantized_head_without_a_head_is_refused_at_parse_time():
    with pytest.raises(InputError, match="^sample_head_quantized stores the exact head's .* but sample_head is 0"):
        LMRecipeParser().parse_recipe_and_args(["--sample_head_quantized", "true", "--output_dir", "unused"])
    script, args = LMRecipeParser().parse_recipe_and_args(
        ["--sample_head", "3", "--sample_head_quantized", "true", "--output_dir", "unused"]
    )[:2]
    from hf_distill.language_modeling.run import cache_formats

    assert cache_formats(script, args)["sampled"]["sample_head_quantized"] is True


def test_an_adaptive_allocation_reaches_the_cache_format_and_needs_the_draws_themselves():
    with pytest.raises(InputError, match=r"^sample_allocation: adaptive stores each token's draws .* set sample_counts to false"):
        LMRecipeParser().parse_recipe_and_args(["--sample_allocation", "adaptive", "--output_dir", "unused"])
    script, args = LMRecipeParser().parse_recipe_and_args(
        ["--sample_allocation", "adaptive", "--sample_counts", "false", "--output_dir", "unused"]
    )[:2]
    from hf_distill.language_modeling.run import cache_formats

    assert cache_formats(script, args)["sampled"]["sample_allocation"] == "adaptive"


def test_the_draws_seed_is_the_runs_unless_sample_seed_is_given():
    from hf_distill.language_modeling.run import cache_formats

    script, args = LMRecipeParser().parse_recipe_and_args(["--seed", "48", "--output_dir", "unused"])[:2]
    assert cache_formats(script, args)["sampled"]["sample_seed"] == 48
    script, args = LMRecipeParser().parse_recipe_and_args(
        ["--seed", "48", "--sample_seed", "7", "--output_dir", "unused"]
    )[:2]
    assert (cache_formats(script, args)["sampled"]["sample_seed"], args.seed) == (7, 48)
