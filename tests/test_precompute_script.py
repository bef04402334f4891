"""scripts/precompute_teacher_logits.py on a causal LM: the RS-KD cache, the top-k and RS-KD caches from one teacher
pass, and the cache flags it refuses (one error line, exit code 2, nothing written)."""

from __future__ import annotations

import json

import pytest
from conftest import ForwardCounter, random_classification_dataset, tiny_bert
from lm_fixtures import VOCAB, tiny_llama
from test_cli import ROOT, _precompute, _refused

from hf_distill.config import DistillationConfig
from hf_distill.teacher_cache import load_teacher_cache, read_provenance
from hf_distill.teachers import load_teacher

PROG = "precompute_teacher_logits.py"
RSKD_COLUMNS = ("teacher_head_ids", "teacher_head_probs", "teacher_sample_ids", "teacher_sample_counts")


@pytest.fixture
def teacher_flags(tmp_path, tokenizer):
    """``flags(kind)``: the flags naming a saved teacher and a saved tokenized dataset of 12 rows, built when asked
    for: a tiny causal LM ("lm"), a tiny sequence classifier ("classifier"), or the GLUE recipe, whose teacher is
    a sequence classifier ("recipe")."""
    rows = random_classification_dataset(12, seed=3)
    builders = {
        "lm": (lambda: tiny_llama(seed=1), rows.select_columns(["input_ids", "attention_mask"])),
        "classifier": (lambda: tiny_bert(seed=1), rows),
    }

    def flags(kind: str) -> list[str]:
        if kind == "recipe":
            return ["--config", str(ROOT / "recipes/glue/sst2.yaml"), "--cache_dir", str(tmp_path / "cache")]
        build, data = builders[kind]
        build().save_pretrained(tmp_path / kind)
        tokenizer.save_pretrained(tmp_path / kind)
        data.save_to_disk(str(tmp_path / f"{kind}_data"))
        task = ["--task", "causal_lm"] if kind == "lm" else []
        return [
            "--teacher_model_name_or_path",
            str(tmp_path / kind),
            *task,
            "--dataset_path",
            str(tmp_path / f"{kind}_data"),
        ]

    return flags


def _count_forwards(monkeypatch, script) -> list[ForwardCounter]:
    """Each teacher the script loads from then on counts its forward passes, one counter per load."""
    counters = []

    def counted(path, task):
        teacher = load_teacher(path, task)
        counters.append(ForwardCounter(teacher))
        return teacher

    monkeypatch.setattr(script, "load_teacher", counted)
    return counters


def _printed(out: str) -> list[dict]:
    """The JSON summaries the script printed, in order."""
    decoder, found, at = json.JSONDecoder(), [], out.find("{")
    while at >= 0:
        summary, end = decoder.raw_decode(out, at)
        found.append(summary)
        at = out.find("{", end)
    return found


def test_rskd_cache_with_an_exact_head_drawn_at_the_runs_temperature_and_seed(
    teacher_flags, tmp_path, capsys
):
    argv = [*teacher_flags("lm"), "--logits_dir", str(tmp_path / "rskd"), "--num_samples", "4", "--sample_head", "2",
            "--temperature", "1.5", "--seed", "7"]  # fmt: skip
    [meta] = _precompute().main(argv)
    provenance = read_provenance(meta)
    assert provenance["sampling"] == {"num_samples": 4, "temperature": 1.5, "seed": 7, "head": 2}
    assert provenance["top_k"] is None  # the RS-KD cache alone, no top-k beside it
    assert list((tmp_path / "rskd").glob("*.json")) == [meta]
    cache = load_teacher_cache(tmp_path / "rskd")
    assert [c for c in cache.column_names if c.startswith("teacher_")] == list(RSKD_COLUMNS)
    for row in cache:  # per token: 2 head ids and probabilities, 4 draw slots (distinct ids and their counts)
        tokens = len(row["input_ids"])
        for name, width in zip(RSKD_COLUMNS, (2, 2, 4, 4), strict=True):
            assert [len(values) for values in row[name]] == [width] * tokens, name
        for head, ids, counts in zip(
            row["teacher_head_ids"], row["teacher_sample_ids"], row["teacher_sample_counts"], strict=True
        ):
            assert sum(counts) == 4  # every draw counted once
            assert not set(head) & {i for i, c in zip(ids, counts, strict=True) if c}  # drawn from the tail
    [summary] = _printed(capsys.readouterr().out)
    assert summary["key"] == provenance["key"]
    assert summary["sampling"] == {"num_samples": 4, "head": 2, "temperature": 1.5, "seed": 7,
                                   "proposal_temperature": 1.0, "counts": True}  # fmt: skip
    assert summary["bytes_per_token"] == provenance["bytes_per_token"] > 0


