"""``scripts/distill_lm.py`` end to end on a tiny Llama built in-process and a small text file."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from hf_distill.calibration import expected_calibration_error
from hf_distill.language_modeling import LMRecipeParser
from hf_distill.language_modeling.data import pack
from hf_distill.language_modeling.report import format_table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import distill_lm  # noqa: E402
from test_hub import hub  # noqa: E402,F401,F811  (the Hub-compatible server fixture)

WORDS = "the a of to and in we our you they is was will for on with that this people country work".split()


def corpus(n_docs: int = 40, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n_docs):
        length = int(torch.randint(20, 60, (1,), generator=g))
        # a little structure to learn: word i is often followed by word i + 1
        ids, word = [], int(torch.randint(0, len(WORDS), (1,), generator=g))
        for _ in range(length):
            ids.append(word)
            jump = torch.rand(1, generator=g).item() < 0.3
            word = int(torch.randint(0, len(WORDS), (1,), generator=g)) if jump else (word + 1) % len(WORDS)
        docs.append(" ".join(WORDS[i] for i in ids))
    return docs


def word_tokenizer(vocab: list[str]) -> PreTrainedTokenizerFast:
    table = {w: i for i, w in enumerate(["<eos>", "<unk>", *vocab])}
    tok = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>"
    )


def tiny_teacher(folder: Path, vocab: list[str] = WORDS, positions: int = 64) -> Path:
    tokenizer = word_tokenizer(vocab)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=positions,
            tie_word_embeddings=True,
            eos_token_id=0,
            pad_token_id=0,
            bos_token_id=None,
        )
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_text(path: Path, docs: list[str]) -> Path:
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    return path


def flags(tmp_path: Path, teacher: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "--config", str(ROOT / "recipes/offline/smollm2.yaml"),
        "--dataset_name", str(data),
        "--ood_dataset_name", str(data),
        "--teacher_model_name_or_path", str(teacher),
        "--student_num_layers", "2",
        "--block_size", "16",
        "--max_train_blocks", "16",
        "--max_eval_blocks", "4",
        "--max_steps", "4",
        "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2",
        "--top_k", "4",
        "--num_samples", "6",
        "--prompts", "the people", "we will",
        "--max_new_tokens", "3",
        "--cache_dir", str(tmp_path / "cache"),
        "--output_dir", str(output),
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    teacher, data = tiny_teacher(tmp / "teacher"), write_text(tmp / "docs.jsonl", corpus())
    summary = distill_lm.main(flags(tmp, teacher, data, tmp / "out"))
    return tmp, teacher, data, summary


def test_results_record_the_rate_and_its_schedule(finished_run):
    """What trained the rows, so that a later run set against them (benchmarks/bench_rskd_levers.py) trains alike."""
    tmp, _, _, _ = finished_run
    settings = json.loads((tmp / "out" / "results.json").read_text())["settings"]
    assert (settings["learning_rate"], settings["lr_scheduler_type"], settings["warmup_steps"]) == (
        1e-2,
        "linear",
        5,
    )


def test_results_hold_perplexities_of_teacher_and_every_student(finished_run):
    tmp, _, _, summary = finished_run
    saved = json.loads((tmp / "out" / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(summary["rows"]))
    trainings = [r["training"] for r in saved["rows"]]
    assert trainings == ["teacher", "CE only", "KD, live teacher", "KD, top-k cache", "KD, RS-KD cache"]
    for row in saved["rows"]:
        for split in ("validation", "ood"):
            m = row["metrics"][split]
            assert math.isclose(m["perplexity"], math.exp(m["loss"]), rel_tol=1e-9)
            assert m["tokens"] == 4 * 15  # 4 blocks of 16 tokens, 15 predicted each
            assert 0 <= m["ece"] <= 1
        assert len(row["samples"]) == 2 and row["forward_tokens_per_second"] > 0
    students = saved["rows"][1:]
    assert all(r["step_time_vs_ce"] > 0 for r in students)
    assert students[0]["step_time_vs_ce"] == 1.0
    # the caches' sizes: top-4 float16 values + uint16 ids; the recipe's RS-KD layout, 3 exact head tokens (8-bit
    # probabilities, their ids coded with the draws), a 1-byte count and 6 draws a token on average in one code:
    # more than the probabilities and count, fewer bytes than uint16 ids would take
    assert saved["cache_bytes_per_token"]["topk"] == pytest.approx(4 * 4, abs=1)
    assert 3 * 1 + 1 < saved["cache_bytes_per_token"]["sampled"] < 3 * 3 + 1 + 6 * 2
    assert saved["splits"]["validation"]["source"] == "carved from train"
    # each stage's seconds, as printed: checks, one teacher pass for both caches, the teacher's evaluation, students
    stages = saved["stage_seconds"]
    (caches,) = [name for name in stages if name.startswith("teacher caches in one pass (topk, ")]
    student_stages = {f"layers student, {t}" for t in trainings[1:]}
    assert set(stages) == {"checks, teacher and data", caches, "teacher evaluation", *student_stages}
    assert all(s >= 0 for s in stages.values()) and sum(stages.values()) <= saved["wall_seconds"]


def test_the_perplexity_is_the_token_weighted_mean_over_held_out_blocks(finished_run):
    tmp, teacher, data, summary = finished_run
    model = AutoModelForCausalLM.from_pretrained(tmp / "out" / "layers-live").eval()
    args, _ = LMRecipeParser().parse_recipe_and_args(flags(tmp, teacher, data, tmp / "out"))
    from hf_distill.language_modeling.data import load_corpus

    splits, _ = load_corpus(args)
    blocks = pack(splits["validation"], AutoTokenizer.from_pretrained(teacher), 16, max_blocks=4)
    nll, count, logits, labels = 0.0, 0, [], []
    with torch.no_grad():
        for ids in blocks["input_ids"]:  # one block at a time, by hand
            ids = torch.tensor([ids])
            logits.append(model(input_ids=ids).logits[0, :-1])
            labels.append(ids[0, 1:])
            log_p = torch.log_softmax(logits[-1], -1)
            nll -= log_p.gather(-1, ids[0, 1:, None]).sum().item()
            count += ids.shape[1] - 1
    row = next(r for r in summary["rows"] if r["output_dir"] == str(tmp / "out" / "layers-live"))
    assert row["metrics"]["validation"]["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    ece = expected_calibration_error(torch.cat(logits), torch.cat(labels))  # over the same tokens, in one go
    assert row["metrics"]["validation"]["ece"] == pytest.approx(ece, abs=1e-5)
    table = format_table(summary).splitlines()
    assert "| validation perplexity | validation ECE |" in table[0] and "| out-of-domain ECE |" in table[0]


def test_the_saved_student_loads_and_generates(finished_run):
    tmp, teacher, _, _ = finished_run
    folder = tmp / "out" / "layers-sampled"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 2
    inputs = tokenizer("the people", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    card = (folder / "README.md").read_text()
    assert "perplexity" in card and "| ece |" in card and "**the people**" in card
    ece_row = next(line for line in card.splitlines() if line.startswith("| ece |"))
    assert ece_row.endswith("| n/a (compare the values) |") and "%" not in ece_row  # values, no retention


def test_a_second_run_reuses_the_teacher_caches(finished_run):
    tmp, teacher, data, first = finished_run
    before = sorted(p.name for p in (tmp / "cache" / "teacher_logits").iterdir())
    assert len([n for n in before if n.endswith(".arrow")]) == 2  # the top-k and the RS-KD caches
    args = flags(
        tmp, teacher, data, tmp / "again", "--teacher_modes", "topk", "sampled", "--train_baseline", "false"
    )
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/distill_lm.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Teacher logits" not in result.stderr  # no teacher pass: both caches were hits
    assert sorted(p.name for p in (tmp / "cache" / "teacher_logits").iterdir()) == before
    again = json.loads((tmp / "again" / "results.json").read_text())
    rows = {r["training"]: r for r in again["rows"]}
    old = {r["training"]: r for r in first["rows"]}
    for training in ("KD, top-k cache", "KD, RS-KD cache"):  # the same cache, the same weights
        assert rows[training]["metrics"]["validation"]["loss"] == pytest.approx(
            old[training]["metrics"]["validation"]["loss"], rel=1e-6
        )


# ---- refused before anything is written ------------------------------------------------------------------


def refused(capsys, argv: list[str], output: Path) -> str:
    """Run the script's main through run_script: one error line, exit 2, output_dir untouched."""
    from hf_distill.cli import run_script

    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text('{"earlier": true}')
    with pytest.raises(SystemExit) as exit_info:
        run_script(distill_lm.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("distill_lm.py: error: ") and "Traceback" not in "\n".join(err)
    assert sorted(p.name for p in output.iterdir()) == ["results.json"]
    assert (output / "results.json").read_text() == '{"earlier": true}'
    return err[-1]


def test_a_missing_text_column_is_refused(tmp_path, capsys):
    teacher, data = tiny_teacher(tmp_path / "t"), write_text(tmp_path / "d.jsonl", corpus(10))
    out = tmp_path / "out"
    message = refused(capsys, flags(tmp_path, teacher, data, out, "--text_column", "body"), out)
    assert "no column 'body'" in message and "['text']" in message


def test_an_empty_corpus_is_refused(tmp_path, capsys):
    teacher, data = tiny_teacher(tmp_path / "t"), write_text(tmp_path / "d.jsonl", [""] * 10)
    out = tmp_path / "out"
    assert "holds no text" in refused(capsys, flags(tmp_path, teacher, data, out), out)


def test_a_block_size_beyond_the_teachers_positions_is_refused(tmp_path, capsys):
    teacher, data = tiny_teacher(tmp_path / "t"), write_text(tmp_path / "d.jsonl", corpus(10))
    out = tmp_path / "out"
    message = refused(capsys, flags(tmp_path, teacher, data, out, "--block_size", "65"), out)
    assert "block_size=65 is beyond the teacher's 64 positions" in message


def test_a_sample_head_not_below_the_vocabulary_is_refused(tmp_path, capsys):
    from transformers import AutoConfig

    teacher, data = tiny_teacher(tmp_path / "t"), write_text(tmp_path / "d.jsonl", corpus(10))
    vocab = AutoConfig.from_pretrained(teacher).vocab_size
    out = tmp_path / "out"
    message = refused(capsys, flags(tmp_path, teacher, data, out, "--sample_head", str(vocab)), out)
    assert f"sample_head must be below the teacher's vocabulary size {vocab}" in message
    assert f"got {vocab}." in message


def test_a_student_checkpoint_with_another_tokenizer_is_refused(tmp_path, capsys):
    teacher, data = tiny_teacher(tmp_path / "t"), write_text(tmp_path / "d.jsonl", corpus(10))
    other = tiny_teacher(tmp_path / "other", vocab=list(reversed(WORDS)))  # same size, other ids
    out = tmp_path / "out"
    argv = flags(
        tmp_path, teacher, data, out, "--students", "checkpoint", "--student_model_name_or_path", str(other)
    )
    assert "tokenizers have different vocabularies" in refused(capsys, argv, out)


# ---- publishing ------------------------------------------------------------------------------------------


def test_push_to_hub_publishes_the_distilled_student_best_on_validation(tmp_path, hub):  # noqa: F811
    from test_hub import TOKEN

    from hf_distill.language_modeling.report import best_distilled

    teacher, data = tiny_teacher(tmp_path / "t"), write_text(tmp_path / "d.jsonl", corpus())
    repo = "test-user/tiny-lm-student"
    summary = distill_lm.main(
        flags(tmp_path, teacher, data, tmp_path / "out", "--push_to_hub", "true", "--hub_model_id", repo)
        + ["--hub_token", TOKEN]
    )
    rows = summary["rows"]
    distilled = [r for r in rows if r["mode"] is not None]
    best = min(distilled, key=lambda r: r["metrics"]["validation"]["perplexity"])
    assert summary["published_candidate"] == best["output_dir"]
    downloaded = AutoModelForCausalLM.from_pretrained(repo, token=TOKEN)
    local = AutoModelForCausalLM.from_pretrained(best["output_dir"])
    for key, value in local.state_dict().items():
        assert torch.equal(downloaded.state_dict()[key], value), key
    # the choice is on validation, never on the out-of-domain split, and never the CE-only row
    from hf_distill.language_modeling.report import RunResult

    def row(mode, val, ood):
        metrics = {"validation": {"perplexity": val}, "ood": {"perplexity": ood}}
        return RunResult("s", "layers", mode or "CE only", mode, metrics, 1, 1.0, 1.0, [])

    results = [
        row(None, 1.0, 1.0),
        row("live", 5.0, 100.0),
        row("topk", 4.0, 900.0),
        row("sampled", 6.0, 2.0),
    ]
    assert best_distilled(results).mode == "topk"


def test_a_gguf_teacher_without_the_gguf_package_is_one_line(tmp_path, capsys, monkeypatch):
    teacher, data = tiny_teacher(tmp_path / "t"), write_text(tmp_path / "d.jsonl", corpus(10))
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError, as when not installed
    out = tmp_path / "out"
    message = refused(capsys, flags(tmp_path, teacher, data, out, "--teacher_gguf_file", "model.gguf"), out)
    assert "'model.gguf' needs the package `gguf>=0.10.0`: pip install 'gguf>=0.10.0'" in message
