"""Metrics of any text classification or regression task, as a local ``evaluate`` module loaded by path.

Load it with :func:`hf_distill.text_classification.metrics.load_metric` or
``evaluate.load("<path to this file>", config_name)``. Configurations and what they return:

- ``single_label``: ``accuracy`` and ``macro_f1`` (the unweighted mean of the per-class F1 scores, over
  the classes present in references or predictions)
- ``regression``: ``pearson`` and ``spearmanr`` correlations of predicted and gold scores

scikit-learn computes F1, scipy the correlations (imported only by the configuration that uses them).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Text classification metrics: accuracy and macro-F1, or Pearson and Spearman for regression."
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class ids (int), or predicted scores (float) for regression.
    references: gold class ids (int), or gold scores (float) for regression.
Returns: a dict of the configuration's metrics (see the module docstring).
"""
CONFIGS = ("single_label", "regression")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Classification(evaluate.Metric):
    def _info(self):
        if self.config_name not in CONFIGS:
            raise KeyError(
                f"Unknown classification metric configuration {self.config_name!r}; expected one of {list(CONFIGS)}."
            )
        dtype = "float32" if self.config_name == "regression" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}
            ),
            codebase_urls=[],
            reference_urls=[],
            format="numpy",
        )

    def _compute(self, predictions, references):
        if self.config_name == "regression":
            from scipy.stats import pearsonr, spearmanr

            return {
                "pearson": float(pearsonr(predictions, references)[0]),
                "spearmanr": float(spearmanr(predictions, references)[0]),
            }
        from sklearn.metrics import f1_score

        return {
            "accuracy": float((np.asarray(predictions) == np.asarray(references)).mean()),
            "macro_f1": float(f1_score(references, predictions, average="macro")),
        }
