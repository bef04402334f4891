"""Every recipe parses against the current dataclasses; the recipe parser's rules (defaults, overrides, errors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hf_distill import DistillationConfig
from hf_distill.data import GLUE_TASKS, TASKS
from hf_distill.script_args import DistillGlueArguments, RecipeParser, read_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TASK_RECIPES = sorted([*RECIPES.glob("glue/*.yaml"), *RECIPES.glob("offline/*.yaml")])
ACCELERATE_CONFIGS = sorted(RECIPES.glob("accelerate_configs/*.yaml"))


def parse(*args: str):
    return RecipeParser().parse_recipe_and_args(list(args))


def test_every_glue_task_has_a_recipe():
    assert {p.stem for p in RECIPES.glob("glue/*.yaml")} == set(GLUE_TASKS)
    assert list(RECIPES.glob("offline/*.yaml"))


@pytest.mark.parametrize("path", TASK_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_parses(path):
    recipe = read_recipe(path)  # unknown keys raise
    script, args = parse("--config", str(path))
    assert isinstance(script, DistillGlueArguments) and isinstance(args, DistillationConfig)
    for key, value in recipe.items():  # every value arrives, with the field's type
        got = getattr(script, key) if hasattr(script, key) else getattr(args, key)
        if key == "report_to":
            continue  # TrainingArguments turns "none" into []
        expected = type(got)(value) if isinstance(got, float | int) and not isinstance(got, bool) else value
        assert got == expected or str(got).endswith(str(value)), key
    assert script.task_name in TASKS
    if path.parent.name == "glue":
        assert script.task_name == path.stem
        assert script.teacher_model_name_or_path and "/" in script.teacher_model_name_or_path  # a Hub id


def test_offline_default_settings():
    script, args = parse("--config", str(RECIPES / "offline" / "rotten_tomatoes.yaml"))
    assert script.task_name == "rotten_tomatoes"
    assert script.teacher_model_name_or_path == "offline:all-MiniLM-L6-v2"
    assert "layers" in script.students and "compact" in script.students
    assert script.num_labelled is not None and script.transfer_set


def test_command_line_overrides_the_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("task_name: sst2\nlearning_rate: 5e-5\ntemperature: 3.0\nstudents: [layers, compact]\n")
    script, args = parse("--config", str(path), "--temperature", "4", "--students", "compact")
    assert args.temperature == 4.0 and script.students == ["compact"]
    assert args.learning_rate == 5e-5 and isinstance(args.learning_rate, float)  # YAML reads 5e-5 as a string
    assert script.task_name == "sst2"


def test_unknown_recipe_key_is_an_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("task_name: sst2\ntemprature: 3.0\n")
    with pytest.raises(ValueError, match=r"unknown recipe keys \['temprature'\]"):
        parse("--config", str(path))


def test_unknown_flag_is_an_error():
    with pytest.raises(ValueError, match="--temprature"):
        parse("--temprature", "3")


def test_recipe_must_be_a_mapping(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- task_name\n")
    with pytest.raises(ValueError, match="flat YAML mapping"):
        parse("--config", str(path))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--task_name", "sst-2"], "invalid choice"),
        (["--students", "tiny"], "students must be"),
        (["--students", "checkpoint"], "student_model_name_or_path"),
        (["--transfer_set", "layers"], "needs num_labelled"),
        (["--num_labelled", "10", "--transfer_set", "compact"], "must name students"),
        (["--num_labelled", "0"], "num_labelled must be >= 1"),
    ],
)
def test_bad_settings_say_what_to_fix(flags, message):
    with pytest.raises((ValueError, SystemExit)) as info:
        parse(*flags)
    if info.type is ValueError:
        assert message in str(info.value)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type in ("MULTI_GPU", "FSDP", "DEEPSPEED")
    assert {p.stem for p in ACCELERATE_CONFIGS} == {"ddp", "fsdp", "deepspeed"}
    raw = yaml.safe_load(path.read_text())
    if raw["distributed_type"] == "FSDP":
        assert raw["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # saved students load whole
    if raw["distributed_type"] == "DEEPSPEED":
        assert raw["deepspeed_config"]["zero3_save_16bit_model"] is True
