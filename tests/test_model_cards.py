"""The published cards in model_cards/ parse with huggingface_hub and carry the Hub metadata a user relies on."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import ModelCard

CARDS = sorted((Path(__file__).resolve().parent.parent / "model_cards").glob("*/README.md"))


def test_there_are_published_cards():
    assert CARDS, "model_cards/ holds no rendered card"


@pytest.mark.parametrize("path", CARDS, ids=lambda p: p.parent.name)
def test_card_metadata(path):
    card = ModelCard.load(path)
    data = card.data
    assert "knowledge-distillation" in data.tags
    assert data.pipeline_tag == "text-classification" and data.library_name == "transformers"
    results = data.eval_results
    assert results and all(0.0 <= r.metric_value <= 1.0 for r in results)
    text = card.text
    for section in (
        "## Results",
        "## Teacher",
        "## Student initialisation",
        "## Distillation settings",
        "## Usage",
    ):
        assert section in text, section
    assert "Recipe: `recipes/offline/rotten_tomatoes.yaml`" in text
