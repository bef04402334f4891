"""What the packaged metric modules (``classification/``, ``glue/``) share: their ``MetricInfo`` and formulas.

``evaluate.load`` copies a metric script alone into its cache, so the scripts import this module from the
installed package (to ``evaluate`` a library import, checked importable at load). They ship inside
``hf_distill``, so it is always there.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np


def inputs_description(float_config: str) -> str:
    """What ``compute`` takes and returns, for a metric whose configuration ``float_config`` scores regression."""
    return f"""
Args:
    predictions: predicted class ids (int), or predicted scores (float) for {float_config}.
    references: gold class ids (int), or gold scores (float) for {float_config}.
Returns: a dict of the configuration's metrics (see the module docstring).
"""


def metric_info(
    name: str,
    config_name: str,
    configs: tuple[str, ...],
    *,
    float_config: str,
    description: str,
    citation: str = "",
) -> evaluate.MetricInfo:
    """The ``MetricInfo`` of configuration ``config_name`` of the ``name`` metric: int64 class ids as
    predictions and references, float32 scores for ``float_config`` (the regression one), inputs described
    by :func:`inputs_description`. An unknown configuration raises ``KeyError`` with the known ones."""
    if config_name not in configs:
        raise KeyError(
            f"Unknown {name} metric configuration {config_name!r}; expected one of {list(configs)}."
        )
    dtype = "float32" if config_name == float_config else "int64"
    return evaluate.MetricInfo(
        description=description,
        citation=citation,
        inputs_description=inputs_description(float_config),
        features=datasets.Features(
            {"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}
        ),
        codebase_urls=[],
        reference_urls=[],
        format="numpy",
    )


def accuracy(predictions, references) -> float:
    """The fraction of predictions equal to their reference."""
    return float((np.asarray(predictions) == np.asarray(references)).mean())


def pearson_spearman(predictions, references) -> dict[str, float]:
    """``pearson`` and ``spearmanr`` correlations of predicted and gold scores (scipy, imported here only)."""
    from scipy.stats import pearsonr, spearmanr

    return {
        "pearson": float(pearsonr(predictions, references)[0]),
        "spearmanr": float(spearmanr(predictions, references)[0]),
    }