def test_top_k_and_rskd_caches_from_one_teacher_pass(teacher_flags, tmp_path, monkeypatch, capsys):
    script = _precompute()
    counters = _count_forwards(monkeypatch, script)
    lm = teacher_flags("lm")

    def run(folder: str, *flags: str):
        """The script on the LM, writing to tmp_path / folder; 32 tokens a forward: several forwards a pass."""
        return script.main([*lm, "--max_batch_tokens", "32", "--logits_dir", str(tmp_path / folder), *flags])

    [alone] = run("alone", "--top_k", "3")
    capsys.readouterr()
    both = run("both", "--top_k", "3", "--num_samples", "4")
    one_pass = counters[0].calls
    assert len(counters) == 2 and one_pass > 1
    assert counters[1].calls == one_pass  # two caches, the teacher run once
    topk, sampled = (read_provenance(meta) for meta in both)
    assert sorted(both) == sorted((tmp_path / "both").glob("*.json"))
    assert (topk["top_k"], topk["sampling"]) == (3, None) and topk["key"] == read_provenance(alone)["key"]
    assert sampled["top_k"] is None
    assert sampled["sampling"] == {  # the run's defaults: the trainer's temperature check passes
        "num_samples": 4,
        "temperature": DistillationConfig.temperature,
        "seed": DistillationConfig.seed,
    }
    column = "teacher_topk_values"
    assert load_teacher_cache(both[0])[column] == load_teacher_cache(alone)[column]
    assert set(RSKD_COLUMNS[2:]) <= set(load_teacher_cache(both[1]).column_names)
    out = capsys.readouterr().out
    assert [s["key"] for s in _printed(out)] == [topk["key"], sampled["key"]]
    assert "2 caches from one teacher pass" in out


REFUSED = [
    ("classifier", ["--num_samples", "4"], "--num_samples: masked and causal LM teachers only"),
    ("recipe", ["--num_samples", "4"], "a sequence_classification teacher's cache holds its dense logits"),
    ("recipe", ["--top_k", "3"], "--top_k: masked and causal LM teachers only"),
    ("lm", ["--sample_head", "2"], "--sample_head: settings of the RS-KD draws, which need --num_samples"),
    (
        "lm",
        ["--top_k", "3", "--sample_temperature", "2", "--sample_seed", "1"],
        "--sample_temperature, --sample_seed: settings of the RS-KD draws",
    ),
    ("lm", ["--num_samples", "0"], "num_samples must be between 1 and 255"),
    ("lm", ["--num_samples", "256", "--top_k", "3"], "num_samples must be between 1 and 255"),
    (
        "lm",
        ["--num_samples", "4", "--sample_head", str(VOCAB)],
        f"below the vocabulary size {VOCAB}, got {VOCAB}",
    ),
    (
        "lm",
        ["--num_samples", "4", "--sample_proposal_temperature", "0"],
        "sample_proposal_temperature must be > 0",
    ),
    ("lm", ["--num_samples", "4", "--sample_temperature", "-1"], "sampling temperature must be > 0"),
    ("lm", ["--sample_counts", "false"], "--sample_counts: settings of the RS-KD draws"),
    (
        "lm",
        ["--num_samples", "4", "--sample_counts", "false", "--sample_proposal_temperature", "2"],
        "--sample_counts false stores the draws themselves",
    ),
]


@pytest.mark.parametrize(("teacher", "flags", "message"), REFUSED)
def test_bad_cache_flags_are_refused_in_one_line_and_write_nothing(
    teacher_flags, tmp_path, capsys, teacher, flags, message
):
    logits = tmp_path / "logits"
    argv = [*teacher_flags(teacher), *flags]
    argv += [] if teacher == "recipe" else ["--logits_dir", str(logits)]
    assert message in _refused(_precompute().main, argv, capsys, PROG)
    assert not logits.exists() and not (tmp_path / "cache").exists()  # nothing fine-tuned or cached
