"""Every recipe parses against the current dataclasses; the recipe parser's rules (defaults, overrides, errors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hf_distill import DistillationConfig
from hf_distill.text_classification import DistillTextArguments, RecipeParser
from hf_distill.text_classification.arguments import read_recipe
from hf_distill.text_classification.metrics import GLUE_MAIN_METRICS, load_glue_metric

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# The language-model application's recipes (tests/test_lm_recipes.py parses them with its own parser).
LM_RECIPES = [RECIPES / "offline" / "smollm2.yaml", RECIPES / "offline" / "smollm2_instruct.yaml"]
TASK_RECIPES = sorted(
    p
    for p in [*RECIPES.glob("glue/*.yaml"), *RECIPES.glob("offline/*.yaml"), *RECIPES.glob("custom/*.yaml")]
    if p not in LM_RECIPES
)
# GLUE task -> its text columns and number of labels (1: regression), as nyu-mll/glue stores them.
GLUE = {
    "cola": (["sentence"], 2),
    "sst2": (["sentence"], 2),
    "mrpc": (["sentence1", "sentence2"], 2),
    "stsb": (["sentence1", "sentence2"], 1),
    "qqp": (["question1", "question2"], 2),
    "mnli": (["premise", "hypothesis"], 3),
    "qnli": (["question", "sentence"], 2),
    "rte": (["sentence1", "sentence2"], 2),
    "wnli": (["sentence1", "sentence2"], 2),
}
ACCELERATE_CONFIGS = sorted(RECIPES.glob("accelerate_configs/*.yaml"))


def parse(*args: str):
    return RecipeParser().parse_recipe_and_args(list(args))


def test_every_glue_task_has_a_recipe():
    assert {p.stem for p in RECIPES.glob("glue/*.yaml")} == set(GLUE)
    assert list(RECIPES.glob("offline/*.yaml")) and list(RECIPES.glob("custom/*.yaml"))


@pytest.mark.parametrize("task", sorted(GLUE))
def test_glue_recipes_are_presets_of_the_data_keys(task):
    script, _ = parse("--config", str(RECIPES / "glue" / f"{task}.yaml"))
    assert (script.dataset_name, script.dataset_config_name, script.metric) == ("nyu-mll/glue", task, "glue")
    assert script.text_columns == GLUE[task][0] and script.label_column == "label"
    # GLUE's test labels are hidden: validation is the held-out split (MNLI: matched, and mismatched as test)
    if task == "mnli":
        assert (script.validation_split, script.test_split) == ("validation_matched", "validation_mismatched")
    else:
        assert (script.validation_split, script.test_split) == ("validation", "none")
    main = GLUE_MAIN_METRICS.get(task, "accuracy")
    assert main in load_glue_metric(task).compute(predictions=[1, 0, 1], references=[1, 0, 0])


@pytest.mark.parametrize("path", TASK_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_parses(path):
    recipe = read_recipe(path)  # unknown keys raise
    script, args = parse("--config", str(path))
    assert isinstance(script, DistillTextArguments) and isinstance(args, DistillationConfig)
    for key, value in recipe.items():  # every value arrives, with the field's type
        got = getattr(script, key) if hasattr(script, key) else getattr(args, key)
        if key == "report_to":
            continue  # TrainingArguments turns "none" into []
        expected = type(got)(value) if isinstance(got, float | int) and not isinstance(got, bool) else value
        got = getattr(got, "value", got)  # TrainingArguments turns strategy names into enums
        assert got == expected, key
    if path.parent.name == "glue":
        assert script.teacher_model_name_or_path and "/" in script.teacher_model_name_or_path  # a Hub id


def test_offline_default_settings():
    script, args = parse("--config", str(RECIPES / "offline" / "rotten_tomatoes.yaml"))
    assert script.dataset_name == "offline:rotten_tomatoes"
    assert (script.validation_split, script.test_split) == ("validation", "test")
    assert script.teacher_model_name_or_path == "offline:all-MiniLM-L6-v2"
    assert "layers" in script.students and "compact" in script.students
    assert script.num_labelled is not None and script.transfer_set


def test_command_line_overrides_the_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "dataset_name: data.csv\nlearning_rate: 5e-5\ntemperature: 3.0\nstudents: [layers, compact]\n"
    )
    script, args = parse("--config", str(path), "--temperature", "4", "--students", "compact")
    assert args.temperature == 4.0 and script.students == ["compact"]
    assert args.learning_rate == 5e-5 and isinstance(args.learning_rate, float)  # YAML reads 5e-5 as a string
    assert script.dataset_name == "data.csv"


def test_unknown_recipe_key_is_an_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("dataset_name: data.csv\ntemprature: 3.0\n")
    with pytest.raises(ValueError, match=r"unknown recipe keys \['temprature'\]"):
        parse("--config", str(path))


def test_unknown_flag_is_an_error():
    with pytest.raises(ValueError, match="--temprature"):
        parse("--temprature", "3")


def test_recipe_must_be_a_mapping(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- dataset_name\n")
    with pytest.raises(ValueError, match="flat YAML mapping"):
        parse("--config", str(path))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--metric", "f2"], "invalid choice"),
        (["--text_columns", "a", "b", "c"], "one column (single texts) or two"),
        (["--test_size", "1.5"], "fraction in [0, 1) or a whole number"),
        (["--metric", "glue"], "needs dataset_config_name"),
        (["--teacher_seeds", "1"], "two or more distinct seeds"),
        (["--teacher_seeds", "1", "1"], "two or more distinct seeds"),
        (["--teacher_seeds", "1", "2", "--teacher_seed", "3"], "not both"),
        (["--students", "tiny"], "students must be"),
        (["--students", "checkpoint"], "student_model_name_or_path"),
        (["--transfer_set", "layers"], "needs num_labelled"),
        (["--num_labelled", "10", "--transfer_set", "compcat"], "must name student kinds"),
        (["--num_labelled", "0"], "num_labelled must be >= 1"),
    ],
)
def test_bad_settings_say_what_to_fix(flags, message, capsys):
    with pytest.raises((ValueError, SystemExit)) as info:
        parse(*flags)
    # argparse's refusals (SystemExit) print their message on stderr
    said = str(info.value) if issubclass(info.type, ValueError) else capsys.readouterr().err
    assert message in said


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type in ("MULTI_GPU", "FSDP", "DEEPSPEED")
    assert {p.stem for p in ACCELERATE_CONFIGS} == {"ddp", "fsdp", "deepspeed"}
    raw = yaml.safe_load(path.read_text())
    if raw["distributed_type"] == "FSDP":
        assert raw["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # saved students load whole
    if raw["distributed_type"] == "FSDP":
        assert raw["fsdp_config"]["fsdp_version"] == 2  # fully_shard: hf_distill.sharding reads its DTensors
    if raw["distributed_type"] == "DEEPSPEED":
        assert raw["deepspeed_config"]["zero3_save_16bit_model"] is True
        assert raw["deepspeed_config"]["zero_stage"] == 3


def test_cpu_zero3_config_loads():
    from accelerate.commands.config.config_args import ClusterConfig

    path = Path(__file__).parent / "zero3_cpu.yaml"
    config = ClusterConfig.from_yaml_file(str(path))
    assert (config.distributed_type, config.use_cpu, config.mixed_precision) == ("DEEPSPEED", True, "no")
    assert config.deepspeed_config["zero_stage"] == 3
