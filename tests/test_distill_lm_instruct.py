"""``scripts/distill_lm.py`` with instruction data (``instruct: true``), end to end on a tiny chat Llama: the two
stages, the three regimes at equal steps, the held-out metrics, the rollouts written, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from instruct_fixtures import WORDS, chat_tokenizer, tiny_llama
from test_distill_lm import ROOT, distill_lm, refused

REGIMES = ["teacher", "off-policy (stage 1)", "on-policy", "off-policy", "CE"]


def chat_teacher(folder: Path, *, template: bool = True, reversed_vocab: bool = False) -> Path:
    tokenizer = chat_tokenizer(with_template=template)
    if reversed_vocab:  # the same tokens with other ids
        from instruct_fixtures import SPECIAL
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        table = {w: i for i, w in enumerate(SPECIAL + list(reversed(WORDS)))}
        tok = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<pad>", bos_token="<bos>"
        )
        tokenizer.chat_template = chat_tokenizer().chat_template
    model = tiny_llama(0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prompts_file(path: Path, n: int = 12, words: int = 4, column: str = "prompt") -> Path:
    rows = []
    for i in range(n):
        text = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(words))
        row = {"messages": [{"role": "user", "content": text}]} if column == "messages" else {column: text}
        rows.append(row)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def flags(teacher: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--config", str(ROOT / "recipes/offline/smollm2_instruct.yaml"),
        "--dataset_name", str(data),
        "--validation_size", "0.25",
        "--teacher_model_name_or_path", str(teacher),
        "--student_num_layers", "1",
        "--off_policy_steps", "2",
        "--on_policy_steps", "2",
        "--rollout_max_new_tokens", "4",
        "--per_device_train_batch_size", "4",
        "--max_prompt_length", "24",
        "--completion_batch_size", "4",
        "--rollout_samples", "3",
        "--learning_rate", "1e-2",
        "--cache_dir", str(output.parent / "cache"),
        "--output_dir", str(output),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("instruct")
    teacher, data = chat_teacher(tmp / "teacher"), prompts_file(tmp / "prompts.jsonl", column="messages")
    summary = distill_lm.main(flags(teacher, data, tmp / "out"))
    return tmp, summary


def test_every_regime_takes_as_many_steps_and_has_the_held_out_metrics(finished):
    tmp, summary = finished
    saved = json.loads((tmp / "out" / "results.json").read_text())
    assert [r["training"] for r in saved["rows"]] == REGIMES
    assert [r["steps"] for r in saved["rows"]] == [0, 2, 4, 4, 4]
    teacher, *students = saved["rows"]
    assert teacher["metrics"]["validation"]["reverse_kl"] == pytest.approx(0.0, abs=1e-5)
    assert teacher["metrics"]["validation"]["rouge_l"] == pytest.approx(1.0)
    for row in students:
        m = row["metrics"]["validation"]
        assert m["reverse_kl"] > 0 and m["forward_kl"] > 0 and 0 <= m["rouge_l"] <= 1
        assert m["reverse_kl_tokens"] > 0 and m["forward_kl_tokens"] > 0
        assert len(row["samples"]) == 3 and set(row["samples"][0]) == {"prompt", "teacher", "student"}
    on_policy = next(r for r in students if r["training"] == "on-policy")
    assert on_policy["rollouts"]["student_completions"] == 2 * 4  # stage 2: every step, 4 prompts each
    off = next(r for r in students if r["training"] == "off-policy")
    assert off["rollouts"]["student_completions"] == 0
    assert set(saved["teacher_completions_truncated"]) == {"train", "validation"}
    assert "stage 2 on-policy" in " ".join(saved["stage_seconds"])


def test_rollouts_and_the_teachers_completions_are_written_for_tracing(finished):
    tmp, _ = finished
    rollouts = [
        json.loads(x) for x in (tmp / "out" / "layers-on-policy" / "rollouts.jsonl").read_text().splitlines()
    ]
    assert len(rollouts) == 3 and {r["written_by"] for r in rollouts} == {"student"}
    teacher = [json.loads(x) for x in (tmp / "out" / "teacher_completions.jsonl").read_text().splitlines()]
    assert teacher and {r["written_by"] for r in teacher} == {"teacher"}
    assert not (tmp / "out" / "layers-off-policy" / "rollouts.jsonl").exists()
    assert (tmp / "out" / "results.png").stat().st_size > 0
    for regime in ("on-policy", "off-policy"):  # the stage-2 students' cards, with the held-out metrics
        card = (tmp / "out" / f"layers-{regime}" / "README.md").read_text()
        assert "reverse_kl" in card and "rouge_l" in card


def test_the_table_names_the_regimes(finished):
    from hf_distill.language_modeling.report import format_table

    table = format_table(finished[1])
    assert "held-out reverse KL" in table and "| on-policy |" in table and "| CE |" in table


def test_data_without_prompt_or_messages_is_refused(tmp_path, capsys):
    teacher = chat_teacher(tmp_path / "t")
    data = prompts_file(tmp_path / "d.jsonl", column="text")
    out = tmp_path / "out"
    message = refused(capsys, flags(teacher, data, out), out)
    assert "'prompt'" in message and "'messages'" in message


def test_messages_with_a_tokenizer_without_chat_template_are_refused(tmp_path, capsys):
    teacher = chat_teacher(tmp_path / "t", template=False)
    data = prompts_file(tmp_path / "d.jsonl", column="messages")
    out = tmp_path / "out"
    assert "chat template" in refused(capsys, flags(teacher, data, out), out)


def test_a_prompt_longer_than_the_positions_is_refused(tmp_path, capsys):
    teacher = chat_teacher(tmp_path / "t")
    data = prompts_file(tmp_path / "d.jsonl", words=80, column="messages")  # beyond 64 positions
    out = tmp_path / "out"
    message = refused(capsys, flags(teacher, data, out, "--max_prompt_length", "200"), out)
    assert "positions" in message


def test_a_student_with_another_tokenizer_is_refused_naming_cross_tokenizer_kd(tmp_path, capsys):
    teacher, other = chat_teacher(tmp_path / "t"), chat_teacher(tmp_path / "o", reversed_vocab=True)
    data = prompts_file(tmp_path / "d.jsonl", column="messages")
    out = tmp_path / "out"
    argv = flags(teacher, data, out, "--students", "checkpoint", "--student_model_name_or_path", str(other))
    assert "cross-tokenizer KD is not supported yet" in refused(capsys, argv, out)


def test_the_teacher_row_holds_what_evaluating_the_teacher_finds(finished, tmp_path):
    """The application writes the teacher's row by definition (no generation); ``evaluate`` on the teacher itself,
    against its own cached greedy completions, finds the same values and samples (SmolLM2's evaluated teacher row
    was exactly 0, 0 and 1 in the offline default's seeds 42 and 43, before it was stated instead)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_distill.instruction_data import tokenize_instruction_dataset
    from hf_distill.language_modeling.instruct_run import evaluate, teacher_row
    from hf_distill.teacher_completions import teacher_completions

    tmp, _ = finished
    saved = json.loads((tmp / "out" / "results.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tmp / "teacher").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp / "teacher")
    # the fixture's end-of-turn token is a plain word; as in real chat tokenizers (SmolLM2's <|im_end|>), make it
    # special, so that decoding drops it from the cached completion as from the greedy one (no new id)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<end>"]})
    prompts = Dataset.from_list([json.loads(x) for x in (tmp / "prompts.jsonl").read_text().splitlines()][:6])
    done = teacher_completions(model, tokenizer, prompts, max_new_tokens=4, cache_dir=None, batch_size=4)
    held_out, _ = tokenize_instruction_dataset(
        done.dataset.remove_columns(["completion_truncated"]), tokenizer, 48, 4
    )
    found, samples = evaluate(model, model, held_out, tokenizer, max_new_tokens=4, batch_size=4, seed=0)
    row = teacher_row("teacher", model, held_out, tokenizer)
    stated = row.metrics["validation"]
    assert found["reverse_kl_tokens"] > 0 and found["forward_kl_tokens"] > 0  # it did generate and score
    for key in ("reverse_kl", "forward_kl", "rouge_l"):
        assert found[key] == pytest.approx(stated[key], abs=1e-5), key
    assert samples == row.samples
    assert saved["rows"][0]["metrics"]["validation"] == stated  # the run wrote the stated row
    assert len(saved["rows"][0]["samples"]) == 3
