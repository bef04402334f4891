"""Task metrics as local ``evaluate`` modules, loaded by path (no Hub needed)."""

from __future__ import annotations

from pathlib import Path

import evaluate

GLUE_METRIC_PATH = str(Path(__file__).parent / "glue" / "glue.py")


def load_glue_metric(config_name: str, **kwargs) -> evaluate.EvaluationModule:
    """The GLUE metric of ``config_name`` (``sst2``, ``mnli``, ``cola``, ``stsb``, ...) from the packaged module."""
    return evaluate.load(GLUE_METRIC_PATH, config_name, **kwargs)
