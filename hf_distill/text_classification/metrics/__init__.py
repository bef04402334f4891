"""Task metrics as local ``evaluate`` modules, loaded by path (no Hub needed).

- ``classification/``: accuracy and macro-F1 (``single_label``), Pearson and Spearman (``regression``);
- ``glue/``: GLUE's own metric, one configuration per task (``sst2``, ``mnli``, ``cola``, ``stsb``, ...);
- ``shared.py``: what both share (their ``MetricInfo``, accuracy, Pearson and Spearman), imported by them.
"""

from __future__ import annotations

from pathlib import Path

import evaluate

GLUE_METRIC_PATH = str(Path(__file__).parent / "glue" / "glue.py")
CLASSIFICATION_METRIC_PATH = str(Path(__file__).parent / "classification" / "classification.py")
# The metric a GLUE task reports first (as in the GLUE leaderboard); accuracy for the others.
GLUE_MAIN_METRICS = {"cola": "matthews_correlation", "mrpc": "f1", "qqp": "f1", "stsb": "pearson"}


def load_glue_metric(config_name: str, **kwargs) -> evaluate.EvaluationModule:
    """The GLUE metric of ``config_name`` (``sst2``, ``mnli``, ``cola``, ``stsb``, ...) from the packaged module."""
    return evaluate.load(GLUE_METRIC_PATH, config_name, **kwargs)


def load_metric(metric: str, config: str | None, is_regression: bool, **kwargs) -> evaluate.EvaluationModule:
    """The metric module of a task: GLUE's for ``metric="glue"`` (configuration ``config``), else
    accuracy and macro-F1, or Pearson and Spearman for regression."""
    if metric == "glue":
        return load_glue_metric(config, **kwargs)
    return evaluate.load(
        CLASSIFICATION_METRIC_PATH, "regression" if is_regression else "single_label", **kwargs
    )


def main_metric(metric: str, config: str | None, is_regression: bool) -> str:
    """The metric reported first: GLUE's main metric of ``config``, else ``pearson`` or ``accuracy``."""
    if metric == "glue":
        return GLUE_MAIN_METRICS.get(config, "accuracy")
    return "pearson" if is_regression else "accuracy"
